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
wrapped torch AdamW used for the update; ``val_loss`` (when ``train.eval_every`` > 0,
every ``eval_every`` steps and at the last one) is the token mean over
``train.eval_batches`` validation batches of ``global_batch_size`` windows, with the
weights after that step's update.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lmspec import flops
from lmspec.cli import add_config_args
from lmspec.config import ConfigError, ExperimentConfig, load_config, save_config
from lmspec.data import Dataset, fingerprint
from lmspec.io import atomic_write_json
from lmspec.metrics import MetricsWriter
from lmspec.weights import init_weights
from lmspec.weights import load_safetensors as load_np_safetensors
from lmspec.weights import save_safetensors as save_np_safetensors
from torchlm.api import configure_torch
from torchlm.ds_config import build_ds_config, build_optimizer, build_scheduler
from torchlm.model import Llama, token_loss
from torchlm.weights import load_numpy

CKPT_SUBDIR = "checkpoints"
FINAL_WEIGHTS = "model.safetensors"
# testing hook: "RANK:STEP" makes that rank raise at the start of that step
FAIL_ENV = "TORCHLM_FAIL_AT"
LAUNCH_TIME_ENV = "TORCHLM_LAUNCH_TIME"


def parse_steps(text: str) -> tuple[int, ...]:
    """``"0,3"`` -> ``(0, 3)``; an empty string means none."""
    if not text.strip():
        return ()
    try:
        steps = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated step numbers, e.g. 0,3"
        ) from None
    if any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"{text!r}: step numbers must be >= 0")
    return steps


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The trainer flags shared with ``jaxlm train`` (see the notes' CLI contract)."""
    add_config_args(parser)
    parser.add_argument("--init-weights", metavar="FILE",
                        help="HF-named fp32 safetensors to start from (strict load)")
    parser.add_argument("--dump-grads", type=parse_steps, default=(), metavar="STEPS",
                        help="write dumps/grads_step<s>.safetensors for these steps, e.g. 0,3")
    parser.add_argument("--dump-params", type=parse_steps, default=(), metavar="STEPS",
                        help="write dumps/params_step<s>.safetensors after these steps' update")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from step 0 even if out_dir holds a checkpoint")


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Tag of the latest complete checkpoint in ``out_dir`` (DeepSpeed's ``latest``)."""
    latest = Path(out_dir) / CKPT_SUBDIR / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (latest.parent / tag).is_dir() else None


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


def _versions() -> dict[str, str]:
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class Trainer:
    """One worker's view of a DeepSpeed training run (construct inside the process group)."""

    def __init__(self, cfg: ExperimentConfig, args: argparse.Namespace) -> None:
        import deepspeed

        self.cfg = cfg
        self.args = args
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
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
            configure_torch(num_threads=max(1, (os.cpu_count() or 1) // local_world))
        configure_torch()
        torch.manual_seed(cfg.train.seed)

        self.data = Dataset.from_config(cfg, progress=False)
        self.gas = cfg.grad_accum_steps(self.world)
        self.micro = cfg.train.micro_batch_size
        self.seq_len = cfg.data.seq_len

        model = Llama(cfg.model)
        if args.init_weights:
            self.init_weights = load_np_safetensors(args.init_weights)
            load_numpy(model, self.init_weights, where=args.init_weights)
        else:
            self.init_weights = init_weights(cfg.model, cfg.train.seed)
            load_numpy(model, self.init_weights, where="lmspec init")
        optimizer = build_optimizer(model, cfg, foreach=self.device.type == "cuda")
        scheduler = build_scheduler(optimizer, cfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, lr_scheduler=scheduler,
            config=build_ds_config(cfg, self.world),
        )
        # the torch AdamW that DeepSpeed wraps: its param groups hold the LR it steps with
        self.torch_optimizer = optimizer
        self.device_name = _device_name(self.device)

    # ------------------------------------------------------------------ pieces

    def _rows(self, step: int, micro_step: int) -> torch.Tensor:
        start = micro_step * self.micro * self.world + self.rank * self.micro
        rows = self.data.global_batch_rows(step, start, start + self.micro)
        return torch.from_numpy(rows).to(self.device, torch.int64)

    def _all_mean(self, value: torch.Tensor) -> float:
        """Mean over ranks of a float64 scalar."""
        t = value.detach().to(self.device, torch.float64).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def _own_grad_norm(self) -> float:
        """Global L2 norm of ``param.grad`` (ZeRO 0 fp32: full, rank-averaged grads)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt().item())

    def _dump(self, kind: str, step: int, tensors: dict[str, np.ndarray]) -> None:
        if self.rank == 0:
            save_np_safetensors(tensors, self.out_dir / "dumps" / f"{kind}_step{step}.safetensors")

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
        """DeepSpeed checkpoint ``step<NNNNNNNN>`` (next step to run as client state);
        keeps the newest ``train.ckpt_keep``."""
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"step": step})
        dist.barrier()
        if self.rank == 0:
            # oldest first by write time (a --no-resume run may follow higher-step tags)
            dirs = sorted((p for p in self.ckpt_dir.glob("step*") if p.is_dir()),
                          key=lambda p: (p.stat().st_mtime_ns, p.name))
            for old in dirs[: max(0, len(dirs) - self.cfg.train.ckpt_keep)]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def export_weights(self, path: str | os.PathLike) -> None:
        """Consolidated fp32 master weights, HF names (collective; rank 0 writes)."""
        from torchlm.gather import full_params

        params = full_params(self.engine)
        if self.rank == 0:
            save_np_safetensors(params, path)

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any] | None:
        """Train to ``train.steps``; returns the run summary on rank 0."""
        from torchlm.gather import full_grads, full_params, set_master_params

        cfg, t = self.cfg, self.cfg.train
        start = 0
        if not self.args.no_resume and latest_checkpoint(self.out_dir):
            path, client = self.engine.load_checkpoint(
                str(self.ckpt_dir), load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise RuntimeError(f"could not load the checkpoint in {self.ckpt_dir}")
            start = int(client["step"])
        else:
            set_master_params(self.engine, self.init_weights)
        self.init_weights = None  # free host memory
        writer = None
        if self.rank == 0:
            save_config(cfg, self.out_dir / "config.yaml")
            writer = MetricsWriter(self.out_dir / "metrics.jsonl", start_step=start)
        fail_at = os.environ.get(FAIL_ENV, "")
        tokens_per_step = self.gas * self.micro * self.seq_len  # per rank
        own_norm = cfg.zero.stage == 0 and t.precision == "fp32"
        step_times: list[float] = []
        first_step_wall = None
        bar = tqdm(total=t.steps, initial=start, disable=self.rank != 0, desc="torchlm train",
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        for step in range(start, t.steps):
            if fail_at == f"{self.rank}:{step}":
                raise RuntimeError(f"injected failure ({FAIL_ENV}) on rank {self.rank} at "
                                   f"step {step}")
            if first_step_wall is None:
                first_step_wall = time.time()
            self._sync()
            t0 = time.perf_counter()
            excluded = 0.0
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            norm = None
            lr = float("nan")
            for m in range(self.gas):
                w = self._rows(step, m)
                loss = token_loss(self.engine(w[:, :-1]), w[:, 1:])
                self.engine.backward(loss)
                loss_sum += loss.detach().double()
                if m == self.gas - 1:
                    # gradients are complete (accumulated and reduced) before step()
                    if step in self.args.dump_grads:
                        td = time.perf_counter()
                        self._dump("grads", step, full_grads(self.engine))
                        excluded += time.perf_counter() - td
                    if own_norm:
                        norm = self._own_grad_norm()
                    lr = float(self.torch_optimizer.param_groups[0]["lr"])
                self.engine.step()
            if norm is None:
                norm = self.engine.get_global_grad_norm()
                norm = float(norm) if norm is not None else float("nan")
            loss_mean = self._all_mean(loss_sum / self.gas)
            if step in self.args.dump_params:
                td = time.perf_counter()
                self._dump("params", step, full_params(self.engine))
                excluded += time.perf_counter() - td
            self._sync()
            dt = time.perf_counter() - t0 - excluded
            step_times.append(dt)
            tps = tokens_per_step / dt
            record: dict[str, Any] = {
                "step": step, "loss": loss_mean, "grad_norm": norm, "lr": lr,
                "tokens_per_s": tps,
                "mfu": flops.mfu(tps, cfg.model, self.seq_len, self.device_name),
                "batch_fingerprint": (fingerprint(self.data.global_batch(step))
                                      if self.rank == 0 else None),
                "wall_time": time.time(),
            }
            last = step + 1 == t.steps
            if t.eval_every and ((step + 1) % t.eval_every == 0 or last) \
                    and self.data.num_val_windows > 0:
                record["val_loss"] = self.evaluate()
            if writer is not None:
                writer.write(record)
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tps:.0f}")
                if (step + 1) % t.log_every == 0 or last:
                    val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
                    bar.write(f"step {step:6d} loss {loss_mean:.4f} grad_norm {norm:.4f} "
                              f"lr {lr:.3e} tokens/s/proc {tps:,.0f}{val}")
            bar.update(1)
            if (t.ckpt_every and (step + 1) % t.ckpt_every == 0) or last:
                self.save_checkpoint(step + 1)
        bar.close()
        if writer is not None:
            writer.close()
        self.export_weights(self.out_dir / FINAL_WEIGHTS)
        launch = float(os.environ.get(LAUNCH_TIME_ENV, "nan"))
        return self._summary(step_times, start, launch, first_step_wall)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _summary(self, step_times: list[float], start: int, launch: float,
                 first_step_wall: float | None) -> dict[str, Any] | None:
        cfg = self.cfg
        kept = step_times[cfg.train.warmup_steps_excluded:] or step_times
        tokens_per_step = self.gas * self.micro * self.seq_len
        tps = statistics.fmean(tokens_per_step / s for s in kept) if kept else None
        peak = torch.tensor([_peak_memory(self.device)], dtype=torch.float64,
                            device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the largest process
        if self.rank != 0:
            return None
        summary = {
            "side": "torch",
            "precision": cfg.train.precision,
            "steps": cfg.train.steps,
            "resumed_from_step": start,
            "num_devices": self.world,
            "zero_stage": cfg.zero.stage,
            "device_kind": self.device_name,
            "tokens_per_s": tps,
            "tokens_per_s_total": tps * self.world if tps is not None else None,
            "step_time_s": statistics.median(kept) if kept else None,
            "mfu": flops.mfu(tps, cfg.model, self.seq_len, self.device_name)
            if tps is not None else None,
            "startup_s": (first_step_wall - launch)
            if first_step_wall is not None and math.isfinite(launch) else None,
            "peak_memory_bytes": int(peak.item()),
            "versions": _versions(),
        }
        atomic_write_json(self.out_dir / "run_summary.json", summary)
        return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry: join the process group, train, leave."""
    parser = argparse.ArgumentParser(prog="torchlm.worker", description=__doc__.split("\n")[0])
    add_train_args(parser)
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is used
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    _fill_single_process_env()
    # DeepSpeed calls torch.distributed APIs that torch marks deprecated (noise per step)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated",
                            category=FutureWarning)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)
    try:
        Trainer(cfg, args).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
