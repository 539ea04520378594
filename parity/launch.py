"""Launching the trainers of a parity run: the plan, the command line contract, the
subprocesses (with a progress bar and a timeout) and reading what each run left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.metrics import read_metrics
from lmspec.weights import load_safetensors

SIDES = ("jax", "torch")


_LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    """One progress line, flushed (the harness's own output goes to stdout); whole lines
    when trainers run concurrently."""
    with _LOG_LOCK:
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
                label: str, timeout_s: float | None = None,
                stop: threading.Event | None = None,
                on_step: Any = None) -> tuple[int, float, str]:
    """Run one trainer, log to ``out_dir/train.log``, follow its ``metrics.jsonl``: a
    progress bar of its own, or ``on_step(n)`` per new step when given (concurrent runs
    share one bar). ``stop`` set, or ``timeout_s`` passed, ends the trainer and its
    workers. Returns (exit status, seconds, last lines of the log)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    logfile = out_dir / "train.log"
    metrics = out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    with open(logfile, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True)
        bar = None if on_step is not None else tqdm(
            total=steps, desc=f"  {label}", unit="step", leave=False, disable=None,
            file=sys.stderr)
        done = 0
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop is not None and stop.is_set():
                    _kill(proc)
                    rc = 130
                    lf.write("\n[parity] stopped (the parity run was interrupted)\n")
                    break
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    _kill(proc)
                    rc = 124
                    lf.write(f"\n[parity] killed after {timeout_s:.0f} s (timeout)\n")
                    break
                n = _count_lines(metrics)
                if n > done:
                    (bar.update if bar is not None else on_step)(n - done)
                    done = n
        except BaseException:
            _kill(proc)
            raise
        finally:
            if bar is not None:
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


def run_cost(spec: RunSpec) -> tuple[int, int]:
    """Sort key, most expensive first, for scheduling concurrent runs: steps, then the
    ZeRO stage (stage 3's hooks cost the most; JAX counts as 3)."""
    return (-spec.steps, -(3 if spec.zero_stage is None else spec.zero_stage))


def train_all(plan: Sequence[RunSpec], trainer_cmd: Any, config_path: Path, init_path: Path,
              jax_devices: int | None, world_size: int, timeout_s: float | None,
              begin: Any, end: Any, errors: list[str], jobs: int = 1,
              stop: threading.Event | None = None) -> dict[str, RunData]:
    """Run every planned trainer: one at a time (one phase each, via ``begin``/``end``),
    or ``jobs`` at a time, most expensive first, under one progress bar (``begin``/``end``
    unused: the caller makes the whole training one phase). A failed or unreadable run is
    recorded in ``errors`` and as a :class:`RunData` with ``error``; the result is in plan
    order either way."""
    runs: dict[str, RunData] = {}

    def describe(spec: RunSpec) -> str:
        return (f"train {spec.label} ({spec.steps} steps"
                + (f", {jax_devices} virtual CPU devices" if spec.side == "jax" and jax_devices
                   else "")
                + (f", world size {world_size}" if spec.side == "torch" else "") + ")")

    def one(spec: RunSpec, on_step: Any = None) -> tuple[RunData, str]:
        """Run and read one trainer: (its data, the line that ends its phase)."""
        if spec.out_dir.exists():
            shutil.rmtree(spec.out_dir)
        cmd = trainer_cmd(spec.side) + trainer_args(spec, config_path, init_path)
        env = jax_env(os.environ, jax_devices) if spec.side == "jax" else dict(os.environ)
        rc, secs, tail = run_trainer(cmd, env, spec.out_dir, spec.steps, spec.label,
                                     timeout_s, stop=stop, on_step=on_step)
        if rc != 0:
            msg = (f"{spec.label}: trainer exited with status {rc} after {secs:.0f} s; "
                   f"log {spec.out_dir / 'train.log'}:\n{tail}")
            errors.append(msg)
            return (RunData(spec, error=msg, seconds=secs),
                    f"{spec.label} FAILED (exit {rc}); last lines of the log:\n{tail}")
        try:
            data = read_run(spec)
        except (OSError, ValueError, KeyError) as e:
            msg = f"{spec.label}: outputs unreadable: {type(e).__name__}: {e}"
            errors.append(msg)
            return RunData(spec, error=msg, seconds=secs), f"FAILED: {msg}"
        data.seconds = secs
        loss = data.series("loss")
        return data, f"loss {loss[0]:.4f} -> {loss[-1]:.4f}"

    if jobs <= 1:
        for spec in plan:
            t0 = begin(describe(spec))
            data, line = one(spec)
            runs[spec.label] = data
            if data.error is None:
                end(t0, line)
            else:
                log(f"  {line}")
        return runs

    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    bar = tqdm(total=sum(s.steps for s in plan), desc="  training", unit="step",
               leave=False, disable=None, file=sys.stderr)
    bar_lock = threading.Lock()

    def on_step(n: int) -> None:
        with bar_lock:
            bar.update(n)

    def job(spec: RunSpec) -> RunData:
        log(f"  start {describe(spec)}")
        data, line = one(spec, on_step)
        log(f"  {spec.label}: {line}" + (f" in {data.seconds:.1f} s" if data.error is None
                                          else ""))
        return data

    stop = stop if stop is not None else threading.Event()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="trainer")
    try:
        futures = {s.label: pool.submit(job, s) for s in sorted(plan, key=run_cost)}
        for spec in plan:
            runs[spec.label] = futures[spec.label].result()
    except BaseException:
        stop.set()  # running trainers end within a poll (0.5 s); queued ones never start
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return runs


def ok_run(runs: Mapping[str, RunData], label: str) -> RunData | None:
    """The run ``label`` if it finished and was read, else None."""
    r = runs.get(label)
    return r if r is not None and r.error is None else None
