"""What both trainers share around their training loop: the ``train`` command-line flags,
the ``run_summary.json`` record, package versions and peak memory.

Imports neither jax nor torch: versions are read from the installed distributions'
metadata, and device memory is passed in by the trainer (this module only knows the
process's resident-set peak).

``train`` flags (both ``jaxlm train`` and ``torchlm train``)::

    CONFIG [k=v ...] [--init-weights FILE] [--dump-grads STEPS] [--dump-params STEPS]
    [--no-resume] [--no-progress]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from lmspec import flops
from lmspec.cli import add_config_args
from lmspec.config import ExperimentConfig
from lmspec.errors import UserError
from lmspec.io import atomic_write_json

RUN_SUMMARY = "run_summary.json"

# Fields every run_summary.json holds (a trainer may add its own after these).
SUMMARY_FIELDS = (
    "side", "precision", "steps", "start_step", "num_devices", "num_processes",
    "device_kind", "num_micro_batches", "tokens_per_s", "tokens_per_s_total", "step_time_s",
    "mfu", "startup_s", "peak_memory_bytes", "peak_memory_per_device_bytes", "final_loss",
    "versions",
)


# ----------------------------------------------------------------------------- flags


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [k=v ...]`` and the flags every trainer's ``train`` command takes."""
    add_config_args(parser)
    parser.add_argument("--init-weights", metavar="FILE",
                        help="HF-named fp32 safetensors to start from (strict load)")
    parser.add_argument("--dump-grads", default="", metavar="STEPS",
                        help="write dumps/grads_step<s>.safetensors (accumulated, pre-clip, "
                        "fp32) for these steps, e.g. 0,3")
    parser.add_argument("--dump-params", default="", metavar="STEPS",
                        help="write dumps/params_step<s>.safetensors after these steps' update")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from step 0 even if out_dir holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_steps(text: str, flag: str) -> tuple[int, ...]:
    """``"0,3"`` -> ``(0, 3)`` (sorted, unique; empty means none); a UserError naming
    ``flag`` otherwise."""
    if not text.strip():
        return ()
    steps = set()
    for part in text.split(","):
        try:
            s = int(part)
        except ValueError:
            raise UserError(
                f"{flag}={text!r}: expected comma-separated step numbers, e.g. 0,3"
            ) from None
        if s < 0:
            raise UserError(f"{flag}={text!r}: steps must be >= 0")
        steps.add(s)
    return tuple(sorted(steps))


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """The ``train`` flags, parsed and checked against the config."""

    init_weights: str | None = None
    dump_grads: tuple[int, ...] = ()
    dump_params: tuple[int, ...] = ()
    resume: bool = True
    progress: bool = True


def check_dump_steps(train_steps: int, dump_grads: Sequence[int] = (),
                     dump_params: Sequence[int] = ()) -> None:
    """A UserError naming the flag when a dump step is outside ``[0, train.steps)``."""
    for flag, steps in (("--dump-grads", dump_grads), ("--dump-params", dump_params)):
        bad = sorted(s for s in steps if not 0 <= s < train_steps)
        if bad:
            raise UserError(f"{flag}: steps {bad} are outside [0, train.steps={train_steps})")


def train_args(args: argparse.Namespace, cfg: ExperimentConfig) -> TrainArgs:
    """:class:`TrainArgs` from a namespace built by :func:`add_train_args`."""
    out = TrainArgs(
        init_weights=args.init_weights,
        dump_grads=parse_steps(args.dump_grads, "--dump-grads"),
        dump_params=parse_steps(args.dump_params, "--dump-params"),
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    check_dump_steps(cfg.train.steps, out.dump_grads, out.dump_params)
    return out


# ----------------------------------------------------------------------------- environment


def versions(*distributions: str) -> dict[str, str]:
    """``{"python": ..., name: version}`` of installed distributions (pip names, e.g.
    ``orbax-checkpoint``), read from their metadata without importing them; a missing
    one is reported as ``"not installed"``."""
    out = {"python": platform.python_version()}
    for name in distributions:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (``ru_maxrss``, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------- summary


def run_summary(*, side: str, cfg: ExperimentConfig, step_times: Sequence[float],
                start_step: int, num_devices: int, num_processes: int, device_kind: str,
                num_micro_batches: int, peak_memory_bytes: int,
                peak_memory_per_device_bytes: int | None,
                startup_s: float | None, final_loss: float | None,
                versions: dict[str, str], **extra: Any) -> dict[str, Any]:
    """The ``run_summary.json`` record.

    ``step_times`` are the seconds of each step this process ran (resumed runs: only
    those); the first ``train.warmup_steps_excluded`` are left out unless no step would
    be left. ``tokens_per_s`` (per device) and ``tokens_per_s_total`` are the tokens of
    the timed steps over their total time, ``step_time_s`` their mean: a mean of per-step
    rates would let one short step (a timer read one step late) inflate the figure.
    ``peak_memory_bytes`` is the largest process's peak (device memory on accelerators,
    resident set on CPU); ``peak_memory_per_device_bytes`` the largest device's (None
    where the framework cannot tell). ``extra`` fields are appended (e.g. ``compile_s``,
    ``zero_stage``, ``mesh``).
    """
    t = cfg.train
    kept = list(step_times[t.warmup_steps_excluded:]) or list(step_times)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    total_s = math.fsum(kept)
    tps = (tokens_per_step * len(kept) / total_s / num_devices
           if kept and total_s > 0 and all(s >= 0 for s in kept) else None)
    summary: dict[str, Any] = {
        "side": side,
        "precision": t.precision,
        "steps": t.steps,
        "start_step": start_step,
        "num_devices": num_devices,
        "num_processes": num_processes,
        "device_kind": device_kind,
        "num_micro_batches": num_micro_batches,
        "tokens_per_s": tps,
        "tokens_per_s_total": tps * num_devices if tps is not None else None,
        "step_time_s": total_s / len(kept) if kept else None,
        "mfu": flops.mfu(tps, cfg.model, cfg.data.seq_len, device_kind)
        if tps is not None else None,
        "startup_s": startup_s if startup_s is None or math.isfinite(startup_s) else None,
        "peak_memory_bytes": int(peak_memory_bytes),
        "peak_memory_per_device_bytes": (None if peak_memory_per_device_bytes is None
                                         else int(peak_memory_per_device_bytes)),
        "final_loss": final_loss,
        "versions": dict(versions),
    }
    summary.update(extra)
    return summary


def write_run_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``out_dir/run_summary.json`` atomically; returns its path."""
    missing = [k for k in SUMMARY_FIELDS if k not in summary]
    if missing:
        raise ValueError(f"run summary lacks fields {missing}")
    return atomic_write_json(Path(out_dir) / RUN_SUMMARY, summary)


# ----------------------------------------------------------------------------- run folders

# ``{framework}`` in train.out_dir becomes this per trainer, so that `jaxlm train` and
# `torchlm train` of one config never share a folder
FRAMEWORK_NAMES = {"jax": "jax", "torch": "ds"}
FRAMEWORK_PLACEHOLDER = "{framework}"


def for_framework(cfg: ExperimentConfig, side: str) -> ExperimentConfig:
    """``cfg`` with ``{framework}`` in ``train.out_dir`` replaced by this trainer's name
    (``jax`` or ``ds``); unchanged when there is none."""
    from dataclasses import replace

    out = cfg.train.out_dir
    if FRAMEWORK_PLACEHOLDER not in out:
        return cfg
    return replace(cfg, train=replace(
        cfg.train, out_dir=out.replace(FRAMEWORK_PLACEHOLDER, FRAMEWORK_NAMES[side])))


def checkpoint_kinds(out_dir: str | os.PathLike) -> set[str]:
    """Whose checkpoints ``out_dir/checkpoints`` holds: ``"torch"`` (DeepSpeed's
    ``latest`` file or ``step<N>`` tag folders) and/or ``"jax"`` (Orbax step folders named
    by a number); empty when there is none."""
    ck = Path(out_dir) / "checkpoints"
    if not ck.is_dir():
        return set()
    names = [p.name for p in ck.iterdir()]
    kinds = set()
    if "latest" in names or any(n.startswith("step") for n in names):
        kinds.add("torch")
    if any(n.isdigit() for n in names):
        kinds.add("jax")
    return kinds


def check_run_owner(out_dir: str | os.PathLike, side: str) -> None:
    """A UserError when ``out_dir`` holds the other trainer's run (its checkpoints or its
    run summary): resuming, or starting over, there would mix or replace its files."""
    import json

    out = Path(out_dir)
    other = None
    kinds = checkpoint_kinds(out)
    if side == "jax" and "torch" in kinds:
        other = "DeepSpeed (torchlm) checkpoints"
    if side == "torch" and "jax" in kinds:
        other = "Orbax (jaxlm) checkpoints"
    summary = out / "run_summary.json"
    if other is None and summary.is_file():
        try:
            theirs = json.loads(summary.read_text()).get("side")
        except (OSError, ValueError, AttributeError):
            theirs = None
        if theirs in FRAMEWORK_NAMES and theirs != side:
            other = f"a {'jaxlm' if theirs == 'jax' else 'torchlm'} run (run_summary.json)"
    if other is not None:
        mine = "jaxlm" if side == "jax" else "torchlm"
        raise UserError(
            f"train.out_dir={out} holds {other}; {mine} will not resume from, or write over, "
            "another trainer's run. Choose another train.out_dir (e.g. put {framework} in "
            "it: runs/NAME-{framework} becomes runs/NAME-jax and runs/NAME-ds)")
