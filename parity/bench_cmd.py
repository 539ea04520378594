"""``parity bench CONFIG [k=v ...]``: throughput of both trainers on identical work.

Both sides train the same config (global batch, sequence length, precision, steps) from
the same weights, one after the other on the same machine: JAX once, then DeepSpeed once
per ZeRO stage of ``--zero-stages`` (default: the config's ``zero.stage``) under the
DeepSpeed settings profile ``--ds-profile`` (default ``bench``: fused AdamW,
``overlap_comm``, fused flash attention, what users run for speed; ``parity``: the
bitwise-strict settings of ``parity run``). The figures come from each trainer's
``run_summary.json`` (warm-up steps ``train.warmup_steps_excluded`` left out,
compilation / start-up reported apart). On CPU the JAX trainer gets as many virtual
devices as DeepSpeed has processes (``zero.world_size``), so per-device figures compare
like for like; on GPU DeepSpeed needs ``zero.world_size`` <= the number of GPUs (one GPU:
``zero.world_size=1``).

Output: one table row per side and stage, one ratio line per stage, and last the
JAX/DeepSpeed tokens/s per device ratio against the fastest DeepSpeed stage.
``--json PATH`` writes the whole result (temp file, then rename).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmspec.cli import add_config_args, config_from_args, zero_stages_arg
from lmspec.config import ZERO_PROFILES, ExperimentConfig, save_config
from lmspec.errors import UserError
from lmspec.io import check_output_file, ensure_writable_dir
from parity.profiles import without_wandb

DEFAULT_STEPS = 20
DEFAULT_DS_PROFILE = "bench"
PROFILE_NOTES = {"bench": "fused AdamW, overlap_comm, fused flash attention",
                 "parity": "bitwise-strict: unfused AdamW, no overlap_comm, repeat_kv attention"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity bench`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="throughput of JAX vs DeepSpeed on identical work; last line: the ratio",
        description="Train JAX once and DeepSpeed once per ZeRO stage for --steps steps on "
        "the same config and weights; print tokens/s per device, MFU, step time and peak "
        "memory for each, a JAX/DeepSpeed ratio per stage, and last the ratio against the "
        "fastest DeepSpeed stage.",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"steps per run (default {DEFAULT_STEPS}; the first "
                   "train.warmup_steps_excluded are not timed)")
    p.add_argument("--zero-stages", type=zero_stages_arg, default=None, metavar="LIST",
                   help="DeepSpeed ZeRO stages, one run each, e.g. 2,3 (default: zero.stage)")
    p.add_argument("--ds-profile", choices=ZERO_PROFILES, default=DEFAULT_DS_PROFILE,
                   help="DeepSpeed settings: bench (fused AdamW, overlap_comm, flash "
                   "attention; the default) or parity (the bitwise-strict settings)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the whole result as JSON (atomically)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="keep the runs under DIR (default: a temporary folder, removed)")
    p.add_argument("--jax-devices", type=int, default=None, metavar="N",
                   help="virtual CPU devices of the JAX trainer (default: zero.world_size; "
                   "ignored on GPU)")
    p.add_argument("--run-timeout", type=float, default=1800.0, metavar="S",
                   help="kill a trainer after S seconds (default 1800)")
    p.set_defaults(func=_run)
    return p


def _check(cfg: ExperimentConfig, steps: int, jax_devices: int | None,
           stages: Sequence[int], ds_profile: str, num_gpus: int) -> None:
    """UserError naming the option for impossible requests."""
    if steps <= cfg.train.warmup_steps_excluded:
        raise UserError(f"--steps={steps} must be > train.warmup_steps_excluded="
                         f"{cfg.train.warmup_steps_excluded} (those steps are not timed)")
    if jax_devices is not None and jax_devices < 1:
        raise UserError(f"--jax-devices={jax_devices} must be >= 1")
    if not stages:
        raise UserError("--zero-stages: give at least one of 0, 1, 2, 3")
    for s in stages:
        if s not in (0, 1, 2, 3):
            raise UserError(f"--zero-stages: {s} is not a ZeRO stage; allowed: 0, 1, 2, 3")
    if len(set(stages)) != len(stages):
        raise UserError(f"--zero-stages: {list(stages)} repeats a stage")
    if ds_profile not in ZERO_PROFILES:
        raise UserError(f"--ds-profile={ds_profile!r}: allowed are {list(ZERO_PROFILES)}")
    if num_gpus and cfg.zero.world_size > num_gpus:
        raise UserError(f"zero.world_size={cfg.zero.world_size} but this machine has "
                         f"{num_gpus} GPU(s): set zero.world_size={num_gpus}")


def run_bench(cfg: ExperimentConfig, steps: int, out: Path, jax_devices: int | None = None,
              run_timeout_s: float | None = 1800.0,
              trainer_cmd: Callable[[str], list[str]] | None = None,
              zero_stages: Sequence[int] | None = None,
              ds_profile: str = DEFAULT_DS_PROFILE) -> dict[str, Any]:
    """Run JAX once and DeepSpeed once per stage; return the result: the set-up, ``jax``
    (its run summary), ``torch`` (stage -> run summary, keys as strings), ``ratios``
    (stage -> JAX / DeepSpeed tokens/s per device) and ``ratio`` (against the fastest
    DeepSpeed stage, ``ratio_stage``)."""
    import json

    from lmspec.data import Dataset
    from lmspec.weights import init_weights, save_safetensors
    from parity import run as P
    from parity.gpu_env import gpus

    stages = tuple(zero_stages) if zero_stages is not None else (cfg.zero.stage,)
    on_gpu = P.gpu_available()
    _check(cfg, steps, jax_devices, stages, ds_profile, len(gpus()) if on_gpu else 0)
    trainer_cmd = trainer_cmd or P.default_trainer_cmd
    out = ensure_writable_dir(Path(out).resolve(), "--out")
    n_jax = None if on_gpu else (jax_devices or cfg.zero.world_size)
    P.log(f"bench {cfg.name}: {steps} steps per run, precision {cfg.train.precision}, "
          f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len}, "
          f"JAX on {'all GPUs' if on_gpu else f'{n_jax} virtual CPU devices'}, DeepSpeed "
          f"ZeRO-{','.join(map(str, stages))} world size {cfg.zero.world_size}, "
          f"profile {ds_profile} ({PROFILE_NOTES[ds_profile]})")
    Dataset.from_config(cfg)  # build the token cache once, outside the timed runs
    init_path = save_safetensors(init_weights(cfg.model, cfg.train.seed),
                                 out / "init_weights.safetensors")
    config_path = out / "config.yaml"
    cfg = without_wandb(cfg, P.log)
    save_config(cfg, config_path)
    result: dict[str, Any] = {
        "config": cfg.name, "steps": steps, "precision": cfg.train.precision,
        "seq_len": cfg.data.seq_len, "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size, "world_size": cfg.zero.world_size,
        "ds_profile": ds_profile, "zero_stages": list(stages),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": {},
    }
    runs = [("jax", None)] + [("torch", s) for s in stages]
    for side, stage in runs:
        name = "jax" if side == "jax" else f"torch_zero{stage}"
        spec = P.RunSpec(f"{name} {cfg.train.precision}", side, cfg.train.precision,
                         stage, steps, out / name)
        if spec.out_dir.exists():
            shutil.rmtree(spec.out_dir)
        extra = [f"zero.profile={ds_profile}"] if side == "torch" else []
        cmd = trainer_cmd(side) + P.trainer_args(spec, config_path, init_path, dump=False,
                                                 extra=extra)
        env = P.jax_env(os.environ, n_jax) if side == "jax" else dict(os.environ)
        rc, secs, tail = P.run_trainer(cmd, env, spec.out_dir, steps, spec.label,
                                       run_timeout_s)
        if rc != 0:
            raise RuntimeError(f"{name} trainer exited with status {rc} after {secs:.0f} s; "
                               f"log {spec.out_dir / 'train.log'}:\n{tail}")
        summary_path = spec.out_dir / "run_summary.json"
        if not summary_path.is_file():
            raise RuntimeError(f"{name} trainer wrote no {summary_path}")
        summary = json.loads(summary_path.read_text())
        if side == "jax":
            result["jax"] = summary
        else:
            result["torch"][str(stage)] = summary
        P.log(f"  {name} done in {secs:.1f} s")
    result.update(_ratios(result))
    return result


def _ratios(result: dict[str, Any]) -> dict[str, Any]:
    tj = result["jax"].get("tokens_per_s")
    ratios = {}
    for stage, s in result["torch"].items():
        tt = s.get("tokens_per_s")
        ratios[stage] = float(tj) / float(tt) if tj and tt else float("nan")
    fastest = max(result["torch"], key=lambda k: result["torch"][k].get("tokens_per_s") or 0)
    return {"ratios": ratios, "ratio": ratios[fastest], "ratio_stage": int(fastest)}


def format_bench(result: dict[str, Any]) -> list[str]:
    """The printed table and ratio lines; the last line is the JAX/DeepSpeed ratio
    against the fastest DeepSpeed stage."""
    from parity.report import fmt

    profile = result.get("ds_profile", "parity")
    rows = [("JAX", result["jax"])]
    for stage, s in result["torch"].items():
        ran = s.get("zero_profile", profile)  # what the trainer reports it ran
        rows.append((f"DeepSpeed ZeRO-{stage} ({ran})", s))
    width = max(len(n) for n, _ in rows) + 2
    lines = [f"{'':{width}}{'devices':>8}{'tokens/s/dev':>14}{'tokens/s':>12}{'MFU':>10}"
             f"{'step time':>12}{'peak mem/proc':>15}{'compile/start':>15}"]
    for name, s in rows:
        start = s.get("compile_s", s.get("startup_s"))
        mem = s.get("peak_memory_bytes")
        lines.append(
            f"{name:{width}}{str(s.get('num_devices', '-')):>8}"
            f"{fmt(s.get('tokens_per_s')):>14}{fmt(s.get('tokens_per_s_total')):>12}"
            f"{fmt(s.get('mfu')):>10}{fmt(s.get('step_time_s')) + ' s':>12}"
            f"{('-' if mem is None else f'{mem / 2**20:.0f} MiB'):>15}"
            f"{('-' if start is None else fmt(start) + ' s'):>15}"
        )
    devices = "; ".join(f"{n.split(' (')[0]} {s.get('num_devices', '-')} x "
                        f"{s.get('device_kind', '-')}" for n, s in rows[:2])
    lines.append(f"devices: {devices}; {result['steps']} steps per run, warm-up steps "
                 "excluded")
    lines.append(f"DeepSpeed profile: {profile} ({PROFILE_NOTES.get(profile, '?')})")
    for stage, r in result["ratios"].items():
        lines.append(f"ZeRO-{stage}: JAX/DeepSpeed tokens/s per device {r:.3f}")
    if len(result["ratios"]) > 1:
        lines.append(f"fastest DeepSpeed run: ZeRO-{result['ratio_stage']}")
    lines.append(f"JAX/DeepSpeed tokens/s per device ratio: {result['ratio']:.3f}")
    return lines


def _run(args: argparse.Namespace) -> int:
    from lmspec.io import atomic_write_json

    cfg = config_from_args(args)
    if args.json is not None:  # before the runs: a bench takes minutes, the write a moment
        check_output_file(args.json, "--json")
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="parity-bench-")
        out = Path(tmp)
    try:
        result = run_bench(cfg, args.steps, out, args.jax_devices, args.run_timeout,
                           zero_stages=args.zero_stages, ds_profile=args.ds_profile)
    except RuntimeError as e:  # a trainer failed: its log tail is in the message
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json is not None:
        atomic_write_json(args.json, result)
    for line in format_bench(result):
        print(line, flush=True)
    return 0
