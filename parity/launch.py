"""Launching the trainers of a parity run: the plan, the command line contract, the
subprocesses (with a progress bar and a timeout) and reading what each run left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.metrics import read_metrics
from lmspec.weights import load_safetensors

SIDES = ("jax", "torch")


def log(msg: str) -> None:
    """One progress line, flushed (the harness's own output goes to stdout)."""
    print(f"[parity] {msg}", flush=True)


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunSpec:
    """One trainer subprocess."""

    label: str
    side: str  # "jax" | "torch"
    precision: str
    zero_stage: int | None
    steps: int
    out_dir: Path


def run_label(side: str, precision: str, zero_stage: int | None) -> str:
    return f"jax {precision}" if side == "jax" else f"ds zero{zero_stage} {precision}"


def floor_stages(zero_stages: Sequence[int]) -> tuple[int, ...]:
    """The DeepSpeed stages a precision runs: the requested ones, plus one more when only
    one is requested, because every noise floor of a training curve is the distance
    between two DeepSpeed stages (1 gets 2; any other stage gets 1)."""
    stages = tuple(zero_stages)
    if len(stages) == 1:
        stages += (2 if stages[0] == 1 else 1,)
    return stages


def plan_runs(out: Path, zero_stages: Sequence[int], precisions: Sequence[str],
              steps_fp32: int, steps_bf16: int) -> list[RunSpec]:
    """The trainer runs a parity run needs (each run once): JAX per precision, DeepSpeed
    per precision and stage of :func:`floor_stages`."""
    runs: list[RunSpec] = []

    def add(side: str, prec: str, stage: int | None, steps: int) -> None:
        label = run_label(side, prec, stage)
        name = label.replace(" ", "_")
        runs.append(RunSpec(label, side, prec, stage, steps, out / "runs" / name))

    steps = {"fp32": steps_fp32, "bf16": steps_bf16}
    for prec in ("fp32", "bf16"):
        if prec in precisions:
            add("jax", prec, None, steps[prec])
    for stage in floor_stages(zero_stages):
        for prec in ("fp32", "bf16"):
            if prec in precisions:
                add("torch", prec, stage, steps[prec])
    return runs


# ----------------------------------------------------------------------------- subprocesses


def entry_cmd(pkg: str) -> list[str]:
    """Run ``<pkg>.cli:main`` with this interpreter (no PATH needed); its return value or
    SystemExit becomes the exit status."""
    code = f"import sys; from {pkg}.cli import main; sys.argv[0] = {pkg!r}; sys.exit(main())"
    return [sys.executable, "-c", code]


def default_trainer_cmd(side: str) -> list[str]:
    """``jaxlm train`` / ``torchlm train`` with this interpreter."""
    return entry_cmd("jaxlm" if side == "jax" else "torchlm")


def gpu_available() -> bool:
    """An NVIDIA GPU is visible (checked without importing jax or torch)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def jax_env(base: Mapping[str, str], cpu_devices: int | None) -> dict[str, str]:
    """Environment of a JAX subprocess: on CPU exactly ``cpu_devices`` virtual devices."""
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    if cpu_devices is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={cpu_devices}"
                            ).strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def trainer_args(spec: RunSpec, config_path: Path, init_path: Path | None,
                 dump: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """Arguments after the trainer command: the contract's flags for one run."""
    args = ["train", str(config_path),
            f"train.steps={spec.steps}", f"train.precision={spec.precision}",
            f"train.out_dir={spec.out_dir}",
            # validation does not touch training state; leaving it out saves time
            "train.eval_every=0"]
    if spec.zero_stage is not None:
        args.append(f"zero.stage={spec.zero_stage}")
    args += list(extra)
    if init_path is not None:
        args += ["--init-weights", str(init_path)]
    if dump:
        args += ["--dump-grads", "0", "--dump-params", "0"]
    args.append("--no-resume")
    return args


def run_trainer(cmd: list[str], env: Mapping[str, str], out_dir: Path, steps: int,
                label: str, timeout_s: float | None = None) -> tuple[int, float, str]:
    """Run one trainer, log to ``out_dir/train.log``, show a progress bar fed by its
    ``metrics.jsonl``. Returns (exit status, seconds, last lines of the log)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    logfile = out_dir / "train.log"
    metrics = out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    with open(logfile, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True)
        bar = tqdm(total=steps, desc=f"  {label}", unit="step", leave=False, disable=None,
                   file=sys.stderr)
        done = 0
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    _kill(proc)
                    rc = 124
                    lf.write(f"\n[parity] killed after {timeout_s:.0f} s (timeout)\n")
                    break
                n = _count_lines(metrics)
                if n > done:
                    bar.update(n - done)
                    done = n
        except BaseException:
            _kill(proc)
            raise
        finally:
            bar.close()
    elapsed = time.perf_counter() - t0
    tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
    return rc, elapsed, tail


def _kill(proc: subprocess.Popen) -> None:
    """End the trainer and the workers it started (its own process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


# ----------------------------------------------------------------------------- run data


@dataclass
class RunData:
    """What one trainer left behind."""

    spec: RunSpec
    metrics: list[dict[str, Any]] = field(default_factory=list)
    grads0: dict[str, np.ndarray] | None = None
    params0: dict[str, np.ndarray] | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    def series(self, key: str, steps: int | None = None) -> list[Any]:
        recs = sorted(self.metrics, key=lambda r: r["step"])
        vals = [r[key] for r in recs]
        return vals if steps is None else vals[:steps]


def read_run(spec: RunSpec, dumps: bool = True) -> RunData:
    """Read metrics.jsonl, run_summary.json and the step-0 dumps of a finished run."""
    data = RunData(spec)
    d = spec.out_dir
    data.metrics = read_metrics(d / "metrics.jsonl")
    steps = sorted(r["step"] for r in data.metrics)
    if steps != list(range(spec.steps)):
        raise ValueError(f"{spec.label}: metrics.jsonl has steps {steps[:5]}... "
                         f"({len(steps)} records), expected 0..{spec.steps - 1}")
    summary = d / "run_summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{spec.label}: {summary} was not written")
    data.summary = json.loads(summary.read_text())
    if dumps:
        data.grads0 = load_safetensors(d / "dumps" / "grads_step0.safetensors")
        data.params0 = load_safetensors(d / "dumps" / "params_step0.safetensors")
    return data


def train_all(plan: Sequence[RunSpec], trainer_cmd: Any, config_path: Path, init_path: Path,
              jax_devices: int | None, world_size: int, timeout_s: float | None,
              begin: Any, end: Any, errors: list[str]) -> dict[str, RunData]:
    """Run every planned trainer in turn (one phase each, via ``begin``/``end``); a failed
    or unreadable run is recorded in ``errors`` and as a :class:`RunData` with ``error``."""
    runs: dict[str, RunData] = {}
    for spec in plan:
        what = (f"train {spec.label} ({spec.steps} steps"
                + (f", {jax_devices} virtual CPU devices" if spec.side == "jax" and jax_devices
                   else "")
                + (f", world size {world_size}" if spec.side == "torch" else "") + ")")
        t0 = begin(what)
        if spec.out_dir.exists():
            shutil.rmtree(spec.out_dir)
        cmd = trainer_cmd(spec.side) + trainer_args(spec, config_path, init_path)
        env = jax_env(os.environ, jax_devices) if spec.side == "jax" else dict(os.environ)
        rc, secs, tail = run_trainer(cmd, env, spec.out_dir, spec.steps, spec.label, timeout_s)
        if rc != 0:
            msg = (f"{spec.label}: trainer exited with status {rc} after {secs:.0f} s; "
                   f"log {spec.out_dir / 'train.log'}:\n{tail}")
            errors.append(msg)
            runs[spec.label] = RunData(spec, error=msg, seconds=secs)
            log(f"  FAILED (exit {rc}); last lines of the log:\n{tail}")
            continue
        try:
            data = read_run(spec)
            data.seconds = secs
            runs[spec.label] = data
            loss = data.series("loss")
            end(t0, f"loss {loss[0]:.4f} -> {loss[-1]:.4f}")
        except (OSError, ValueError, KeyError) as e:
            msg = f"{spec.label}: outputs unreadable: {type(e).__name__}: {e}"
            errors.append(msg)
            runs[spec.label] = RunData(spec, error=msg, seconds=secs)
            log(f"  FAILED: {msg}")
    return runs


def ok_run(runs: Mapping[str, RunData], label: str) -> RunData | None:
    """The run ``label`` if it finished and was read, else None."""
    r = runs.get(label)
    return r if r is not None and r.error is None else None
