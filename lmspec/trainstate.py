"""The whole train state of a run, framework-neutral: what ``parity convert`` carries from
a DeepSpeed run to a JAX run and back.

A :class:`TrainState` holds, under Hugging Face Llama names and layouts
(:func:`lmspec.weights.param_shapes`), the fp32 master weights and AdamW's first and
second moments (torch's ``exp_avg`` / ``exp_avg_sq``, optax's ``mu`` / ``nu``), three
counters and the config:

- ``adam_step``: AdamW updates applied (the bias-correction count: torch's per-parameter
  ``state["step"]``, optax's ``ScaleByAdamState.count``);
- ``schedule_step``: the LR-schedule position, so the next update uses
  ``lmspec.schedule.lr_at(schedule_step)`` (torch ``LambdaLR.last_epoch``, optax's
  ``ScaleByScheduleState.count``);
- ``next_step``: the next data step to run (``client_state["step"]`` of a DeepSpeed
  checkpoint, the step of a jaxlm checkpoint); the batch order is lmspec's, so the step
  is the whole data position.

In a run without skipped (non-finite) steps the three are equal. ``records`` are the
``metrics.jsonl`` lines of the steps before ``next_step`` (kept verbatim), so a converted
folder holds the run's history like any run folder.

On disk (:meth:`TrainState.save`): ``params.safetensors``, ``exp_avg.safetensors``,
``exp_avg_sq.safetensors``, ``state.json`` (counters, config, source) and
``metrics.jsonl``. This module imports neither jax nor torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.config import ExperimentConfig, from_dict
from lmspec.errors import UserError
from lmspec.weights import param_shapes

TENSOR_KINDS = ("params", "exp_avg", "exp_avg_sq")
FORMAT = "lmspec-trainstate"
STATE_JSON = "state.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainState:
    """A run's complete train state (see the module docstring)."""

    config: ExperimentConfig
    params: dict[str, np.ndarray]
    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]
    adam_step: int
    schedule_step: int
    next_step: int
    records: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def tensors(self, kind: str) -> dict[str, np.ndarray]:
        """``params``, ``exp_avg`` or ``exp_avg_sq``."""
        if kind not in TENSOR_KINDS:
            raise ValueError(f"kind={kind!r}: allowed are {list(TENSOR_KINDS)}")
        return getattr(self, kind)

    def check(self, where: str) -> None:
        """Every tensor's name, shape and dtype (fp32) against ``config.model``, second
        moments >= 0, counters non-negative integers; a :class:`UserError` naming every
        tensor that does not fit (``where`` says whose state it is)."""
        problems = []
        for kind in TENSOR_KINDS:
            problems += tensor_problems(self.config, self.tensors(kind), kind)
        negative = sorted(k for k, v in self.exp_avg_sq.items()
                          if isinstance(v, np.ndarray) and v.size and np.min(v) < 0)
        if negative:
            problems.append(f"exp_avg_sq: negative entries in {_names(negative)}")
        for name in ("adam_step", "schedule_step", "next_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                problems.append(f"{name}={v!r}: expected an integer >= 0")
        if problems:
            raise UserError(f"{where}: the train state does not fit the config's model "
                            f"and optimizer: " + "; ".join(problems))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the state into ``folder`` (created; files written atomically)."""
        from lmspec.io import atomic_write_text
        from lmspec.weights import save_safetensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for kind in TENSOR_KINDS:
            save_safetensors(self.tensors(kind), folder / f"{kind}.safetensors")
        write_records(self.records, folder / METRICS)
        atomic_write_text(folder / STATE_JSON, json.dumps({
            "format": FORMAT, "version": 1, "adam_step": int(self.adam_step),
            "schedule_step": int(self.schedule_step), "next_step": int(self.next_step),
            "config": self.config.to_dict(), "source": self.source}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TrainState:
        """Read a folder written by :meth:`save`."""
        from lmspec.io import read_json
        from lmspec.weights import load_safetensors

        folder = Path(folder)
        meta = read_json(folder / STATE_JSON, "train-state record")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{folder / STATE_JSON}: not an {FORMAT} record")
        records = []
        if (folder / METRICS).is_file():
            records = [r for r in (folder / METRICS).read_text().splitlines() if r.strip()]
        tensors = {kind: load_safetensors(folder / f"{kind}.safetensors")
                   for kind in TENSOR_KINDS}
        return cls(config=from_dict(meta["config"]), adam_step=int(meta["adam_step"]),
                   schedule_step=int(meta["schedule_step"]),
                   next_step=int(meta["next_step"]), records=records,
                   source=dict(meta.get("source") or {}), **tensors)


def tensor_problems(cfg: ExperimentConfig, tensors: dict[str, Any], kind: str) -> list[str]:
    """What does not fit in ``tensors`` (one of :data:`TENSOR_KINDS`): missing,
    unexpected, mis-shaped and non-fp32 tensors, each named."""
    expected = param_shapes(cfg.model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} != {expected[k]}"
                    for k in set(expected) & set(tensors)
                    if tuple(tensors[k].shape) != expected[k])
    dtypes = sorted(f"{k} {np.dtype(tensors[k].dtype).name}"
                    for k in set(expected) & set(tensors)
                    if np.dtype(tensors[k].dtype) != np.float32)
    out = []
    if missing:
        out.append(f"{kind}: missing {_names(missing)}")
    if extra:
        out.append(f"{kind}: unexpected {_names(extra)}")
    if shapes:
        out.append(f"{kind}: wrong shapes {_names(shapes)}")
    if dtypes:
        out.append(f"{kind}: not float32: {_names(dtypes)}")
    return out


def _names(items: list[str], limit: int = 8) -> str:
    """``[a, b, ...]`` with at most ``limit`` shown and the count of the rest."""
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def records_before(metrics_path: str | os.PathLike, next_step: int) -> list[str]:
    """The ``metrics.jsonl`` lines (verbatim) of steps ``< next_step``, in file order; a
    torn last line is skipped; none when the file is missing."""
    path = Path(metrics_path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON record (a damaged metrics.jsonl; "
                            "move it away and convert again)") from None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) \
                and rec["step"] < next_step:
            out.append(line)
    return out


def write_records(records: list[str], path: str | os.PathLike) -> None:
    """Write ``records`` (JSON lines, as :func:`records_before` gives them) to ``path``
    atomically."""
    from lmspec.io import atomic_write_text

    atomic_write_text(Path(path), "".join(r + "\n" for r in records))
