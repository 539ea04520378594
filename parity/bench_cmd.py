"""``parity bench CONFIG [k=v ...]``: throughput of both trainers on identical work.

Both sides train the same config (global batch, sequence length, precision, steps) from
the same weights, one after the other on the same machine; the figures come from each
trainer's ``run_summary.json`` (warm-up steps ``train.warmup_steps_excluded`` left out,
compilation / start-up reported apart). On CPU the JAX trainer gets as many virtual
devices as DeepSpeed has processes (``zero.world_size``), so per-device figures compare
like for like. The last line printed is the JAX/DeepSpeed tokens/s ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmspec.cli import add_config_args, config_from_args
from lmspec.config import ExperimentConfig, save_config

DEFAULT_STEPS = 20


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity bench`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="throughput of JAX vs DeepSpeed on identical work; last line: the ratio",
        description="Train both sides for --steps steps on the same config and weights and "
        "print tokens/s per device, MFU, step time and peak memory for each, then the "
        "JAX/DeepSpeed tokens/s ratio.",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"steps per side (default {DEFAULT_STEPS}; the first "
                   "train.warmup_steps_excluded are not timed)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="keep the runs under DIR (default: a temporary folder, removed)")
    p.add_argument("--jax-devices", type=int, default=None, metavar="N",
                   help="virtual CPU devices of the JAX trainer (default: zero.world_size; "
                   "ignored on GPU)")
    p.add_argument("--run-timeout", type=float, default=1800.0, metavar="S",
                   help="kill a trainer after S seconds (default 1800)")
    p.set_defaults(func=_run)
    return p


def run_bench(cfg: ExperimentConfig, steps: int, out: Path, jax_devices: int | None = None,
              run_timeout_s: float | None = 1800.0,
              trainer_cmd: Callable[[str], list[str]] | None = None) -> dict[str, Any]:
    """Run both trainers (JAX first) and return ``{"jax": summary, "torch": summary,
    "ratio": jax tokens/s per device / DeepSpeed tokens/s per device}``."""
    import json

    from lmspec.data import Dataset
    from lmspec.weights import init_weights, save_safetensors
    from parity import run as P

    if steps <= cfg.train.warmup_steps_excluded:
        raise ValueError(f"--steps={steps} must be > train.warmup_steps_excluded="
                         f"{cfg.train.warmup_steps_excluded} (those steps are not timed)")
    if jax_devices is not None and jax_devices < 1:
        raise ValueError(f"--jax-devices={jax_devices} must be >= 1")
    trainer_cmd = trainer_cmd or P.default_trainer_cmd
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = P.gpu_available()
    n_jax = None if on_gpu else (jax_devices or cfg.zero.world_size)
    P.log(f"bench {cfg.name}: {steps} steps per side, precision {cfg.train.precision}, "
          f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len}, "
          f"JAX on {'all GPUs' if on_gpu else f'{n_jax} virtual CPU devices'}, DeepSpeed "
          f"ZeRO-{cfg.zero.stage} world size {cfg.zero.world_size}")
    Dataset.from_config(cfg)  # build the token cache once, outside the timed runs
    init_path = save_safetensors(init_weights(cfg.model, cfg.train.seed),
                                 out / "init_weights.safetensors")
    config_path = out / "config.yaml"
    save_config(cfg, config_path)
    result: dict[str, Any] = {"steps": steps, "config": cfg.name}
    for side in ("jax", "torch"):
        spec = P.RunSpec(f"{side} {cfg.train.precision}", side, cfg.train.precision,
                         cfg.zero.stage if side == "torch" else None, steps, out / side)
        if spec.out_dir.exists():
            shutil.rmtree(spec.out_dir)
        cmd = trainer_cmd(side) + P.trainer_args(spec, config_path, init_path, dump=False)
        env = P.jax_env(os.environ, n_jax) if side == "jax" else dict(os.environ)
        rc, secs, tail = P.run_trainer(cmd, env, spec.out_dir, steps, spec.label,
                                       run_timeout_s)
        if rc != 0:
            raise RuntimeError(f"{side} trainer exited with status {rc} after {secs:.0f} s; "
                               f"log {spec.out_dir / 'train.log'}:\n{tail}")
        summary_path = spec.out_dir / "run_summary.json"
        if not summary_path.is_file():
            raise RuntimeError(f"{side} trainer wrote no {summary_path}")
        result[side] = json.loads(summary_path.read_text())
        P.log(f"  {side} done in {secs:.1f} s")
    tj, tt = result["jax"].get("tokens_per_s"), result["torch"].get("tokens_per_s")
    result["ratio"] = (float(tj) / float(tt)) if tj and tt else float("nan")
    return result


def format_bench(result: dict[str, Any]) -> list[str]:
    """The printed table; the last line is the ratio."""
    from parity.report import fmt

    lines = [f"{'':10}{'devices':>8}{'tokens/s/dev':>14}{'tokens/s':>12}{'MFU':>10}"
             f"{'step time':>12}{'peak mem/proc':>15}{'compile/start':>15}"]
    kinds = []
    for side, name in (("jax", "JAX"), ("torch", "DeepSpeed")):
        s = result[side]
        start = s.get("compile_s", s.get("startup_s"))
        mem = s.get("peak_memory_bytes")
        lines.append(
            f"{name:10}{str(s.get('num_devices', '-')):>8}"
            f"{fmt(s.get('tokens_per_s')):>14}{fmt(s.get('tokens_per_s_total')):>12}"
            f"{fmt(s.get('mfu')):>10}{fmt(s.get('step_time_s')) + ' s':>12}"
            f"{('-' if mem is None else f'{mem / 2**20:.0f} MiB'):>15}"
            f"{('-' if start is None else fmt(start) + ' s'):>15}"
        )
        kinds.append(f"{name} {s.get('num_devices', '-')} x {s.get('device_kind', '-')}")
    lines.append("devices: " + "; ".join(kinds) + f"; {result['steps']} steps per side, "
                 "warm-up steps excluded")
    lines.append(f"JAX/DeepSpeed tokens/s per device ratio: {result['ratio']:.3f}")
    return lines


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="parity-bench-")
        out = Path(tmp)
    try:
        result = run_bench(cfg, args.steps, out, args.jax_devices, args.run_timeout)
    except RuntimeError as e:  # a trainer failed: its log tail is in the message
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for line in format_bench(result):
        print(line, flush=True)
    return 0
