"""The per-step metrics record both trainers write (``metrics.jsonl``).

One JSON object per optimizer step. ``loss`` is the token mean over the global batch
with the parameters before that step's update; ``grad_norm`` the global L2 norm of the
gradient before clipping; ``lr`` the rate that step's update used;
``batch_fingerprint`` the :func:`lmspec.data.combine_row_digests` of the rows the model
was fed, in global row order. Optional fields: ``val_loss``, and
``batch_fingerprint_parts`` (a list of 16-hex :func:`lmspec.data.fingerprint_parts`, one
per (micro-step, rank) slice of ``train.micro_batch_size`` rows; part ``k`` is rank
``k % world_size`` at micro-step ``k // world_size``), which a reader uses to name where
two batches part.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lmspec.errors import UserError

REQUIRED_FIELDS = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "mfu",
    "batch_fingerprint",
    "wall_time",
)
# update_skipped: true on a non-finite step that train.nan_policy=skip:N let pass
OPTIONAL_FIELDS = ("val_loss", "batch_fingerprint_parts", "update_skipped")


# TensorBoard scalars: train/<field> for each of these a record carries
TENSORBOARD_FIELDS = ("loss", "grad_norm", "lr", "tokens_per_s", "val_loss", "mfu")


class TensorBoardLog:
    """TensorBoard events (tensorboardX) of metrics records: ``train/<field>`` per step,
    the tags of :data:`TENSORBOARD_FIELDS`; a no-op where tensorboardX is missing."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover - a declared dependency
            self.w = None
            return
        self.w = SummaryWriter(logdir=str(logdir))

    def write(self, rec: dict[str, Any]) -> None:
        if self.w is None:
            return
        for k in TENSORBOARD_FIELDS:
            v = rec.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.w.add_scalar(f"train/{k}", v, rec["step"])
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


class MetricsWriter:
    """Appends records to ``metrics.jsonl``; each line is flushed and fsynced, then
    written as TensorBoard scalars (``<run>/tb``) and, given the run's ``config`` with
    ``log.wandb`` on, logged to Weights & Biases (:mod:`lmspec.wandb_log`).

    On resume, records of steps >= ``start_step`` are dropped first, so a run that
    crashed after writing a step it had not checkpointed does not repeat that step.
    """

    def __init__(self, path: str | os.PathLike, start_step: int = 0,
                 tensorboard: bool = True, config: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path, strict=False) if r["step"] < start_step]
            from lmspec.io import atomic_write_text

            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", encoding="utf-8")
        # the same scalars as TensorBoard events in <run>/tb (both trainers: one helper)
        self.tb = TensorBoardLog(self.path.parent / "tb") if tensorboard else None
        # config (the run's ExperimentConfig) with log.wandb on: every record to W&B too
        self.wandb = None
        if config is not None and config.log.wandb != "off":
            from lmspec.wandb_log import WandbLog

            try:
                self.wandb = WandbLog(config)
            except BaseException:
                self.close()
                raise

    def write(self, record: dict[str, Any]) -> None:
        missing = [k for k in REQUIRED_FIELDS if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks fields {missing}")
        _check_parts(record.get("batch_fingerprint_parts"))
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if self.tb is not None:
            self.tb.write(clean)
        if self.wandb is not None:  # after the line is on disk: W&B only mirrors it
            self.wandb.write(record)

    def close(self, failed: bool = False) -> None:
        """Close the file and the loggers (``failed``: the run ends on an error)."""
        self._f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close(failed=failed)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def _check_parts(parts: Any) -> None:
    """``batch_fingerprint_parts``, when present: a non-empty list of 16-hex strings."""
    if parts is None:
        return
    if not isinstance(parts, list) or not parts or not all(
            isinstance(p, str) and len(p) == 16 and all(c in "0123456789abcdef" for c in p)
            for p in parts):
        raise ValueError(f"batch_fingerprint_parts must be a non-empty list of 16-hex "
                         f"strings, got {parts!r:.80}")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf": JSON has no such numbers
    return v


def read_metrics(path: str | os.PathLike, *, strict: bool = True) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl``. A torn last line (crash mid-write) is skipped unless
    ``strict``; a record missing a contract field is always an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metrics file not found: {path}")
    out = []
    fix = "a damaged metrics.jsonl: move it away, or start over with --no-resume"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text at byte {e.start} ({fix})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if not strict and i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON record ({fix})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{i + 1}: not a JSON object ({fix})")
        missing = [k for k in REQUIRED_FIELDS if k not in rec]
        if missing:
            raise UserError(f"{path}:{i + 1}: record lacks fields {missing} ({fix})")
        for k in ("loss", "grad_norm"):
            if isinstance(rec[k], str):
                rec[k] = float(rec[k])
        out.append(rec)
    return out
