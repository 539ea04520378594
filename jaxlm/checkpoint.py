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

Integrity: once a save is complete on disk, process 0 writes ``<step>/checksums.json``
(size and sha256 of every file, :mod:`lmspec.integrity`), last and atomically: with one
process from a background thread while training goes on, with several at the next save,
:meth:`Checkpoints.wait` or :meth:`Checkpoints.close`. :meth:`Checkpoints.verify`
checks a step against it before anything is restored; a mismatch, a missing or truncated
file, or an unreadable list is a :class:`~lmspec.errors.UserError` naming the file and the
previous checkpoint. A step without the list (written before checksums existed, or by a
process killed between Orbax's commit and the list) is restored with a warning.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from lmspec import integrity
from lmspec.errors import UserError

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
        self._unsealed: int | None = None  # saved step whose checksums are not written
        self._sealer: threading.Thread | None = None
        self._seal_error: BaseException | None = None
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
        returns when the arrays are on the host, before the files are written. With one
        process, a background thread waits for the files and then writes the checksums
        (hashlib and file reads release the GIL: the hashing overlaps training)."""
        self.wait()
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._unsealed = step
        if jax.process_count() == 1:  # several: Orbax's wait has barriers, keep it in line
            self._sealer = threading.Thread(target=self._seal_in_background,
                                            name="jaxlm-checksums", daemon=True)
            self._sealer.start()

    def _seal_in_background(self) -> None:
        try:
            self._seal()
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() on the main thread
            self._seal_error = e

    def _seal(self) -> None:
        self.manager.wait_until_finished()
        step, self._unsealed = self._unsealed, None
        if step is not None and jax.process_index() == 0:
            folder = self.step_dir(step)
            if folder.is_dir():
                integrity.write_checksums(folder)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk and its checksums
        are written (process 0)."""
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            sealer.join()
            error, self._seal_error = self._seal_error, None
            if error is not None:
                raise error
        self._seal()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def verify(self, step: int, todo: str) -> bool:
        """Check checkpoint ``step`` against its checksums (False: it has none);
        raises :class:`UserError` naming the first bad file, ending with ``todo``."""
        return integrity.verify_checksums(self.step_dir(step), todo)

    def resume_advice(self, step: int) -> str:
        """What to do when checkpoint ``step`` cannot be used: name the previous one."""
        older = [s for s in self.all_steps() if s < step]
        if not older:
            return "pass --no-resume to start over (there is no earlier checkpoint)"
        return (f"pass --no-resume to start over, or move {self.step_dir(step)} out of "
                f"{self.directory} to resume from the previous checkpoint "
                f"{self.step_dir(older[-1])}")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` into the shapes/dtypes/shardings of ``abstract_state``."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int, todo: str = "") -> dict[str, Any]:
        """The ``meta`` item of ``step``; an unreadable one is a :class:`UserError`."""
        try:
            out = self.manager.restore(step,
                                       args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for a bad file
            raise UserError(f"{self.step_dir(step) / 'meta'}: cannot be read "
                            f"({_first_line(e)}); {todo or self.resume_advice(step)}") from e
        if not isinstance(meta, dict) or "step" not in meta:
            raise UserError(f"{self.step_dir(step) / 'meta'}: not a jaxlm checkpoint record; "
                            f"{todo or self.resume_advice(step)}")
        return dict(meta)

    def close(self) -> None:
        """Finish the save in flight (and its checksums), then release the manager."""
        self.wait()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def rng_key_data(seed: int) -> np.ndarray:
    """The run's base PRNG key as raw uint32 data (saved with every checkpoint)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))
