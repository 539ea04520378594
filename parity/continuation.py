"""Continuation parity (``parity continue``): a run's checkpoint continued N steps by both
trainers, one of them from the converted state, judged like ``parity run``.

From a run folder (DeepSpeed's or jaxlm's) whose newest checkpoint resumes at step S:

1. state: the checkpoint's whole train state (:mod:`parity.convert`);
2. runs under ``OUT/runs``, per continued precision (fp32; and bf16 for a run that
   trained in bf16, or as ``precisions`` says): the source side continues from a copy of
   its own checkpoint (its own stage and precision; the source folder is never written)
   or from its state re-written; the other side from the converted state; a second
   DeepSpeed continuation at another ZeRO stage gives the noise floor, as in ``parity
   run``. Every run trains steps S..S+N-1 with the step-S gradient and parameters dumped;
3. truth: float64 loss and gradient of the state's fp32 weights on the data pipeline's
   global batch S; the exact float64 AdamW step from the state's moments, Adam step
   count and ``lr_at(schedule_step)`` with each side's clipping;
4. checks: fp32 (:func:`parity.checks.fp32_checks` with a
   :class:`parity.checks.MidState`): the step-S gradient and update against the truth
   (the exact check of the conversion: moments, counters, schedule), the loss curve over
   the continued steps against the DeepSpeed stage-to-stage noise; bf16
   (:func:`parity.checks.bf16_checks` at step S): the step-S loss and gradient against
   DeepSpeed bf16's own distance from the truth, the loss curve against the bf16
   stage-to-stage floor, JAX bf16 really bf16; batch fingerprints equal across the runs;
   and two of a continuation's own: every run's batch of each continued step is the
   data pipeline's batch of that step (the same data position), and its logged learning
   rate is ``lr_at(step)`` (the schedule position: DeepSpeed logs its LambdaLR's rate,
   jaxlm the rate at optax's schedule count, each the rate its update used);
5. reports (:mod:`parity.report`), with a setup section naming the source and S.

``ContinueOptions.alter`` changes the converted state before it is written: for testing
that a wrong conversion fails (no command-line flag sets it).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.errors import UserError
from lmspec.io import ensure_writable_dir
from lmspec.trainstate import TrainState
from parity import compare as C
from parity.convert import SIDE_NAMES
from parity.launch import (
    RunData,
    RunSpec,
    default_trainer_cmd,
    gpu_available,
    jax_env,
    log,
    read_run,
    run_label,
    run_trainer,
)
from parity.limits import BF16_STEPS, FP32_LOSS_STEPS
from parity.run import runs_series


@dataclass
class ContinueOptions:
    """Everything ``parity continue`` decides besides the source run."""

    out: Path
    steps: int = 10
    floor_stage: int | None = None  # the second DeepSpeed stage; default floor_stages'
    # continued precisions; None: fp32, and bf16 too when the run trained in bf16
    precisions: tuple[str, ...] | None = None
    overrides: tuple[str, ...] = ()  # every continued run's config (train.log_every=...)
    run_timeout_s: float | None = 1800.0
    trainer_cmd: Callable[[str], list[str]] = default_trainer_cmd
    # applied to the converted state before it is written (tests: a wrong conversion)
    alter: Callable[[TrainState], TrainState] | None = None


def source_kind(run_dir: Path) -> str:
    """``torch`` or ``jax``: whose checkpoints ``run_dir`` holds (a UserError otherwise)."""
    from lmspec.runs import checkpoint_kinds

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    kinds = checkpoint_kinds(run_dir)
    if len(kinds) != 1:
        what = "both DeepSpeed and jaxlm" if kinds else "no"
        raise UserError(f"{run_dir}: {what} checkpoints in {run_dir / 'checkpoints'}; "
                        "`parity continue` needs a torchlm or a jaxlm run folder with a "
                        "checkpoint (train it first)")
    return next(iter(kinds))


def read_source(run_dir: Path, kind: str, work: Path) -> TrainState:
    from parity.convert import read_ds_state, read_jax_state

    if kind == "torch":
        return read_ds_state(run_dir, work_dir=work, say=lambda m: log(f"  {m}"))
    return read_jax_state(run_dir, say=lambda m: log(f"  {m}"))


def copy_source(run_dir: Path, state: TrainState, dst: Path) -> None:
    """The source side's continuation folder: its config.yaml, the metrics records before
    S and the one checkpoint (DeepSpeed: its tag folder and ``latest``; jaxlm: its step
    folder), copied; nothing in ``run_dir`` changes."""
    from lmspec.trainstate import write_records

    dst.mkdir(parents=True)
    shutil.copy2(run_dir / "config.yaml", dst / "config.yaml")
    if state.records:
        write_records(state.records, dst / "metrics.jsonl")
    ck = dst / "checkpoints"
    ck.mkdir()
    if state.source["side"] == "torch":
        tag = state.source["checkpoint"]
        shutil.copytree(run_dir / "checkpoints" / tag, ck / tag)
        (ck / "latest").write_text(tag)
    else:
        src = Path(state.source["checkpoint"])
        shutil.copytree(src, ck / src.name)


def continue_parity(run_dir: str | os.PathLike, opts: ContinueOptions) -> dict[str, Any]:
    """Every phase (module docstring); returns the result dict, reports written under
    ``opts.out``. A failed trainer is recorded in ``errors`` and fails the checks."""
    from lmspec.config import load_config
    from lmspec.data import Dataset, batch_fingerprint
    from lmspec.schedule import lr_at
    from parity.checks import MidState, bf16_checks, fp32_checks
    from parity.convert import target_config
    from parity.launch import floor_stages
    from parity.truth import Truth, float64_loss_and_gradient

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    if opts.steps < 1:
        raise UserError(f"--steps={opts.steps} must be >= 1")
    check_precisions(opts.precisions)
    kind = source_kind(run_dir)
    cfg0 = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() \
        else None
    if cfg0 is None:
        raise UserError(f"{run_dir}: no config.yaml (every run folder of torchlm/jaxlm "
                        "train has one)")
    precisions = continued_precisions(cfg0.train.precision, opts.precisions)
    stage = cfg0.zero.stage
    other = opts.floor_stage if opts.floor_stage is not None else floor_stages([stage])[1]
    if other not in (0, 1, 2, 3) or other == stage:
        raise UserError(f"--floor-stage={other}: give a ZeRO stage 0-3 other than the "
                        f"run's own ({stage})")
    target_config(cfg0, Path("/nonexistent"), opts.overrides)  # frozen overrides refused
    out = ensure_writable_dir(Path(opts.out).resolve(), "--out")
    runs_dir = out / "runs"
    errors: list[str] = []

    log(f"phase 1/5: state: reading the newest {SIDE_NAMES[kind]} checkpoint of {run_dir}")
    t0 = time.perf_counter()
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir(parents=True)
    state = read_source(run_dir, kind, runs_dir)
    S, N = state.next_step, opts.steps
    cfg = state.config
    log(f"  done in {time.perf_counter() - t0:.1f} s: continue at step {S}, {N} steps")

    log("phase 2/5: runs: the source's own checkpoint, the converted state, a second "
        "DeepSpeed stage" + (" (per precision)" if len(precisions) > 1 else ""))
    t0 = time.perf_counter()
    plan = continuation_plan(runs_dir, precisions, stage, other, N)
    converted = opts.alter(dataclasses.replace(state)) if opts.alter else state
    how = {spec.label: _prepare(spec, run_dir, state, converted, cfg0.train.precision, stage)
           for spec in plan}
    log(f"  done in {time.perf_counter() - t0:.1f} s")

    log(f"phase 3/5: training: {len(plan)} continuations of {N} steps, one at a time")
    on_gpu = gpu_available()
    jax_devices = None if on_gpu else cfg.zero.world_size
    runs: dict[str, RunData] = {}
    for spec in plan:
        runs[spec.label] = _continue_one(spec, S, opts, jax_devices, errors)

    log("phase 4/5: truth and checks")
    t0 = time.perf_counter()
    ds = Dataset.from_config(cfg)
    batch = ds.global_batch(S)
    loss64, grads64 = float64_loss_and_gradient(cfg, state.params, batch)
    truth = Truth(loss=loss64, grads=grads64,
                  tokens=int(batch.shape[0] * (batch.shape[1] - 1)))
    mid = MidState(params=state.params, exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq,
                   adam_step=state.adam_step, schedule_step=state.schedule_step, step=S)
    checks, info, pairs = [], [], []
    if "fp32" in precisions:
        checks, info, pairs = fp32_checks(runs, state.params, truth, [stage], cfg.optim, mid)
    if "bf16" in precisions:
        c, i, p = bf16_checks(runs, truth, [stage], mid_step=S)
        checks, info, pairs = checks + c, info + i, pairs + p
    fps = [batch_fingerprint(ds.global_batch(s)) for s in range(S, S + N)]
    lrs = [lr_at(s, cfg.optim) for s in range(S, S + N)]
    checks += position_checks(runs, S, fps, lrs)
    for c in checks:
        log(f"  {c.name}: {c.value:.3e} (limit {c.limit:.3e}, "
            f"{'pass' if c.passed else 'FAIL'})")
    log(f"  {sum(c.passed for c in checks)}/{len(checks)} passed in "
        f"{time.perf_counter() - t0:.1f} s")

    log("phase 5/5: reports")
    result = _result(cfg, run_dir, state, opts, precisions, runs, checks, info, pairs,
                     errors, how, other, jax_devices, t_start)
    from parity.report import write_reports

    paths = write_reports(result, out)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


def check_precisions(asked: tuple[str, ...] | None) -> None:
    """A UserError naming ``--precisions`` when ``asked`` is empty, repeats a precision or
    names one the trainers do not have (None: the default, fine)."""
    from lmspec.config import PRECISIONS

    if asked is None:
        return
    if not asked:
        raise UserError("--precisions: give at least one of " + ", ".join(PRECISIONS))
    for p in asked:
        if p not in PRECISIONS:
            raise UserError(f"--precisions: {p!r}; allowed: {', '.join(PRECISIONS)}")
    if len(set(asked)) != len(asked):
        raise UserError(f"--precisions: {','.join(asked)} repeats a precision")


def continued_precisions(source: str, asked: tuple[str, ...] | None) -> tuple[str, ...]:
    """The precisions to continue in: ``asked`` (checked), else fp32 and, for a bf16 run,
    bf16 too. fp32 is the exact check of the conversion (the update against float64
    AdamW from the state's moments and counters); bf16 judges the run as it trained, by
    DeepSpeed bf16's own distances (parity run's bf16 judgement, at the continued step)."""
    check_precisions(asked)
    if asked is None:
        return ("fp32",) if source == "fp32" else ("fp32", source)
    return tuple(asked)


def continuation_plan(runs_dir: Path, precisions: tuple[str, ...], stage: int, other: int,
                      steps: int) -> list[RunSpec]:
    """Per precision: JAX, DeepSpeed at the run's ZeRO stage, DeepSpeed at ``other``."""
    plan = []
    for p in precisions:
        plan.append(RunSpec(run_label("jax", p, None), "jax", p, None, steps,
                            runs_dir / f"jax_{p}"))
        for s in (stage, other):
            plan.append(RunSpec(run_label("torch", p, s), "torch", p, s, steps,
                                runs_dir / f"ds_zero{s}_{p}"))
    return plan


def _prepare(spec: RunSpec, run_dir: Path, state: TrainState, converted: TrainState,
             precision: str, stage: int) -> str:
    """Write one continuation's folder; returns how its state got there. The run of the
    source's side, stage and precision copies the source's checkpoint; other runs of the
    source's side re-write its state (never altered: they are the reference and the
    floor); the other side's runs get the converted state."""
    from parity.convert import write_ds_run, write_jax_run

    kind = state.source["side"]
    say = lambda m: log(f"  {m}")  # noqa: E731
    if spec.side == kind and spec.zero_stage in (None, stage) and spec.precision == precision:
        copy_source(run_dir, state, spec.out_dir)
        return f"its own checkpoint ({state.source['checkpoint']}), copied"
    src = state if spec.side == kind else converted
    overrides = [f"train.precision={spec.precision}"]
    if spec.side == "jax":
        write_jax_run(src, spec.out_dir, overrides, say=say)
    else:
        write_ds_run(src, spec.out_dir, [*overrides, f"zero.stage={spec.zero_stage}"], say=say)
    if spec.side != kind:
        source = "DeepSpeed" if kind == "torch" else "jaxlm"
        return f"converted from the {source} checkpoint (parity convert)"
    where = ", ".join(w for w in (spec.precision, spec.zero_stage is not None
                                  and f"ZeRO-{spec.zero_stage}") if w)
    return f"the {SIDE_NAMES[kind]} state re-written ({where})"


def _continue_one(spec: RunSpec, S: int, opts: ContinueOptions, jax_devices: int | None,
                  errors: list[str]) -> RunData:
    """Resume one prepared folder to step S+N with the step-S dumps; its data with the
    metrics of the continued steps only and the dumps as ``grads0`` / ``params0``."""
    from lmspec.weights import load_safetensors

    total = S + spec.steps
    args = ["train", str(spec.out_dir / "config.yaml"), f"train.steps={total}",
            f"train.out_dir={spec.out_dir}", "train.eval_every=0", *opts.overrides,
            "--dump-grads", str(S), "--dump-params", str(S)]
    cmd = opts.trainer_cmd(spec.side) + args
    env = jax_env(os.environ, jax_devices) if spec.side == "jax" else dict(os.environ)
    log(f"  continue {spec.label}: steps {S}..{total - 1}")
    rc, secs, tail = run_trainer(cmd, env, spec.out_dir, total, spec.label,
                                 opts.run_timeout_s)
    if rc != 0:
        msg = (f"{spec.label}: trainer exited with status {rc} after {secs:.0f} s; log "
               f"{spec.out_dir / 'train.log'}:\n{tail}")
        errors.append(msg)
        log(f"  FAILED: {msg}")
        return RunData(spec, error=msg, seconds=secs)
    try:
        data = read_run(dataclasses.replace(spec, steps=total), dumps=False)
        data.spec = spec
        data.metrics = [r for r in data.metrics if r["step"] >= S]
        data.grads0 = load_safetensors(spec.out_dir / "dumps" / f"grads_step{S}.safetensors")
        data.params0 = load_safetensors(spec.out_dir / "dumps" /
                                        f"params_step{S}.safetensors")
    except (OSError, ValueError, KeyError) as e:
        msg = f"{spec.label}: outputs unreadable: {type(e).__name__}: {e}"
        errors.append(msg)
        return RunData(spec, error=msg, seconds=secs)
    data.seconds = secs
    loss = data.series("loss")
    log(f"  {spec.label}: loss {loss[0]:.4f} -> {loss[-1]:.4f} in {secs:.1f} s")
    return data


def position_checks(runs: dict[str, RunData], S: int, fingerprints: list[str],
                    lrs: list[float]) -> list[C.Check]:
    """A continuation's own checks, over every run: the batch of each continued step is
    the data pipeline's batch of that step, and the learning rate is ``lr_at(step)``
    (within one fp32 ulp: trainers log it as a float32 or a float64)."""
    from parity.judge import ulp32

    bad_fp: dict[str, list[int]] = {}
    bad_lr: dict[str, list[int]] = {}
    for label, r in runs.items():
        if r.error is not None:
            bad_fp[label] = bad_lr[label] = [-1]
            continue
        got = {int(x["step"]): x for x in r.metrics}
        for i, (fp, lr) in enumerate(zip(fingerprints, lrs, strict=True)):
            rec = got.get(S + i)
            if rec is None or rec.get("batch_fingerprint") != fp:
                bad_fp.setdefault(label, []).append(S + i)
            if rec is None or not abs(float(rec.get("lr", np.nan)) - lr) <= float(ulp32(lr)):
                bad_lr.setdefault(label, []).append(S + i)
    return [
        C.make_check(f"continued batches are the data pipeline's steps {S}..{S + len(lrs) - 1}"
                     " (every run)", "batch_fingerprint_mismatches",
                     sum(len(v) for v in bad_fp.values()),
                     **({"mismatched_steps": bad_fp} if bad_fp else {})),
        C.make_check(f"continued learning rates are lr_at(step), steps {S}.."
                     f"{S + len(lrs) - 1} (every run)", "lr_mismatches",
                     sum(len(v) for v in bad_lr.values()),
                     **({"mismatched_steps": bad_lr} if bad_lr else {})),
    ]


def _result(cfg: Any, run_dir: Path, state: TrainState, opts: ContinueOptions,
            precisions: tuple[str, ...], runs: dict[str, RunData], checks: list[C.Check],
            info: list[dict], pairs: list[dict], errors: list[str], how: dict[str, str], other: int,
            jax_devices: int | None, t_start: float) -> dict[str, Any]:
    from parity.envinfo import hardware, versions

    S, N = state.next_step, opts.steps
    series, throughput = runs_series(runs)
    return {
        "config": cfg.to_dict(),
        "config_source": str(run_dir / "config.yaml"),
        "versions": versions(),
        "hardware": hardware(),
        "setup": {
            "continuation": f"from {run_dir} ({SIDE_NAMES[state.source['side']]}), "
                            f"checkpoint {state.source['checkpoint']}: next step {S}, Adam "
                            f"step {state.adam_step}, schedule step {state.schedule_step}",
            "steps": f"{N} continued steps ({S}..{S + N - 1}) in "
                     f"{' and '.join(precisions)}; loss judged over the first "
                     + " and ".join(f"{min(N, w)} in {p}" for p, w in
                                    (("fp32", FP32_LOSS_STEPS), ("bf16", BF16_STEPS))
                                    if p in precisions) + " (the loss checks' windows)",
            "runs": "; ".join(f"{k}: {v}" for k, v in how.items()),
            "noise floor": f"ZeRO-{cfg.zero.stage} vs ZeRO-{other} continuations (per "
                           "precision)",
            "truth": f"torch model in float64 on the state's weights and global batch {S}; "
                     "exact float64 AdamW from the state's moments, Adam step count and "
                     "lr_at(schedule step), each side's clipping",
            "jax devices": ("all GPUs" if jax_devices is None else
                            f"{jax_devices} virtual CPU devices"),
            "deepspeed": f"world size {cfg.zero.world_size}",
            "trainer overrides": ", ".join(["train.eval_every=0", *opts.overrides]),
            "wall time": f"{time.perf_counter() - t_start:.0f} s",
        },
        "series": series,
        "pairs": pairs,
        "throughput": throughput,
        "checks": [c.to_dict() for c in checks],
        "info": info,
        "errors": errors,
        "runs": {label: {"out_dir": str(r.spec.out_dir), "seconds": r.seconds,
                         "error": r.error} for label, r in runs.items()},
    }
