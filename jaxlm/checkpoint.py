"""Orbax checkpoints of the train state: params, optimizer state, step, RNG and config.

Layout: ``<out_dir>/checkpoints/<step>/{state,meta}``; ``step`` counts optimizer steps
done. Orbax writes each checkpoint under a temporary name and renames it when complete,
so a process killed mid-save leaves only a temporary folder, which
:meth:`Checkpoints.latest_step` never returns; it is removed on the next start.

Saves are asynchronous: :meth:`Checkpoints.save` returns once the arrays are copied to
host memory (Orbax's blocking part), and the files are written while training goes on.
The next save, :meth:`Checkpoints.wait` and :meth:`Checkpoints.close` wait for the
previous one to finish, so at most one save is in flight and a finished run's last
checkpoint is complete before the process exits. The saved values are the state after
that step whatever the next steps do with the device buffers: on GPUs the host copy is
a copy, and on CPU, where the host view shares the device buffer, JAX does not donate a
buffer that a host view still references.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

CHECKPOINT_SUBDIR = "checkpoints"

# Each shard is written whole by its first replica. Orbax's default on CPU
# (replica-parallel: replicas split a shard) slices every shard with a separately
# compiled op, which cost seconds per save here and buys nothing on one host.
_verbosity = absl_logging.get_verbosity()
absl_logging.set_verbosity(absl_logging.ERROR)  # the override is intended; no warning
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)
absl_logging.set_verbosity(_verbosity)


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir).absolute() / CHECKPOINT_SUBDIR


def _remove_partial(directory: Path) -> list[str]:
    """Delete temporary folders of saves that never completed (process 0 only)."""
    removed = []
    if jax.process_index() != 0 or not directory.is_dir():
        return removed
    for child in directory.iterdir():
        if child.is_dir() and ".orbax-checkpoint-tmp" in child.name:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


class Checkpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` keeping the last ``keep`` steps."""

    def __init__(self, out_dir: str | os.PathLike, keep: int, *, read_only: bool = False,
                 asynchronous: bool = True) -> None:
        self.directory = checkpoint_dir(out_dir)
        self.removed_partial = [] if read_only else _remove_partial(self.directory)
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0,
                enable_async_checkpointing=False,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
            )
        verbosity = absl_logging.get_verbosity()
        if read_only:  # orbax warns that a read-only manager is read-only
            absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "meta"))
        finally:
            absl_logging.set_verbosity(verbosity)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` as checkpoint ``step`` (after the previous save is done);
        returns when the arrays are on the host, before the files are written."""
        self.wait()
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk."""
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` into the shapes/dtypes/shardings of ``abstract_state``."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        """Finish the save in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def rng_key_data(seed: int) -> np.ndarray:
    """The run's base PRNG key as raw uint32 data (saved with every checkpoint)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))
