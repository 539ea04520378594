"""Per-step records without stalling the device: metrics of step ``n`` are read after
step ``n + 1`` has been dispatched, so the host waits for a step that is already
finished (or about to be) while the next one runs.

Step time: the host observes when each step's metrics are ready; the time of step ``n``
is ``ready[n] - max(ready[n - 1], dispatched[n])``: the device was busy with step ``n``
from the later of the previous step's end and its own dispatch until its metrics were
ready. In steady state (the device always has a step queued) this is the device's step
time; pauses between steps (saves, evaluation, dumps) are not counted.

Non-finite guard: each step's loss and grad norm are checked against
``train.nan_policy`` as its record is written (:class:`lmspec.nonfinite.Guard`), so one
step late; the trainer flushes every record before a save, so no checkpoint follows an
unchecked step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import batches as fb
from lmspec import flops
from lmspec.config import ExperimentConfig
from lmspec.metrics import MetricsWriter
from lmspec.nonfinite import Guard, NonFiniteError


@dataclass
class _Pending:
    step: int
    metrics: Any  # device scalars
    batch: fb.FedBatch
    dispatched: float
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. val_loss: device scalars


class Recorder:
    """Writes ``metrics.jsonl``, TensorBoard (W&B with ``log.wandb``) and the progress
    bar, one step late."""

    def __init__(self, cfg: ExperimentConfig, out: Path, *, start: int, main: bool,
                 progress: bool, num_devices: int, device_kind: str,
                 say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.main = main
        self.say = say
        self.num_devices = num_devices
        self.device_kind = device_kind
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.writer = (MetricsWriter(out / "metrics.jsonl", start_step=start, config=cfg)
                       if main else None)
        self.bar = None
        if main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
                            dynamic_ncols=True)
        self.guard = Guard(cfg.train.nan_policy)
        self.pending: list[_Pending] = []
        self.step_times: list[float] = []
        self.losses: dict[int, float] = {}
        self.first_ready: float | None = None
        self._last_ready: float | None = None

    def add(self, step: int, metrics: Any, batch: fb.FedBatch, dispatched: float) -> None:
        """Queue step ``step`` (just dispatched) and write every earlier step's record."""
        self.flush(keep_last=False)
        self.pending.append(_Pending(step, metrics, batch, dispatched))

    def attach(self, step: int, name: str, values: Any) -> None:
        """Add a field to a queued step's record, as device values read when it is
        written (``val_loss``: the mean of the values)."""
        for p in self.pending:
            if p.step == step:
                p.extra[name] = values
                return
        raise AssertionError(f"step {step} is not queued")

    def flush(self, keep_last: bool = False) -> None:
        """Write the queued records (all, or all but the newest); waits for their steps."""
        while len(self.pending) > (1 if keep_last else 0):
            self._write(self.pending.pop(0))

    def _write(self, p: _Pending) -> None:
        m = jax.device_get(p.metrics)
        ready = time.perf_counter()
        if self.first_ready is None:
            self.first_ready = ready
        begin = p.dispatched if self._last_ready is None else max(self._last_ready,
                                                                  p.dispatched)
        self._last_ready = ready
        dt = max(ready - begin, 1e-9)
        self.step_times.append(dt)
        loss = float(m["loss"])
        self.losses[p.step] = loss
        fps = fb.fingerprints(p.batch, self.cfg.train.micro_batch_size)
        fb.forget(p.step)
        try:
            finite, stop = self.guard.check(p.step, loss, float(m["grad_norm"])), None
        except NonFiniteError as e:  # the step's record is written, then the run stops
            finite, stop = False, e
            self.pending.clear()  # the steps dispatched after it are not recorded
        if self.main:
            self._record(p, m, loss, dt, fps, finite)
        if stop is not None:
            raise stop

    def _record(self, p: _Pending, m: Any, loss: float, dt: float, fps: Any,
                finite: bool) -> None:
        assert fps is not None
        tps = self.tokens_per_step / dt / self.num_devices
        rec: dict[str, Any] = {
            "step": p.step, "loss": loss, "grad_norm": float(m["grad_norm"]),
            "lr": float(m["lr"]), "tokens_per_s": tps,
            "mfu": flops.mfu(tps, self.cfg.model, self.cfg.data.seq_len, self.device_kind),
            "batch_fingerprint": fps[0], "batch_fingerprint_parts": fps[1],
            "wall_time": time.time(),
        }
        if not finite:
            rec["update_skipped"] = True  # (also on the step that stopped the run)
        for name, values in p.extra.items():
            rec[name] = float(np.mean([float(v) for v in jax.device_get(values)]))
        self.writer.write(rec)  # metrics.jsonl and TensorBoard (out/tb)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps * self.num_devices:.0f}")
        elif (p.step + 1) % self.cfg.train.log_every == 0:
            self.say(f"step {p.step} loss {loss:.4f} tokens/s/device {tps:.0f}")

    def close(self, failed: bool = False) -> None:
        """Close the progress bar and the metrics writer (``failed``: the loop raised)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close(failed=failed)
