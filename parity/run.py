"""The parity run: one set of weights and batches, both trainers, every check.

``run_parity`` is a sequence of named phases, each in its own module:
 1. data: build (or reuse) the token cache once, so the trainers never race to build it;
 2. weights: ``lmspec.weights.init_weights(model, train.seed)`` written as safetensors;
 3. forward (:mod:`parity.forward`): in-process logits of JAX, torch and Hugging Face on a
    validation batch;
 4. truth (:mod:`parity.truth`): float64 logits, step-0 loss and gradient of the same
    weights and batches;
 5. training (:mod:`parity.launch`): ``jaxlm train`` and ``torchlm train`` as subprocesses,
    per precision (and ZeRO stage for DeepSpeed), with step-0 gradient and parameter dumps;
 6. checks (:mod:`parity.checks`, judgement in :mod:`parity.judge`, multiples in
    :mod:`parity.limits`);
 7. diagnosis (:mod:`parity.diagnosis`): where the port went wrong, when a check fails;
 8. reports (:mod:`parity.report`, environment record from :mod:`parity.envinfo`).

The names other modules import from here (``RunSpec``, ``trainer_args``, ``run_trainer``,
``jax_env``, ``default_trainer_cmd``, ``gpu_available``, ``log``, ...) are re-exported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.config import ExperimentConfig, save_config
from lmspec.errors import UserError
from lmspec.io import ensure_writable_dir
from lmspec.metrics import read_metrics
from lmspec.weights import init_weights, load_safetensors, save_safetensors
from parity import compare as C
from parity.checks import training_checks
from parity.diagnosis import diagnose, truth_diagnosis, update_diagnosis
from parity.envinfo import VERSION_PACKAGES, hardware, versions
from parity.forward import FORWARD_ROWS, forward_batch, forward_checks, forward_logits
from parity.launch import (
    SIDES,
    RunData,
    RunSpec,
    default_trainer_cmd,
    entry_cmd,
    floor_stages,
    gpu_available,
    jax_env,
    log,
    plan_runs,
    read_run,
    run_label,
    run_trainer,
    train_all,
    trainer_args,
)
from parity.limits import BF16_STEPS, FP32_LOSS_STEPS
from parity.profiles import force_parity_profile, without_wandb
from parity.truth import Truth, compute_truth, float64_gradient

__all__ = [
    "DEFAULT_PRECISIONS", "DEFAULT_ZERO_STAGES", "FORWARD_ROWS", "SIDES", "VERSION_PACKAGES",
    "ParityOptions", "RunData", "RunSpec", "Truth", "compute_truth", "default_trainer_cmd",
    "diagnose", "entry_cmd", "float64_gradient", "floor_stages", "forward_checks",
    "forward_logits", "gpu_available", "hardware", "jax_env", "log", "plan_runs", "read_run",
    "run_label", "run_parity", "run_trainer", "trainer_args", "training_checks",
    "truth_diagnosis", "update_diagnosis", "validate_options", "versions",
]

DEFAULT_ZERO_STAGES = (1, 2, 3)
DEFAULT_PRECISIONS = ("fp32", "bf16")


@dataclass
class ParityOptions:
    """Everything ``parity run`` decides besides the config."""

    out: Path
    zero_stages: tuple[int, ...] = DEFAULT_ZERO_STAGES
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    steps_fp32: int = FP32_LOSS_STEPS
    steps_bf16: int = BF16_STEPS
    jax_devices: int | None = None  # CPU only; default: zero.world_size
    run_timeout_s: float | None = 1800.0
    forward: bool = True
    reuse_runs: bool = False  # judge the runs already under out/runs (no training)
    # trainers run at a time, alongside the in-process phases; None: 2 on CPU (a 2-core
    # machine gains ~15%), 1 on GPU (runs would share the GPU and its memory)
    jobs: int | None = None
    trainer_cmd: Callable[[str], list[str]] = default_trainer_cmd
    # (cfg, weights, step-0 global batch, forward tokens or None) -> Truth
    truth_fn: Callable[..., Truth] = compute_truth


def validate_options(opts: ParityOptions, cfg: ExperimentConfig) -> None:
    """UserError naming the option for bad stages, precisions, steps or device counts."""
    if not opts.zero_stages:
        raise UserError("--zero-stages: give at least one of 0, 1, 2, 3")
    for s in opts.zero_stages:
        if s not in (0, 1, 2, 3):
            raise UserError(f"--zero-stages: {s} is not a ZeRO stage; allowed: 0, 1, 2, 3")
    if len(set(opts.zero_stages)) != len(opts.zero_stages):
        raise UserError(f"--zero-stages: {list(opts.zero_stages)} repeats a stage")
    if not opts.precisions:
        raise UserError("--precisions: give at least one of fp32, bf16")
    for p in opts.precisions:
        if p not in DEFAULT_PRECISIONS:
            raise UserError(f"--precisions: {p!r}; allowed: fp32, bf16")
    for name in ("steps_fp32", "steps_bf16"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(opts, name)} must be >= 1")
    if opts.jax_devices is not None and opts.jax_devices < 1:
        raise UserError(f"--jax-devices={opts.jax_devices} must be >= 1")
    if opts.jobs is not None and opts.jobs < 1:
        raise UserError(f"--jobs={opts.jobs} must be >= 1")


class _Phases:
    """Numbered progress lines with timings."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0

    def begin(self, what: str) -> float:
        self.n += 1
        log(f"phase {self.n}/{self.total}: {what}")
        return time.perf_counter()

    def end(self, t0: float, what: str = "done") -> None:
        log(f"  {what} in {time.perf_counter() - t0:.1f} s")


def phase_forward(cfg: ExperimentConfig, init: dict, tokens_bt: np.ndarray,
                  opts: ParityOptions, errors: list[str]) -> dict[str, np.ndarray]:
    """In-process logits (empty when skipped or failed; a failure is an error)."""
    if not opts.forward:
        return {}
    try:
        return forward_logits(cfg, init, tokens_bt, opts.precisions)
    except Exception as e:  # noqa: BLE001 - recorded, fails the run
        errors.append(f"forward comparison failed: {type(e).__name__}: {e}")
        log(f"  FAILED: {type(e).__name__}: {e}")
        return {}


def phase_truth(cfg: ExperimentConfig, init: dict, batch: np.ndarray,
                tokens_bt: np.ndarray | None, errors: list[str],
                truth_fn: Callable[..., Truth] = compute_truth) -> Truth:
    """The float64 truth (an empty :class:`Truth` and an error when it fails)."""
    try:
        return truth_fn(cfg, init, batch, tokens_bt)
    except Exception as e:  # noqa: BLE001 - recorded, fails the run
        errors.append(f"float64 truth failed: {type(e).__name__}: {e}")
        log(f"  FAILED: {type(e).__name__}: {e}")
        return Truth()


def phase_probes(cfg: ExperimentConfig, init: dict, batch0: np.ndarray, ds: Any,
                 errors: list[str]) -> tuple[list[C.Check], Any]:
    """The in-process bf16 probes (:mod:`parity.probes`): their checks (failed when the
    probes fail, with an error) and the localisation truth they computed."""
    from parity import localize
    from parity.probes import bf16_probe_checks, failed_probe_checks

    truth = localize.Truth(cfg, init, batch0)
    try:
        checks, _ = bf16_probe_checks(cfg, init, batch0, ds, truth)
        return checks, truth
    except Exception as e:  # noqa: BLE001 - recorded, fails the run
        errors.append(f"bf16 probes failed: {type(e).__name__}: {e}")
        log(f"  FAILED: {type(e).__name__}: {e}")
        return failed_probe_checks(f"{type(e).__name__}: {e}"), None


def phase_reuse(plan: list[RunSpec], errors: list[str]) -> dict[str, RunData]:
    """``--reuse-runs``: read the runs an earlier ``parity run`` left under the same out."""
    runs: dict[str, RunData] = {}
    for spec in plan:
        try:
            # a longer earlier run serves too (checks use the first steps only)
            n = len(read_metrics(spec.out_dir / "metrics.jsonl"))
            runs[spec.label] = read_run(replace(spec, steps=max(n, spec.steps)))
        except (OSError, ValueError, KeyError) as e:
            msg = f"{spec.label}: cannot reuse {spec.out_dir}: {type(e).__name__}: {e}"
            errors.append(msg)
            runs[spec.label] = RunData(spec, error=msg)
    return runs


def forward_failed_checks(opts: ParityOptions, why: str) -> list[C.Check]:
    """The forward checks, failed, when the forward phase could not run."""
    out = []
    if "fp32" in opts.precisions:
        out += [C.nan_check(f"fp32 forward: logits vs float64, {n}", "fp32.logits", why)
                for n in ("jax", "Hugging Face")]
    if "bf16" in opts.precisions:
        out.append(C.nan_check("bf16 forward: logits vs float64, jax", "bf16.logits", why))
    return out


def _in_process_phases(cfg: ExperimentConfig, opts: ParityOptions, init: dict,
                       batch0: np.ndarray, tokens_bt: np.ndarray, ds: Any, probes: bool,
                       ph: _Phases, errors: list[str]
                       ) -> tuple[list[C.Check], list[dict], dict, Truth, Any]:
    """Forward, truth and probes: (checks, figures, forward statistics, the float64
    truth, the localisation truth of the probes or None)."""
    t0 = ph.begin("forward: jax vs torch vs Hugging Face logits on a validation batch")
    logits = phase_forward(cfg, init, tokens_bt, opts, errors)
    ph.end(t0, "forward " + ("done" if opts.forward else "skipped (--no-forward)"))

    t0 = ph.begin("truth: float64 logits, step-0 loss and gradient (torch model in float64)")
    truth = phase_truth(cfg, init, batch0, tokens_bt if logits else None, errors,
                        opts.truth_fn)
    ph.end(t0, "truth " + ("done" if truth.grads else "FAILED"))

    checks: list[C.Check] = []
    info: list[dict] = []
    fwd_stats: dict[str, dict[str, float]] = {}
    if logits:
        fwd_stats, fchecks, finfo = forward_checks(logits, truth.logits)
        checks, info = checks + fchecks, info + finfo
        _log_checks(fchecks)
    elif opts.forward:
        checks += forward_failed_checks(opts, errors[-1] if errors else "forward failed")

    loc_truth = None
    if probes:
        t0 = ph.begin("probes: bf16 activations layer by layer, loss function and gradient "
                      "accumulation (in process)")
        pchecks, loc_truth = phase_probes(cfg, init, batch0, ds, errors)
        checks += pchecks
        _log_checks(pchecks)
        ph.end(t0, "probes done")
    return checks, info, fwd_stats, truth, loc_truth


def _log_checks(checks: list[C.Check]) -> None:
    for c in checks:
        log(f"  {c.name}: {c.value:.3e} (limit {c.limit:.3e}, "
            f"{'pass' if c.passed else 'FAIL'})")


class _Background:
    """The trainers, ``jobs`` at a time, in a thread of this process (they are
    subprocesses: the thread only starts and follows them) while the caller computes."""

    def __init__(self, train: Callable[..., dict[str, RunData]], jobs: int, ph: _Phases,
                 n_runs: int) -> None:
        self.t0 = ph.begin(f"training: {n_runs} trainer runs, {jobs} at a time, alongside "
                           "the in-process phases (their throughput figures share the CPU)")
        self.ph, self.stop = ph, threading.Event()
        self.result: dict[str, RunData] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(train, jobs),
                                       name="parity-training", daemon=True)
        self.thread.start()

    def _run(self, train: Callable[..., dict[str, RunData]], jobs: int) -> None:
        try:
            self.result = train(jobs, self.stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in join()
            self.error = e

    def join(self) -> dict[str, RunData]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        ok = sum(r.error is None for r in self.result.values())
        self.ph.end(self.t0, f"training: {ok}/{len(self.result)} runs finished")
        return self.result

    def cancel(self) -> None:
        """End the running trainers (and start no more); waits for them to go."""
        self.stop.set()
        self.thread.join()


def run_parity(cfg: ExperimentConfig, opts: ParityOptions,
               config_source: str | None = None) -> dict[str, Any]:
    """Run every phase and return the result dict (see :mod:`parity.report`); the
    reports are written under ``opts.out``. Never raises for a failed trainer: the
    failure is recorded in ``errors`` and fails the run's checks."""
    from lmspec.data import Dataset

    validate_options(opts, cfg)
    cfg = without_wandb(force_parity_profile(cfg, log), log)
    out = ensure_writable_dir(Path(opts.out).resolve(), "--out")
    t_start = time.perf_counter()
    errors: list[str] = []
    on_gpu = gpu_available()
    jax_devices = None if on_gpu else (opts.jax_devices or cfg.zero.world_size)
    plan = plan_runs(out, opts.zero_stages, opts.precisions, opts.steps_fp32, opts.steps_bf16)
    probes = opts.forward and "bf16" in opts.precisions
    jobs = 1 if opts.reuse_runs else (opts.jobs or (1 if on_gpu else 2))
    ph = _Phases(7 + probes + (0 if opts.reuse_runs else 1 if jobs > 1 else len(plan)))

    t0 = ph.begin(f"data: token cache of {cfg.data.source!r} ({cfg.data.tokenizer})")
    ds = Dataset.from_config(cfg)
    batch0 = ds.global_batch(0)
    tokens_bt = forward_batch(cfg, ds)
    ph.end(t0, f"{ds.num_tokens} tokens, {ds.num_train_windows} training windows")

    t0 = ph.begin(f"weights: init_weights(seed={cfg.train.seed})")
    init_path = out / "init_weights.safetensors"
    if opts.reuse_runs:
        init = load_safetensors(init_path)
    else:
        init = init_weights(cfg.model, cfg.train.seed)
        save_safetensors(init, init_path)
    config_path = out / "config.yaml"
    save_config(cfg, config_path)
    ph.end(t0, f"{sum(v.size for v in init.values())} parameters -> {init_path.name}")

    def train(jobs: int, stop: threading.Event | None = None) -> dict[str, RunData]:
        return train_all(plan, opts.trainer_cmd, config_path, init_path, jax_devices,
                         cfg.zero.world_size, opts.run_timeout_s, ph.begin, ph.end, errors,
                         jobs=jobs, stop=stop)

    # jobs > 1: the trainers start now and run while the in-process phases compute
    background = _Background(train, jobs, ph, len(plan)) if jobs > 1 else None
    try:
        checks, info, fwd_stats, truth, loc_truth = _in_process_phases(
            cfg, opts, init, batch0, tokens_bt, ds, probes, ph, errors)
        if background is not None:
            runs = background.join()
        elif opts.reuse_runs:
            runs = phase_reuse(plan, errors)
        else:
            runs = train(1)
    except BaseException:
        if background is not None:
            background.cancel()
        raise

    t0 = ph.begin("checks")
    tchecks, tinfo, pairs = training_checks(runs, init, truth, opts.zero_stages,
                                            opts.precisions, cfg.optim)
    checks, info = checks + tchecks, info + tinfo
    ph.end(t0, f"{sum(c.passed for c in checks)}/{len(checks)} passed")

    t0 = ph.begin("diagnosis")
    diagnosis = diagnose(cfg, init, batch0, runs, checks, truth.grads or None, loc_truth)
    ph.end(t0, diagnosis.get("headline", "nothing to diagnose"))

    t0 = ph.begin("reports")
    result = assemble_result(cfg, opts, config_source, runs, checks, info, pairs, fwd_stats,
                             diagnosis, errors, on_gpu, jax_devices, init_path, t_start,
                             jobs)
    from parity.report import write_reports

    paths = write_reports(result, out)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    ph.end(t0)
    return result


def runs_series(runs: dict[str, RunData]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The report's ``series`` (per-step records) and ``throughput`` (each run's summary
    and wall time) of the runs that finished, keyed by run label."""
    series, throughput = {}, {}
    for label, r in runs.items():
        if r.error is not None:
            continue
        series[label] = {"side": r.spec.side, "precision": r.spec.precision,
                         "zero_stage": r.spec.zero_stage,
                         **{k: r.series(k) for k in ("step", "loss", "grad_norm", "lr",
                                                     "batch_fingerprint", "tokens_per_s")}}
        s = dict(r.summary or {})
        s.pop("versions", None)
        throughput[label] = {"side": r.spec.side, "wall_s": r.seconds, **s}
    return series, throughput


def assemble_result(cfg: ExperimentConfig, opts: ParityOptions, config_source: str | None,
                    runs: dict[str, RunData], checks: list[C.Check], info: list[dict],
                    pairs: list[dict], fwd_stats: dict, diagnosis: dict, errors: list[str],
                    on_gpu: bool, jax_devices: int | None, init_path: Path,
                    t_start: float, jobs: int = 1) -> dict[str, Any]:
    """The result dict the reports are written from (schema in :mod:`parity.report`)."""
    series, throughput = runs_series(runs)
    extra = [s for s in floor_stages(opts.zero_stages) if s not in opts.zero_stages]
    return {
        "config": cfg.to_dict(),
        "config_source": config_source,
        "versions": versions(),
        "hardware": hardware(),
        "setup": {
            "zero stages": ", ".join(str(s) for s in opts.zero_stages)
            + (f" (and ZeRO-{extra[0]} for the noise floor)" if extra else ""),
            "precisions": ", ".join(opts.precisions),
            "steps": f"fp32 {opts.steps_fp32} (loss judged over the first "
                     f"{min(FP32_LOSS_STEPS, opts.steps_fp32)}), bf16 {opts.steps_bf16}",
            "truth": "torch model in float64 (forward batch, step-0 global batch); exact "
                     "float64 AdamW with each side's clipping",
            "jax devices": ("all GPUs" if on_gpu else
                            f"{jax_devices} virtual CPU devices "
                            f"(XLA_FLAGS=--xla_force_host_platform_device_count={jax_devices}),"
                            f" mesh {cfg.mesh.resolve(jax_devices)}; the same count as the "
                            f"DeepSpeed world size so per-device figures compare like for like"),
            "deepspeed": f"world size {cfg.zero.world_size} "
                         f"({'NCCL' if on_gpu else 'gloo'} on {'GPU' if on_gpu else 'CPU'})",
            "global batch": f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, "
                            f"micro batch {cfg.train.micro_batch_size} "
                            f"({cfg.grad_accum_steps(cfg.zero.world_size)} micro-steps per "
                            "rank and step)",
            "forward batch": f"{min(FORWARD_ROWS, cfg.train.global_batch_size)} validation "
                             f"windows of {cfg.data.seq_len} tokens, in process, JAX on one "
                             "device",
            "trainers at a time": (
                f"{jobs}, alongside the in-process phases: throughput figures share the CPU "
                "and are no speed comparison (`parity bench` is)" if jobs > 1 else "1"),
            "trainer overrides": "train.eval_every=0 (validation does not change training)",
            "weights": str(init_path),
            "wall time": f"{time.perf_counter() - t_start:.0f} s",
        },
        "diagnosis": diagnosis,
        "forward": fwd_stats,
        "series": series,
        "pairs": pairs,
        "throughput": throughput,
        "concurrent_jobs": jobs,
        "checks": [c.to_dict() for c in checks],
        "info": info + list(diagnosis.get("info") or []),
        "errors": errors,
        "runs": {label: {"out_dir": str(r.spec.out_dir), "seconds": r.seconds,
                         "error": r.error} for label, r in runs.items()},
    }
