"""Test-only overlay: plants one fault in ``torchlm.trainer`` of every Python process
started with this folder on ``PYTHONPATH`` (the launcher, torchrun and each worker), so
the product code carries no fault switches.

``TORCHLM_TEST_FAULT`` picks the fault:

- ``fail_at:RANK:STEP``: ``Trainer.train_step`` raises ``RuntimeError("injected failure
  ...")`` on rank RANK at step STEP (a worker crash);
- ``row_offset:RANK``: ``rank_rows`` on rank RANK reads its rows one row later in the
  global batch (wrapping at the end), a realistic off-by-one in the data split.

Python imports ``sitecustomize`` at start-up; this one installs an import hook that
patches ``torchlm.trainer`` right after it is executed, and does nothing when the
variable is unset. A malformed value is reported on stderr and plants nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

ENV = "TORCHLM_TEST_FAULT"
TARGET = "torchlm.trainer"


def _plant_fail_at(module, rank: int, step: int) -> None:
    original = module.Trainer.train_step

    def train_step(self, s):
        if self.rank == rank and s == step:
            raise RuntimeError(f"injected failure (test overlay) on rank {rank} at step {s}")
        return original(self, s)

    module.Trainer.train_step = train_step


def _plant_row_offset(module, rank: int) -> None:
    original = module.rank_rows

    def rank_rows(data, step, micro_step, r, world_size, micro):
        if r != rank:
            return original(data, step, micro_step, r, world_size, micro)
        b = data.global_batch_size
        start = micro_step * micro * world_size + r * micro + 1  # the planted off-by-one
        return data.global_batch(step)[[(start + i) % b for i in range(micro)]]

    module.rank_rows = rank_rows


def _plant(module) -> None:
    kind, *args = os.environ[ENV].split(":")
    try:
        if kind == "fail_at" and len(args) == 2:
            _plant_fail_at(module, int(args[0]), int(args[1]))
        elif kind == "row_offset" and len(args) == 1:
            _plant_row_offset(module, int(args[0]))
        else:
            raise ValueError(kind)
    except ValueError:
        print(f"torchlm_faults: {ENV}={os.environ[ENV]!r} is not fail_at:RANK:STEP or "
              "row_offset:RANK; nothing planted", file=sys.stderr)


class _PatchAfterExec(importlib.abc.MetaPathFinder):
    """Finds ``torchlm.trainer`` through the other finders, then wraps its loader so
    the fault is planted once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_plant(module):
            exec_module(module)
            _plant(module)

        spec.loader.exec_module = exec_and_plant
        return spec


if os.environ.get(ENV):
    sys.meta_path.insert(0, _PatchAfterExec())
