"""The training checks of a parity run, from the runs' metrics and step-0 dumps and the
float64 truth (judgement rules in :mod:`parity.judge`, multiples in :mod:`parity.limits`).

fp32, per DeepSpeed stage:
 - step-0 gradient and first update per tensor, each side against the float64 truth,
   the reference's distance being the noise;
 - loss curve: RMS over steps of |jax - ds|, against the noise of two faithful fp32 runs:
   the largest RMS distance between two DeepSpeed stages (different reduction/partition
   code, rounding that grows through training), combined with DeepSpeed's step-0 distance
   from the float64 loss (the cross-framework rounding of one forward, which a stage pair
   sharing torch kernels does not show), plus one fp32 ulp of the loss.
bf16, per DeepSpeed stage:
 - step-0 loss and per-tensor gradient against the float64 truth, DeepSpeed bf16's
   distance being the noise (at step 0 two DeepSpeed stages run the same bf16 kernels on
   the same bf16 weights and differ only by fp32 summation order, far below bf16
   rounding: not an honest floor for a port with other kernels);
 - JAX bf16 really is bf16: its step-0 gradient is about as far from float64 as
   DeepSpeed bf16's (a run silently done in fp32 sits ~100x closer);
 - loss curve: RMS over steps of |jax - ds| against the largest RMS distance between two
   DeepSpeed bf16 stages: after a few steps bf16 rounding of the weights amplifies any
   difference, and ZeRO-1 (DeepSpeed's BF16_Optimizer) and ZeRO-2/3 (the ZeRO optimizer)
   are two implementations of the same declared policy, as JAX is a third.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from lmspec.config import OptimConfig
from lmspec.schedule import lr_at
from parity import compare as C
from parity import judge as J
from parity import limits as L
from parity.launch import RunData, floor_stages, ok_run, run_label
from parity.truth import Truth, adam_moments, clip_factor, exact_updates, exact_updates_at


def _missing(tag: str, what_keys: Sequence[tuple[str, str]], why: str) -> list[C.Check]:
    return [C.nan_check(f"{tag}: {what}", key, why) for what, key in what_keys]


def fingerprint_check(name: str, pairs: Sequence[tuple[RunData, RunData]],
                      start: int = 0) -> C.Check:
    """Steps ``start, start+1, ...`` (as many as both runs of a pair have) whose batch
    fingerprints differ."""
    bad: dict[str, list[int]] = {}
    total = 0
    for a, b in pairs:
        n = min(a.spec.steps, b.spec.steps)
        mm = C.fingerprint_mismatches(a.metrics, b.metrics, n, start=start)
        total += len(mm)
        if mm:
            bad[f"{a.spec.label} vs {b.spec.label}"] = mm[:10]
    return C.make_check(name, "batch_fingerprint_mismatches", total,
                        **({"mismatched_steps": bad} if bad else {}))


def curve_floor(ds_runs: Mapping[int, RunData | None], n: int
                ) -> tuple[float | None, str, list[float]]:
    """The largest RMS loss distance over the first ``n`` steps between two finished
    DeepSpeed stages: (value, which pair, |difference| per step)."""
    ok = [s for s, r in ds_runs.items() if r is not None]
    best: tuple[float | None, str, list[float]] = (None, "", [])
    for a, b in combinations(sorted(ok), 2):
        la, lb = ds_runs[a].series("loss", n), ds_runs[b].series("loss", n)
        v = J.rms_diff(la, lb)
        if best[0] is None or v > best[0]:
            best = (v, f"ds zero{a} vs zero{b}", C.abs_diff_series(la, lb))
    return best


def per_param_table(judged: Mapping[str, J.Judged], test: Mapping[str, Any],
                    ref: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per tensor, for the report's plots: value, noise, limit, margin and cosine."""
    return {k: {"rel_err": j.value, "noise": j.noise, "limit": j.limit, "margin": j.margin,
                "cosine": C.cosine(test[k], ref[k])} for k, j in judged.items()}


@dataclass(frozen=True)
class MidState:
    """The train state a continuation starts from (``parity continue``): ``init`` of the
    update checks is its ``params``; the exact update is AdamW's step ``adam_step + 1``
    from its moments at ``lr_at(schedule_step)``; the runs' first judged step is
    ``step``."""

    params: Mapping[str, np.ndarray]
    exp_avg: Mapping[str, np.ndarray]
    exp_avg_sq: Mapping[str, np.ndarray]
    adam_step: int
    schedule_step: int
    step: int


def update_judgements(jax: RunData, ds: RunData, init: Mapping[str, np.ndarray],
                      truth: Truth, optim: OptimConfig, mid: MidState | None = None
                      ) -> dict[str, J.Judged]:
    """:func:`parity.judge.judge_update` for every tensor: the first update, or with
    ``mid`` the first continued one (``init`` is then ``mid.params``)."""
    if mid is None:
        u_jax = exact_updates(truth.grads, init, optim, "jax")
        u_ds = exact_updates(truth.grads, init, optim, "torch")
        lr = lr_at(0, optim)
    else:
        at = (mid.params, mid.exp_avg, mid.exp_avg_sq, mid.adam_step, mid.schedule_step,
              optim)
        u_jax = exact_updates_at(truth.grads, *at, "jax")
        u_ds = exact_updates_at(truth.grads, *at, "torch")
        lr = lr_at(mid.schedule_step, optim)
    clip = clip_factor(truth.grads, optim, "jax")
    out = {}
    for k in truth.grads:
        x = J.UpdateInputs(
            init=np.asarray(init[k], np.float64), grad_truth=truth.grads[k],
            update_truth=u_jax[k],
            update_test=np.asarray(jax.params0[k], np.float64) - init[k],
            update_ref=np.asarray(ds.params0[k], np.float64) - init[k],
            update_ref_truth=u_ds[k], grad_ref=np.asarray(ds.grads0[k], np.float64),
            lr=lr, eps=optim.eps, clip=clip,
            moments=None if mid is None else adam_moments(
                mid.exp_avg[k], mid.exp_avg_sq[k], mid.adam_step, optim))
        out[k] = J.judge_update(x, L.limit("fp32.update").threshold,
                                L.limit("fp32.grad").threshold)
    return out


FP32_KEYS = (("grad vs float64 (worst tensor)", "fp32.grad"),
             ("first update vs float64 AdamW (worst tensor)", "fp32.update"),
             ("loss curve vs noise", "fp32.loss"),
             ("batch fingerprint mismatches", "batch_fingerprint_mismatches"))
BF16_KEYS = (("loss at step 0 vs float64", "bf16.loss_step0"),
             ("grad vs float64 (worst tensor)", "bf16.grad"),
             ("loss curve vs DeepSpeed stage-to-stage", "bf16.curve"),
             ("batch fingerprint mismatches", "batch_fingerprint_mismatches"))


def _curve_runs(runs: Mapping[str, RunData], precision: str, zero_stages: Sequence[int],
                max_steps: int, info: list[dict]
                ) -> tuple[RunData | None, dict[int, RunData | None], int,
                           tuple[float | None, str, list[float]]]:
    """The finished runs of one precision (JAX; DeepSpeed by stage of
    :func:`floor_stages`), the steps every one of them has (at most ``max_steps``) and the
    loss-curve floor over them (:func:`curve_floor`, also appended to ``info``)."""
    jax = ok_run(runs, f"jax {precision}")
    ds_runs = {s: ok_run(runs, run_label("torch", precision, s))
               for s in floor_stages(zero_stages)}
    n_all = [r.spec.steps for r in ds_runs.values() if r is not None]
    n = min([max_steps, *n_all] + ([jax.spec.steps] if jax else []))
    floor = curve_floor(ds_runs, n)
    info.append({"name": f"{precision} loss-curve noise: largest DeepSpeed stage-to-stage RMS",
                 "value": floor[0], "note": floor[1] or "needs two finished DeepSpeed stages"})
    return jax, ds_runs, n, floor


def _why_unjudged(jax: RunData | None, ds: RunData | None, precision: str, stage: int,
                  floor: float | None, truth: Truth) -> str | None:
    """Why one stage's checks of ``precision`` cannot be judged (None: they can)."""
    if jax is None or ds is None:
        return "run failed: " + ", ".join(
            lbl for lbl, r in ((f"jax {precision}", jax),
                               (run_label("torch", precision, stage), ds)) if r is None)
    if not truth.grads:
        return "no float64 truth"
    if floor is None:
        return "no stage-to-stage floor"
    return None


def fp32_checks(runs: Mapping[str, RunData], init: Mapping[str, np.ndarray], truth: Truth,
                zero_stages: Sequence[int], optim: OptimConfig, mid: MidState | None = None
                ) -> tuple[list[C.Check], list[dict], list[dict]]:
    """The fp32 checks per DeepSpeed stage; with ``mid`` those of a continuation: the
    runs' metrics hold the continued steps only, their dumps are of step ``mid.step``,
    ``truth`` is of that step and ``init`` is ``mid.params``."""
    at = "" if mid is None else f" at step {mid.step}"
    first = "first update" if mid is None else f"update at step {mid.step}"
    checks: list[C.Check] = []
    info: list[dict] = []
    pairs: list[dict] = []
    jax, ds_runs, n, (floor, floor_name, floor_abs) = _curve_runs(
        runs, "fp32", zero_stages, L.FP32_LOSS_STEPS, info)
    for s in zero_stages:
        tag = f"fp32 zero{s}"
        ds = ds_runs.get(s)
        why = _why_unjudged(jax, ds, "fp32", s, floor, truth)
        if why:
            checks += _missing(tag, FP32_KEYS, why)
            continue
        gj = J.judge_tensors(jax.grads0, ds.grads0, truth.grads, L.limit("fp32.grad").threshold)
        p, w = J.worst(gj)
        checks.append(C.judged_check(f"{tag}: grad{at} vs float64 (worst tensor)", "fp32.grad", w,
                                     param=p, noise_from=f"ds zero{s} fp32 vs float64"))
        uj = update_judgements(jax, ds, init, truth, optim, mid)
        p_u, w_u = J.worst(uj)
        checks.append(C.judged_check(f"{tag}: {first} vs float64 AdamW (worst tensor)",
                                     "fp32.update", w_u, param=p_u, stage=s,
                                     noise_from=f"ds zero{s} fp32 vs float64 AdamW"))
        lj, ld = jax.series("loss", n), ds.series("loss", n)
        e0 = abs(float(ld[0]) - truth.loss)
        noise = math.hypot(floor, e0)
        ulp = L.FP32_LOSS_ULPS * float(J.ulp32(truth.loss))
        jl = J.Judged(value=J.rms_diff(lj, ld),
                      limit=L.limit("fp32.loss").threshold * noise + ulp, noise=noise,
                      detail={"steps": n, "stage_floor": floor, "stage_floor_from": floor_name,
                              "step0_ds_vs_float64": e0,
                              "step0_jax_vs_float64": abs(float(lj[0]) - truth.loss),
                              "ulp": ulp})
        checks.append(C.judged_check(f"{tag}: loss curve vs noise ({n} steps)", "fp32.loss", jl))
        checks.append(fingerprint_check(f"{tag}: batch fingerprint mismatches", [(jax, ds)],
                                        start=0 if mid is None else mid.step))
        gn_rel = C.rel_diff_series(jax.series("grad_norm", n), ds.series("grad_norm", n))
        info.append({"name": f"{tag}: grad_norm rel diff (worst of {n} steps)",
                     "value": max(gn_rel), "note": "metrics.jsonl, before clipping"})
        lr_d = C.abs_diff_series(jax.series("lr", n), ds.series("lr", n))
        info.append({"name": f"{tag}: lr abs diff (worst of {n} steps)", "value": max(lr_d),
                     "note": "both from lmspec.schedule.lr_at"})
        pairs.append({"name": f"{tag}: jax vs deepspeed", "precision": "fp32",
                      "test": "jax fp32", "ref": run_label("torch", "fp32", s),
                      "floor_name": floor_name, "floor_abs_diff": floor_abs,
                      "loss_abs_diff": C.abs_diff_series(lj, ld),
                      "grad": per_param_table(gj, jax.grads0, ds.grads0),
                      "update": {k: {"rel_err": j.value, "noise": j.noise, "limit": j.limit,
                                     "margin": j.margin} for k, j in uj.items()}})
    return checks, info, pairs


def bf16_checks(runs: Mapping[str, RunData], truth: Truth, zero_stages: Sequence[int],
                mid_step: int | None = None) -> tuple[list[C.Check], list[dict], list[dict]]:
    """The bf16 checks per DeepSpeed stage; with ``mid_step`` those of a continuation: the
    runs' metrics hold the continued steps only, their dumps and ``truth`` are of step
    ``mid_step``."""
    first = "step 0" if mid_step is None else f"step {mid_step}"
    at = "" if mid_step is None else f" at step {mid_step}"
    checks: list[C.Check] = []
    info: list[dict] = []
    pairs: list[dict] = []
    jax, ds_runs, n, (floor, floor_name, floor_abs) = _curve_runs(
        runs, "bf16", zero_stages, L.BF16_STEPS, info)
    # the step-0 stage-to-stage distance, shown to say why it is not the step-0 floor
    ok = [s for s, r in ds_runs.items() if r is not None]
    if len(ok) >= 2 and truth.grads:
        a, b = ds_runs[ok[0]], ds_runs[ok[-1]]
        d = math.sqrt(sum(float(np.sum((np.asarray(a.grads0[k], np.float64) - b.grads0[k]) ** 2))
                          for k in truth.grads))
        which = "step-0" if mid_step is None else f"step {mid_step}"
        info.append({"name": f"bf16 {which} gradient, ds zero{ok[0]} vs zero{ok[-1]} "
                             "(relative L2, all tensors)",
                     "value": d / C.global_norm(truth.grads),
                     "note": "same kernels, fp32 summation order only: not a bf16 floor"})
    for s in zero_stages:
        tag = f"bf16 zero{s}"
        ds = ds_runs.get(s)
        why = _why_unjudged(jax, ds, "bf16", s, floor, truth)
        if why:
            checks += _missing(tag, BF16_KEYS, why)
            continue
        lj, ld = jax.series("loss", n), ds.series("loss", n)
        e_ds = abs(float(ld[0]) - truth.loss)
        rounding = L.BF16_LOSS_ROUNDING * abs(truth.loss) / math.sqrt(max(truth.tokens, 1))
        j0 = J.judge_distance(abs(float(lj[0]) - truth.loss), e_ds,
                              L.limit("bf16.loss_step0").threshold, rounding,
                              token_mean_rounding=rounding)
        checks.append(C.judged_check(f"{tag}: loss at {first} vs float64", "bf16.loss_step0",
                                     j0, noise_from=f"ds zero{s} bf16 vs float64"))
        gj = J.judge_tensors(jax.grads0, ds.grads0, truth.grads,
                             L.limit("bf16.grad").threshold)
        p, w = J.worst(gj)
        checks.append(C.judged_check(f"{tag}: grad{at} vs float64 (worst tensor)", "bf16.grad", w,
                                     param=p, noise_from=f"ds zero{s} bf16 vs float64"))
        # two bf16 implementations with different kernels also differ, at every step, by
        # their own rounding of the loss (DeepSpeed's step-0 distance from float64, once
        # per side): the stage pair shares torch's kernels and lacks that term
        noise = math.hypot(floor, math.sqrt(2.0) * e_ds)
        jc = J.Judged(value=J.rms_diff(lj, ld),
                      limit=L.limit("bf16.curve").threshold * noise, noise=noise,
                      detail={"steps": n, "stage_floor": floor, "stage_floor_from": floor_name,
                              "step0_ds_vs_float64": e_ds})
        checks.append(C.judged_check(f"{tag}: loss curve vs DeepSpeed stage-to-stage "
                                     f"({n} steps)", "bf16.curve", jc))
        checks.append(fingerprint_check(f"{tag}: batch fingerprint mismatches", [(jax, ds)],
                                        start=0 if mid_step is None else mid_step))
        pairs.append({"name": f"{tag}: jax vs deepspeed", "precision": "bf16",
                      "test": "jax bf16", "ref": run_label("torch", "bf16", s),
                      "floor_name": floor_name, "floor_abs_diff": floor_abs,
                      "loss_abs_diff": C.abs_diff_series(lj, ld),
                      "grad": per_param_table(gj, jax.grads0, ds.grads0)})
    # JAX bf16 is bf16: as far from float64 as DeepSpeed bf16, not ~100x closer
    ref = next((ds_runs[s] for s in zero_stages if ds_runs.get(s) is not None), None)
    if jax is not None and ref is not None and truth.grads:
        def dist(g: Mapping[str, Any]) -> float:
            return math.sqrt(sum(float(np.sum((np.asarray(g[k], np.float64) - truth.grads[k])
                                              ** 2)) for k in truth.grads))
        ratio = J.safe_margin(dist(jax.grads0), dist(ref.grads0))
        jb = J.Judged(value=ratio, limit=L.limit("bf16.is_bf16").threshold, op=">=",
                      noise=dist(ref.grads0) / C.global_norm(truth.grads),
                      detail={"jax_bf16_vs_float64": dist(jax.grads0)
                              / C.global_norm(truth.grads), "ref": ref.spec.label})
        checks.append(C.judged_check("bf16: jax bf16 gradient as far from float64 as "
                                     "DeepSpeed bf16's (really bf16)", "bf16.is_bf16", jb))
    elif "jax bf16" in runs:
        checks.append(C.nan_check("bf16: jax bf16 gradient as far from float64 as DeepSpeed "
                                  "bf16's (really bf16)", "bf16.is_bf16", "run failed"))
    return checks, info, pairs


def training_checks(runs: Mapping[str, RunData], init: Mapping[str, np.ndarray],
                    truth: Truth, zero_stages: Sequence[int], precisions: Sequence[str],
                    optim: OptimConfig) -> tuple[list[C.Check], list[dict], list[dict]]:
    """Every training check. Returns (checks, info figures, pairs for the plots). A check
    whose inputs are missing (a run failed) is reported with value NaN, which fails it."""
    checks: list[C.Check] = []
    info: list[dict] = []
    pairs: list[dict] = []
    if "fp32" in precisions:
        c, i, p = fp32_checks(runs, init, truth, zero_stages, optim)
        checks, info, pairs = checks + c, info + i, pairs + p
    if "bf16" in precisions:
        c, i, p = bf16_checks(runs, truth, zero_stages)
        checks, info, pairs = checks + c, info + i, pairs + p
    # every run saw the same batches as the JAX run of its precision (and JAX fp32 as bf16)
    j32, j16 = ok_run(runs, "jax fp32"), ok_run(runs, "jax bf16")
    if j32 is not None and j16 is not None:
        checks.append(fingerprint_check("jax fp32 vs jax bf16: batch fingerprint mismatches",
                                        [(j32, j16)]))
    return checks, info, pairs
