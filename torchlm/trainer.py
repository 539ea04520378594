"""DeepSpeed ZeRO training loop; one copy runs in every worker process.

Started by ``torchlm train`` through torchrun (see :mod:`torchlm.launch`), or directly:
``torchrun --nproc_per_node 2 -m torchlm.worker CONFIG [k=v ...]`` or
``deepspeed --num_gpus 2 --module torchlm.worker CONFIG ...``.

Per optimizer step ``s`` with ``G`` accumulation steps, micro batch ``b`` and ``W``
ranks, rank ``r`` reads rows ``[m*b*W + r*b, m*b*W + (r+1)*b)`` of ``lmspec``'s global
batch for micro-step ``m``. DeepSpeed divides each micro loss by ``G`` and averages the
gradients over ranks, so the update uses the gradient of the global-batch token mean.

Per-step record (``metrics.jsonl``, rank 0): ``loss`` is that token mean (micro-step
losses all-reduced), ``grad_norm`` the global pre-clip L2 norm, ``lr`` the rate the
wrapped torch AdamW used for the update; ``batch_fingerprint`` identifies the rows the
ranks actually fed the model: each rank hashes its rows per micro-step
(:func:`lmspec.data.row_digests`), the digests are all-gathered and combined in global
row order (micro-step major, then rank, then row), and ``batch_fingerprint_parts``
holds one fingerprint per (micro-step, rank) slice (part ``k``: rank ``k % W`` at
micro-step ``k // W``); ``val_loss`` (when ``train.eval_every`` > 0,
every ``eval_every`` steps and at the last one) is the token mean over
``train.eval_batches`` validation batches of ``global_batch_size`` windows, with the
weights after that step's update.

The step loop reads nothing back from the device per micro-step: a step's rows go to
the device in one (pinned, asynchronous) copy, losses stay on the device, and the step's
figures (loss, norm, every rank's row digests) come to the host in one transfer after the
optimizer step; the only other wait is the device synchronize that starts the step clock.
(DeepSpeed's own ``step()`` may still read its norm; that is inside DeepSpeed.)
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lmspec import flops
from lmspec.config import ConfigError, ExperimentConfig, load_config, save_config
from lmspec.data import Dataset, combine_row_digests, fingerprint_parts, row_digests
from lmspec.io import atomic_write_json
from lmspec.metrics import MetricsWriter
from lmspec.nonfinite import EXIT_NON_FINITE, STOP_FILE, Guard, NonFiniteError
from lmspec.runs import (
    add_train_args,
    for_framework,
    peak_rss_bytes,
    run_summary,
    train_args,
    versions,
    write_run_summary,
)
from lmspec.weights import init_weights
from lmspec.weights import save_safetensors as save_np_safetensors
from torchlm.api import configure_torch
from torchlm.ds_config import build_ds_config, build_optimizer, build_scheduler, model_attention
from torchlm.model import Llama, token_loss
from torchlm.runfolder import (
    CKPT_SUBDIR,
    FINAL_WEIGHTS,
    LAUNCH_TIME_ENV,
    VERIFIED_ENV,
    checkpoint_tag,
    latest_checkpoint,
    save_engine_checkpoint,
    verify_checkpoint,
)
from torchlm.weights import load_numpy


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def _fill_single_process_env() -> None:
    """Let ``python -m torchlm.worker`` run without a launcher (world size 1)."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def rank_rows(data: Dataset, step: int, micro_step: int, rank: int, world_size: int,
              micro: int) -> np.ndarray:
    """The rows rank ``rank`` feeds the model at ``micro_step`` of ``step``:
    ``[m*b*W + r*b, m*b*W + (r+1)*b)`` of the global batch (int32, (b, T+1))."""
    start = micro_step * micro * world_size + rank * micro
    return data.global_batch_rows(step, start, start + micro)


def worker_device(world: int) -> torch.device:
    """This worker's device (its GPU by ``LOCAL_RANK``, else the CPU with the cores shared
    among the local workers), with :func:`torchlm.api.configure_torch` numerics."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        configure_torch(num_threads=max(1, (os.cpu_count() or 1) // local_world))
    configure_torch()
    return device


def build_engine(cfg: ExperimentConfig, model: Llama, device: torch.device, world: int
                 ) -> tuple[Any, torch.optim.AdamW]:
    """``deepspeed.initialize`` of ``model`` (weights already loaded) with the torch AdamW
    and LambdaLR of :mod:`torchlm.ds_config` and the JSON of ``build_ds_config(cfg,
    world)``; returns the engine and the torch AdamW it wraps (DeepSpeed points its param
    groups at its fp32 masters)."""
    import deepspeed

    optimizer = build_optimizer(model, cfg, device.type)
    scheduler = build_scheduler(optimizer, cfg)
    # Everything so far (modules of torch, DeepSpeed, ...) lives as long as the process:
    # frozen, the garbage collector stops scanning it. DeepSpeed's bf16 optimizer calls
    # gc.collect() six times while it initialises (see_memory_usage), ~1.3 s on a 2-core
    # CPU with the heap unfrozen; the collections during training get cheaper too.
    # Nothing numeric changes.
    gc.freeze()
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler,
        config=build_ds_config(cfg, world),
    )
    return engine, optimizer


def init_process_group() -> None:
    """Join the process group of this worker (gloo on CPU, NCCL on GPU; world size 1
    without a launcher), with DeepSpeed's per-step noise silenced."""
    _fill_single_process_env()
    # DeepSpeed calls torch.distributed APIs that torch marks deprecated (noise per step)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated",
                            category=FutureWarning)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        # DeepSpeed's CPU comm backend compiles its shared-memory all-reduce (a C++
        # extension: ~35 s on 2 cores on every fresh install) when it starts, for
        # inference_all_reduce only; training's collectives go through gloo. Marking the
        # op incompatible skips the build (deepspeed.ops caches this dict so that edits
        # to it persist).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)


@dataclass
class StepOutput:
    """What one optimizer step leaves behind, still on the device where it lives."""

    loss_sum: torch.Tensor  # float64 scalar: sum of this rank's micro-step losses
    norm: torch.Tensor | float | None  # pre-clip global norm (None: ask DeepSpeed)
    lr: float
    digests: np.ndarray  # uint64 (G*b,): this rank's row digests, micro-step major
    excluded_s: float = 0.0  # time spent on dumps, not counted in the step time
    host: dict[str, Any] = field(default_factory=dict)  # filled by Trainer.gather_step


class Trainer:
    """One worker's view of a DeepSpeed training run (construct inside the process group)."""

    def __init__(self, cfg: ExperimentConfig, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.args = args
        self.targs = train_args(args, cfg)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if self.world != cfg.zero.world_size:
            raise ConfigError(
                f"zero.world_size={cfg.zero.world_size} but {self.world} processes were "
                f"launched; set zero.world_size={self.world} or launch "
                f"{cfg.zero.world_size} processes"
            )
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / CKPT_SUBDIR
        self.device = worker_device(self.world)
        torch.manual_seed(cfg.train.seed)

        self.data = Dataset.from_config(cfg, progress=False)
        self.gas = cfg.grad_accum_steps(self.world)
        self.micro = cfg.train.micro_batch_size
        self.seq_len = cfg.data.seq_len

        model = Llama(cfg.model, attention=model_attention(cfg))
        if args.init_weights:
            from lmspec.hf import load_init_weights

            self.init_weights = load_init_weights(args.init_weights, cfg.model)
            load_numpy(model, self.init_weights, where=args.init_weights)
        else:
            self.init_weights = init_weights(cfg.model, cfg.train.seed)
            load_numpy(model, self.init_weights, where="lmspec init")
        # the torch AdamW that DeepSpeed wraps: its param groups hold the LR it steps with
        self.engine, self.torch_optimizer = build_engine(cfg, model, self.device, self.world)
        self.device_name = _device_name(self.device)
        # ZeRO 0 in fp32 holds full, rank-averaged grads: the norm is computed here
        self.own_norm = cfg.zero.stage == 0 and cfg.train.precision == "fp32"

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any] | None:
        """Train to ``train.steps``; returns the run summary on rank 0."""
        t = self.cfg.train
        start = self.restore_or_init()
        self.guard = Guard(t.nan_policy)
        if start:
            self.guard.last_checkpoint = str(self.ckpt_dir / checkpoint_tag(start))
        writer = self.open_metrics(start)
        bar = tqdm(total=t.steps, initial=start, disable=self.rank != 0 or not self.targs.progress,
                   desc="torchlm train",
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        step_times: list[float] = []
        first_step_wall = time.time() if start < t.steps else None
        final_loss = None
        for step in range(start, t.steps):
            self._sync()
            t0 = time.perf_counter()
            out = self.train_step(step)
            self.gather_step(out)  # the step's one device -> host transfer
            step_times.append(time.perf_counter() - t0 - out.excluded_s)
            record = self.make_record(step, out, step_times[-1])
            try:  # checked before any save: no checkpoint follows a bad step
                finite, stop = self.check_finite(step, record), None
            except NonFiniteError as e:
                finite, stop = False, e
            if not finite:
                record["update_skipped"] = stop is None or self.update_skipped()
            else:
                self.maybe_evaluate(step, record)
            self.log_record(writer, bar, record)
            if stop is not None:
                bar.close()
                if writer is not None:
                    writer.close(failed=True)
                self.write_stop(stop)
                raise stop
            final_loss = record["loss"]
            self.maybe_save(step)
        bar.close()
        if writer is not None:
            writer.close()
        self.export_weights(self.out_dir / FINAL_WEIGHTS)
        launch = float(os.environ.get(LAUNCH_TIME_ENV, "nan"))
        return self._summary(step_times, start, launch, first_step_wall, final_loss)

    # ------------------------------------------------------------------ pieces

    def restore_or_init(self) -> int:
        """Load the latest checkpoint (unless ``--no-resume``) or set the initial
        weights; returns the step to start from."""
        from torchlm.gather import set_master_params

        start = 0
        tag = latest_checkpoint(self.out_dir) if self.targs.resume else None
        if tag is not None:
            if os.environ.get(VERIFIED_ENV) != str(self.ckpt_dir / tag):
                verify_checkpoint(self.out_dir, tag,
                                  say=lambda m: print(m, file=sys.stderr) if self.rank == 0
                                  else None)
            path, client = self.engine.load_checkpoint(
                str(self.ckpt_dir), tag=tag, load_optimizer_states=True,
                load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"could not load the checkpoint in {self.ckpt_dir}")
            start = int(client["step"])
        else:
            set_master_params(self.engine, self.init_weights)
        self.init_weights = None  # free host memory
        return start

    def open_metrics(self, start: int) -> MetricsWriter | None:
        """Rank 0: save the config and open ``metrics.jsonl`` (records >= start dropped;
        W&B too with ``log.wandb``)."""
        if self.rank != 0:
            return None
        save_config(self.cfg, self.out_dir / "config.yaml")
        return MetricsWriter(self.out_dir / "metrics.jsonl", start_step=start, config=self.cfg)

    def step_rows(self, step: int) -> tuple[torch.Tensor, np.ndarray]:
        """This rank's rows of every micro-step of ``step`` on the device, (G, b, T+1),
        copied in one transfer, and their digests (G*b,) computed on the host."""
        rows = np.stack([rank_rows(self.data, step, m, self.rank, self.world, self.micro)
                         for m in range(self.gas)])
        digests = row_digests(rows)
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, torch.int64, non_blocking=True), digests
        return t.to(torch.int64), digests

    def train_step(self, step: int) -> StepOutput:
        """Forward, backward and DeepSpeed ``step()`` for each micro-batch; the last
        ``step()`` updates the weights. Nothing is read back to the host here."""
        from torchlm.gather import full_grads

        rows, digests = self.step_rows(step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        out = StepOutput(loss_sum=loss_sum, norm=None, lr=float("nan"), digests=digests)
        for m in range(self.gas):
            w = rows[m]
            loss = token_loss(self.engine(w[:, :-1]), w[:, 1:])
            self.engine.backward(loss)
            loss_sum += loss.detach().double()
            if m == self.gas - 1:  # gradients complete (accumulated and reduced)
                if step in self.targs.dump_grads:
                    td = time.perf_counter()
                    self._dump("grads", step, full_grads(self.engine))
                    out.excluded_s += time.perf_counter() - td
                if self.own_norm:
                    out.norm = self._own_grad_norm()
                # the LR this update uses (a host float: no device read)
                out.lr = float(self.torch_optimizer.param_groups[0]["lr"])
            self.engine.step()
        if out.norm is None:
            out.norm = self.engine.get_global_grad_norm()
        if step in self.targs.dump_params:
            from torchlm.gather import full_params

            td = time.perf_counter()
            self._dump("params", step, full_params(self.engine))
            out.excluded_s += time.perf_counter() - td
        return out

    def gather_step(self, out: StepOutput) -> None:
        """The step's figures to the host in one transfer: the loss sum all-reduced, the
        grad norm, and every rank's row digests all-gathered (NCCL on GPU, gloo on CPU).
        Fills ``out.host`` with ``loss``, ``grad_norm``, ``digests`` (global row order)."""
        dev = self.device
        loss = (out.loss_sum / self.gas).reshape(1)  # this rank's micro-step mean
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        norm = (torch.tensor([float("nan")], dtype=torch.float64, device=dev)
                if out.norm is None else
                torch.as_tensor(out.norm, device=dev).to(torch.float64).reshape(1))
        # uint64 digests travel as their int64 bit pattern (collectives lack uint64)
        mine = torch.from_numpy(out.digests.view(np.int64)).to(dev)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        # float64 figures as their int64 bit pattern too: one tensor, one copy to host
        host = torch.cat([loss.view(torch.int64), norm.view(torch.int64), *parts]).cpu()
        figures = host[:2].view(torch.float64).numpy()
        by_rank = host[2:].numpy().view(np.uint64).reshape(self.world, self.gas, self.micro)
        out.host = {
            "loss": float(figures[0]) / self.world,
            "grad_norm": float(figures[1]),
            # (W, G, b) -> micro-step major, then rank, then row
            "digests": by_rank.transpose(1, 0, 2).reshape(-1),
        }

    def make_record(self, step: int, out: StepOutput, step_time_s: float) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of ``step`` (host values only)."""
        tps = self.gas * self.micro * self.seq_len / step_time_s  # per rank
        digests = out.host["digests"]
        return {
            "step": step, "loss": out.host["loss"], "grad_norm": out.host["grad_norm"],
            "lr": out.lr, "tokens_per_s": tps,
            "mfu": flops.mfu(tps, self.cfg.model, self.seq_len, self.device_name),
            "batch_fingerprint": combine_row_digests(digests),
            "batch_fingerprint_parts": fingerprint_parts(digests, self.micro),
            "wall_time": time.time(),
        }

    def update_skipped(self) -> bool:
        """Whether DeepSpeed left the last step's update out: its ZeRO 1-3 and bf16
        optimizers do so on a non-finite grad norm (``overflow``); ZeRO 0 in fp32 steps
        a plain torch optimizer, which applies it."""
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def check_finite(self, step: int, record: dict[str, Any]) -> bool:
        """``train.nan_policy`` on this step's loss and grad norm (every rank holds the
        same all-reduced values, so every rank decides alike)."""
        loss, norm = record["loss"], record["grad_norm"]
        if math.isfinite(loss) and math.isfinite(norm):
            return True
        return self.guard.check(step, loss, norm, update_skipped=self.update_skipped())

    def write_stop(self, stop: NonFiniteError) -> None:
        """Rank 0: ``stopped.json`` in the run folder, for the launcher (exit status 3)."""
        if self.rank == 0:
            if LAUNCH_TIME_ENV not in os.environ:  # else the launcher prints it
                print(f"error: {stop}", file=sys.stderr)
            atomic_write_json(self.out_dir / STOP_FILE, {
                "reason": "non-finite", "message": str(stop),
                "launch_time": os.environ.get(LAUNCH_TIME_ENV)})

    def maybe_evaluate(self, step: int, record: dict[str, Any]) -> None:
        """``val_loss`` every ``train.eval_every`` steps and at the last one."""
        t = self.cfg.train
        last = step + 1 == t.steps
        if t.eval_every and ((step + 1) % t.eval_every == 0 or last) \
                and self.data.num_val_windows > 0:
            record["val_loss"] = self.evaluate()

    def log_record(self, writer: MetricsWriter | None, bar: tqdm,
                   record: dict[str, Any]) -> None:
        """Rank 0: append the record, update the progress bar, print every log_every."""
        bar.update(1)
        if writer is None:
            return
        writer.write(record)
        step, loss, lr = record["step"], record["loss"], record["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        t = self.cfg.train
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            bar.write(f"step {step:6d} loss {loss:.4f} grad_norm {record['grad_norm']:.4f} "
                      f"lr {lr:.3e} tokens/s/proc {record['tokens_per_s']:,.0f}{val}")

    def maybe_save(self, step: int) -> None:
        """A checkpoint every ``train.ckpt_every`` steps and after the last one."""
        t = self.cfg.train
        if (t.ckpt_every and (step + 1) % t.ckpt_every == 0) or step + 1 == t.steps:
            self.save_checkpoint(step + 1)

    def _own_grad_norm(self) -> torch.Tensor:
        """Global L2 norm of ``param.grad`` (ZeRO 0 fp32: full, rank-averaged grads),
        as a float64 device scalar."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            sq += p.grad.detach().double().pow(2).sum()
        return sq.sqrt()

    def _dump(self, kind: str, step: int, tensors: dict[str, np.ndarray]) -> None:
        if self.rank == 0:
            save_np_safetensors(tensors, self.out_dir / "dumps" / f"{kind}_step{step}.safetensors")

    def _all_mean(self, value: torch.Tensor) -> float:
        """Mean over ranks of a float64 scalar (a host read: evaluation only)."""
        t = value.detach().to(self.device, torch.float64).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-mean loss over ``eval_batches`` validation batches of the global batch
        size; every rank evaluates its slice (ZeRO-3 needs all ranks in each forward)."""
        self.engine.eval()
        b = self.cfg.train.global_batch_size
        per_rank = b // self.world
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for i in range(self.cfg.train.eval_batches):
            rows = self.data.val_batch(i, b)[self.rank * per_rank:(self.rank + 1) * per_rank]
            for chunk in np.split(rows, per_rank // self.micro):
                w = torch.from_numpy(chunk).to(self.device, torch.int64)
                total += token_loss(self.engine(w[:, :-1]), w[:, 1:]).double()
                count += 1
        self.engine.train()
        return self._all_mean(total / count)

    def save_checkpoint(self, step: int) -> None:
        """DeepSpeed checkpoint ``step<NNNNNNNN>`` (next step to run as client state),
        its ``checksums.json`` and then ``latest`` (:func:`save_engine_checkpoint`: a
        kill at any moment leaves a complete one named); keeps the newest
        ``train.ckpt_keep``."""
        tag = save_engine_checkpoint(self.engine, self.ckpt_dir, step)
        if self.rank == 0:
            # oldest first by write time (a --no-resume run may follow higher-step tags)
            dirs = sorted((p for p in self.ckpt_dir.glob("step*") if p.is_dir()),
                          key=lambda p: (p.stat().st_mtime_ns, p.name))
            for old in dirs[: max(0, len(dirs) - self.cfg.train.ckpt_keep)]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self.guard.last_checkpoint = str(self.ckpt_dir / tag)

    def export_weights(self, path: str | os.PathLike) -> None:
        """Consolidated fp32 master weights, HF names (collective; rank 0 writes)."""
        from torchlm.gather import full_params

        params = full_params(self.engine)
        if self.rank == 0:
            save_np_safetensors(params, path)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _summary(self, step_times: list[float], start: int, launch: float,
                 first_step_wall: float | None, final_loss: float | None
                 ) -> dict[str, Any] | None:
        """``run_summary.json`` (:func:`lmspec.runs.run_summary`), written by rank 0."""
        cfg = self.cfg
        peak = torch.tensor([_peak_memory(self.device)], dtype=torch.float64,
                            device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the largest process
        if self.rank != 0:
            return None
        summary = run_summary(
            side="torch", cfg=cfg, step_times=step_times, start_step=start,
            num_devices=self.world, num_processes=self.world, device_kind=self.device_name,
            num_micro_batches=self.gas, peak_memory_bytes=int(peak.item()),
            # one device per process: on GPU the process peak is the device's
            peak_memory_per_device_bytes=(int(peak.item()) if self.device.type == "cuda"
                                          else None),
            startup_s=(first_step_wall - launch)
            if first_step_wall is not None and math.isfinite(launch) else None,
            final_loss=final_loss,
            versions=versions("torch", "deepspeed", "transformers", "numpy"),
            zero_stage=cfg.zero.stage, zero_profile=cfg.zero.profile,
            resumed_from_step=start,
        )
        write_run_summary(self.out_dir, summary)
        return summary

def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry: join the process group, train, leave."""
    parser = argparse.ArgumentParser(prog="torchlm.worker", description=__doc__.split("\n")[0])
    add_train_args(parser)
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is used
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = for_framework(load_config(args.config, args.overrides), "torch")
    init_process_group()
    try:
        Trainer(cfg, args).run()
    except NonFiniteError:  # printed by rank 0 (Trainer.write_stop)
        # under `torchlm train` the launcher turns stopped.json into exit status 3; a
        # worker exit status would only add torchrun's failure report and traceback
        return 0 if LAUNCH_TIME_ENV in os.environ else EXIT_NON_FINITE
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
