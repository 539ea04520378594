"""Diagnosis of a parity run: where the port went wrong, when a check fails.

:func:`diagnose` is the run's diagnosis phase. It takes ``(cfg, weights, batch, runs,
checks)`` and returns the dict stored as ``result["diagnosis"]``; when that dict has a
``headline`` it is the first line ``parity run`` prints and the first line of
report.md/.html. The localisation of :func:`parity.localize.diagnose` (same arguments) names
the first step-0 quantity over its noise; without a finding the headline names the failing
check with the largest margin. For a failing fp32 first-update check the figures of
:func:`update_diagnosis` and :func:`truth_diagnosis` are added.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmspec.config import ExperimentConfig, OptimConfig
from parity import compare as C
from parity.launch import RunData, run_label


def _margin_of(c: Mapping[str, Any]) -> float:
    m = c.get("margin")
    try:
        m = float(m)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(m) else m


def diagnose(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray], batch: np.ndarray,
             runs: Mapping[str, RunData], checks: Sequence[C.Check],
             g64: Mapping[str, np.ndarray] | None = None, truth: Any = None
             ) -> dict[str, Any]:
    """The diagnosis phase (see the module docstring). ``batch`` is step 0's global batch
    (B, T+1); ``g64`` its float64 gradient when already computed; ``truth`` the
    localisation's :class:`parity.localize.Truth` of it when the probes made one. Never
    raises: a failure of the diagnosis itself is reported in ``error``."""
    failing = [c for c in checks if not c.passed]
    out: dict[str, Any] = {"failing": len(failing), "info": []}
    if not failing:
        return out
    worst = max(failing, key=lambda c: _margin_of(c.to_dict()))
    out["headline"] = (f"worst failing check: {worst.name} (value {worst.value:.3e}, "
                       f"limit {worst.limit:.3e}, margin {worst.margin:.3g})")
    try:
        loc = importlib.import_module("parity.localize")
    except ModuleNotFoundError as e:
        if e.name != "parity.localize":
            raise
        loc = None
    try:
        if loc is not None:
            found = loc.diagnose(cfg, weights, batch, runs, checks, truth)
            if found and found.get("category") is None:
                # nothing over its noise at step 0: the failing check stays the headline
                found = {k: v for k, v in found.items() if k != "headline"} | {
                    "localize": found.get("headline")}
            if found:
                out.update(found)
        for c in failing:
            if c.key == "fp32.update" and "stage" in c.detail and "param" in c.detail:
                jax, ds = runs.get("jax fp32"), runs.get(run_label("torch", "fp32",
                                                                  c.detail["stage"]))
                if jax is None or ds is None or jax.error or ds.error:
                    continue
                tag = f"fp32 zero{c.detail['stage']}"
                out["info"] += update_diagnosis(tag, c.detail["param"], jax, ds, weights,
                                                cfg.optim)
                if g64 is not None:
                    out["info"] += truth_diagnosis(tag, c.detail["param"], jax, ds, weights,
                                                   cfg.optim, g64)
    except Exception as e:  # noqa: BLE001 - a diagnosis, not a check
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def update_diagnosis(tag: str, param: str, jax: RunData, ds: RunData,
                     init: Mapping[str, np.ndarray], optim: OptimConfig) -> list[dict]:
    """Which term makes the step-0 updates of ``param`` differ.

    Applies an exact (float64) clipped AdamW first step to each side's dumped gradient:
    if ``AdamW(g_jax)`` vs ``AdamW(g_ds)`` differs as much as the measured updates while
    each side's update matches ``AdamW`` of its own gradient, the optimizers are faithful
    and the difference comes from the gradients, amplified by Adam's first-step
    normalisation ``g / (|g| + eps)`` where ``|g|`` is near ``eps``. Also names the single
    element that dominates the difference."""
    ua = C.updates({param: jax.params0[param]}, {param: init[param]})[param]
    ub = C.updates({param: ds.params0[param]}, {param: init[param]})[param]
    ea = C.adamw_first_update(jax.grads0, init, optim, param)
    eb = C.adamw_first_update(ds.grads0, init, optim, param, clip_eps=1e-6)
    sq = ((ua - ub) ** 2).ravel()
    i = int(np.argmax(sq))
    share = float(sq[i] / sq.sum()) if sq.sum() > 0 else 0.0
    rest = math.sqrt(max(float(sq.sum() - sq[i]), 0.0)) / max(float(np.linalg.norm(ub)), 1e-300)
    gj = float(np.asarray(jax.grads0[param]).ravel()[i])
    gd = float(np.asarray(ds.grads0[param]).ravel()[i])
    clip = C.clip_coef(ds.grads0, optim.grad_clip, 1e-6)
    idx = tuple(int(x) for x in np.unravel_index(i, ua.shape))
    return [
        {"name": f"{tag}: update diagnosis, exact AdamW(g_jax) vs AdamW(g_ds)",
         "value": C.rel_l2_error(ea, eb),
         "note": f"{param}: the update difference the gradient difference alone produces"},
        {"name": f"{tag}: update diagnosis, jax update vs exact AdamW of its own gradient",
         "value": C.rel_l2_error(ua, ea), "note": f"{param}: optax vs float64 AdamW"},
        {"name": f"{tag}: update diagnosis, deepspeed update vs exact AdamW of its own "
                 "gradient", "value": C.rel_l2_error(ub, eb),
         "note": f"{param}: torch AdamW under ZeRO vs float64 AdamW"},
        {"name": f"{tag}: update diagnosis, share of the squared difference in one element",
         "value": share,
         "note": f"{param}{list(idx)}: grad jax {gj:.4e} vs deepspeed {gd:.4e}; clipped "
                 f"|g| = {abs(gd) * clip:.2e} vs eps {optim.eps:g} (tensor RMS grad "
                 f"{float(np.sqrt(np.mean(np.square(ds.grads0[param], dtype=np.float64)))):.2e})"
                 f"; update {ua.ravel()[i]:.4e} vs {ub.ravel()[i]:.4e}",
         "element": list(idx)},
        {"name": f"{tag}: update diagnosis, update rel err without that element",
         "value": rest, "note": f"{param}: the other {ua.size - 1} elements"},
    ]


def truth_diagnosis(tag: str, param: str, jax: RunData, ds: RunData,
                    init: Mapping[str, np.ndarray], optim: OptimConfig,
                    g64: Mapping[str, np.ndarray]) -> list[dict]:
    """Each side's measured step-0 update of ``param`` against exact AdamW applied to the
    float64 gradient: how far each fp32 side is from the truth."""
    exact = C.adamw_first_update(g64, init, optim, param)
    i = int(np.argmax((jax.params0[param].astype(np.float64) - ds.params0[param]) ** 2))
    out = [{"name": f"{tag}: update diagnosis, float64 gradient of that element",
            "value": float(np.asarray(g64[param]).ravel()[i]),
            "note": f"{param}: fp32 gradients jax {float(jax.grads0[param].ravel()[i]):.4e}, "
                    f"deepspeed {float(ds.grads0[param].ravel()[i]):.4e}"}]
    for side, r in (("jax", jax), ("deepspeed", ds)):
        u = C.updates({param: r.params0[param]}, {param: init[param]})[param]
        out.append({"name": f"{tag}: update diagnosis, {side} update vs exact AdamW of the "
                            "float64 gradient", "value": C.rel_l2_error(u, exact),
                    "note": f"{param}; its gradient vs float64: "
                            f"{C.rel_l2_error(r.grads0[param], g64[param]):.3e}"})
    return out
