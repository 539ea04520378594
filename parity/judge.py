"""The judgement of the parity harness: how far the JAX side may be from a float64 truth,
given how far the reference (DeepSpeed / torch) is from the same truth (numpy only).

One rule for every tensor: the reference's *noise* is its distance from the float64
truth; the JAX side passes when its own distance is within a stated multiple of that
noise plus a small absolute term (the rounding no finite-precision result can avoid, so
a reference that happens to be exact does not demand exactness). A :class:`Judged` holds
the test's distance (``value``), the reference's (``noise``), the allowed distance
(``limit``) and ``margin = value / limit`` (<= 1 passes).

The first AdamW update needs one refinement: where ``|clipped g|`` is near or below
``eps`` the step ``g / (|g| + eps)`` turns gradient rounding into update differences up
to ``lr``. Those elements are judged one by one against what their gradient rounding
allows (:func:`adam_interval_halfwidth`): the update interval reachable from any gradient
within the allowed gradient error, plus the parameter's own fp32 rounding. The other
elements are judged together (L2) by the rule above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from parity import limits as L

# ----------------------------------------------------------------------------- basics


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _l2(x: np.ndarray) -> float:
    return float(np.linalg.norm(np.ravel(x)))


def ulp32(x: Any) -> np.ndarray:
    """Spacing of float32 numbers at ``x`` (one unit in the last place), as float64."""
    return np.spacing(np.abs(_f64(x)).astype(np.float32)).astype(np.float64)


def fp32_rounding(truth: Any) -> float:
    """L2 distance between the float64 ``truth`` and its nearest float32 values: the
    closest any fp32 result can be."""
    t = _f64(truth)
    return _l2(t.astype(np.float32).astype(np.float64) - t)


def safe_margin(value: float, limit: float) -> float:
    """``value / limit``; 0 when both are 0, inf when only the limit is 0; NaN stays."""
    if math.isnan(value) or math.isnan(limit):
        return math.nan
    if limit == 0.0:
        return 0.0 if value == 0.0 else math.inf
    return value / limit


@dataclass
class Judged:
    """One judged figure. ``op`` "<=": passes when ``value <= limit``; ">=": passes when
    ``value >= limit``. ``margin`` is normalised so that <= 1 passes either way."""

    value: float
    limit: float
    noise: float | None = None
    op: str = "<="
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def margin(self) -> float:
        if self.op == ">=":
            return safe_margin(self.limit, self.value)
        return safe_margin(self.value, self.limit)

    @property
    def passed(self) -> bool:
        m = self.margin
        return not math.isnan(m) and m <= 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["margin"] = self.margin
        return d


def judge_distance(test_dist: float, ref_dist: float, multiple: float,
                   floor: float = 0.0, scale: float = 1.0, **detail: Any) -> Judged:
    """``test_dist <= multiple * ref_dist + floor``; every distance divided by ``scale``
    (e.g. the truth's norm) for reporting, which leaves the margin unchanged."""
    s = scale if scale > 0 else 1.0
    return Judged(value=test_dist / s, limit=(multiple * ref_dist + floor) / s,
                  noise=ref_dist / s, detail=detail)


def worst(judged: Mapping[str, Judged]) -> tuple[str, Judged]:
    """The entry with the largest margin (NaN counts as the worst)."""
    if not judged:
        raise ValueError("worst: nothing judged")

    def key(kv: tuple[str, Judged]) -> float:
        m = kv[1].margin
        return math.inf if math.isnan(m) else m

    return max(judged.items(), key=key)


# ----------------------------------------------------------------------------- tensors


def judge_tensor(test: Any, ref: Any, truth: Any, multiple: float,
                 floor_ulps: float = L.FP32_ROUNDING_FLOOR) -> Judged:
    """L2 distance of ``test`` from ``truth`` against ``multiple`` x the distance of
    ``ref`` from it, plus ``floor_ulps`` x the truth's own fp32 rounding. Reported
    relative to ``||truth||``."""
    t, r, x = _f64(test), _f64(ref), _f64(truth)
    if not (t.shape == r.shape == x.shape):
        raise ValueError(f"judge_tensor: shapes differ, {t.shape}, {r.shape}, {x.shape}")
    return judge_distance(_l2(t - x), _l2(r - x), multiple,
                          floor_ulps * fp32_rounding(x), _l2(x))


def judge_tensors(test: Mapping[str, Any], ref: Mapping[str, Any], truth: Mapping[str, Any],
                  multiple: float) -> dict[str, Judged]:
    """:func:`judge_tensor` for every name of ``truth`` (a missing name is an error)."""
    for what, d in (("test", test), ("reference", ref)):
        missing = sorted(set(truth) - set(d))
        if missing:
            raise ValueError(f"judge_tensors: {what} lacks {missing}")
    return {k: judge_tensor(test[k], ref[k], truth[k], multiple) for k in truth}


# ----------------------------------------------------------------------------- AdamW


def adam_first_step(g: Any, p: Any, lr: float, eps: float, wd: float, clip: float
                    ) -> np.ndarray:
    """Exact first AdamW update (float64): ``-lr*wd*p - lr*cg/(|cg| + eps)`` with the
    clipped gradient ``cg = clip*g`` (after bias correction ``m_hat = cg``,
    ``sqrt(v_hat) = |cg|``)."""
    cg = clip * _f64(g)
    return -lr * wd * _f64(p) - lr * cg / (np.abs(cg) + eps)


def adam_interval_halfwidth(g: Any, delta: Any, lr: float, eps: float, clip: float
                            ) -> np.ndarray:
    """Half the width of the first-step updates reachable from any gradient in
    ``[g - delta, g + delta]``: the step is monotone in ``g``, so the ends of the interval
    map to the ends of the reachable updates. Near ``|clip*g| <= eps`` this is about
    ``lr*clip*delta/eps``; far above ``eps`` it is negligible."""
    g, d = _f64(g), _f64(delta)

    def step(x: np.ndarray) -> np.ndarray:
        cx = clip * x
        return lr * cx / (np.abs(cx) + eps)

    return 0.5 * np.abs(step(g + d) - step(g - d))


@dataclass(frozen=True)
class AdamMoments:
    """AdamW's state before a mid-training update (``parity continue``): float64 first and
    second moments of one tensor, the updates applied so far (the bias-correction count)
    and the betas."""

    m: np.ndarray
    v: np.ndarray
    count: int
    beta1: float
    beta2: float


def adam_step(g: Any, p: Any, lr: float, eps: float, wd: float, clip: float,
              moments: AdamMoments) -> np.ndarray:
    """Exact AdamW update (float64) after ``moments.count`` earlier ones: clipped gradient
    ``cg = clip*g``, ``m = b1*m + (1-b1)*cg``, ``v = b2*v + (1-b2)*cg**2``, bias correction
    with ``t = count + 1``, ``-lr*wd*p - lr*m_hat/(sqrt(v_hat) + eps)``. With zero moments
    and count 0 this is :func:`adam_first_step`."""
    cg = clip * _f64(g)
    t = moments.count + 1
    m = moments.beta1 * _f64(moments.m) + (1 - moments.beta1) * cg
    v = moments.beta2 * _f64(moments.v) + (1 - moments.beta2) * cg * cg
    m_hat, v_hat = m / (1 - moments.beta1 ** t), v / (1 - moments.beta2 ** t)
    return -lr * wd * _f64(p) - lr * m_hat / (np.sqrt(v_hat) + eps)


def adam_step_halfwidth(g: Any, delta: Any, lr: float, eps: float, clip: float,
                        moments: AdamMoments) -> np.ndarray:
    """Half the width between the mid-training updates of ``g - delta`` and ``g + delta``
    (:func:`adam_step`, weight decay left out: it does not depend on ``g``). Unlike the
    first step the update is not monotone in ``g`` everywhere (the moments carry a
    history), so this is the interval's ends, not a bound over it: an approximation,
    stated as such in docs/migrating.md; the elements it decides about are those whose
    history is small next to the gradient, where the first-step reasoning holds."""
    g, d = _f64(g), _f64(delta)
    hi = adam_step(g + d, 0.0, lr, eps, 0.0, clip, moments)
    lo = adam_step(g - d, 0.0, lr, eps, 0.0, clip, moments)
    return 0.5 * np.abs(hi - lo)


@dataclass
class UpdateInputs:
    """What judging one tensor's first update needs (float64 arrays of one shape)."""

    init: np.ndarray
    grad_truth: np.ndarray  # float64 gradient
    update_truth: np.ndarray  # exact AdamW of grad_truth, the test side's clipping
    update_test: np.ndarray  # params_after - init, test side
    update_ref: np.ndarray  # the same, reference side
    update_ref_truth: np.ndarray  # exact AdamW of grad_truth, the reference's clipping
    grad_ref: np.ndarray  # the reference's fp32 gradient (its rounding sets delta)
    lr: float
    eps: float
    clip: float
    # AdamW's state before this update; None: the first update (zero moments, count 0)
    moments: AdamMoments | None = None


def judge_update(x: UpdateInputs, multiple: float = L.FP32_UPDATE_MULTIPLE,
                 grad_multiple: float = L.FP32_GRAD_MULTIPLE) -> Judged:
    """Judge one tensor's first update (see the module docstring), or a mid-training one
    when ``x.moments`` is given (the gradient allowance then from
    :func:`adam_step_halfwidth`).

    - rounding allowance per element ``r = ULPS_P * ulp(p_after) + ULPS_U * ulp(u)``: the
      stored parameter's rounding and the Adam arithmetic's, which no fp32 side avoids;
    - gradient allowance per element: the updates reachable from gradients within
      ``delta = grad_multiple * max|g_ref - g_truth| + ulp(g_truth)`` of the truth
      (the test side's gradient may be ``grad_multiple`` x as wrong as the reference's);
    - ill-conditioned elements: those whose gradient allowance exceeds their rounding
      allowance ``r``; each must stay within ``gradient allowance + r``;
    - the others together: ``||test - truth|| <= multiple * ||ref - truth|| + ||r||``.
    The worse of the two parts is returned (its ``detail['part']`` says which)."""
    p_after = x.init + x.update_truth
    r = L.UPDATE_ULPS_PARAM * ulp32(p_after) + L.UPDATE_ULPS_STEP * ulp32(x.update_truth)
    ref_grad_err = float(np.max(np.abs(x.grad_ref - x.grad_truth))) if x.grad_ref.size else 0.0
    delta = grad_multiple * ref_grad_err + ulp32(x.grad_truth)
    if x.moments is None:
        w = adam_interval_halfwidth(x.grad_truth, delta, x.lr, x.eps, x.clip)
    else:
        w = adam_step_halfwidth(x.grad_truth, delta, x.lr, x.eps, x.clip, x.moments)
    ill = w > r
    scale = _l2(x.update_truth)
    d_test = x.update_test - x.update_truth
    d_ref = x.update_ref - x.update_ref_truth
    well = ~ill
    jw = judge_distance(_l2(d_test[well]), _l2(d_ref[well]), multiple, _l2(r[well]), scale,
                        part="well-conditioned elements (L2)", elements=int(well.sum()))
    if not ill.any():
        jw.detail["ill_conditioned"] = 0
        return jw
    allow = w[ill] + r[ill]
    ratio = np.abs(d_test[ill]) / allow
    k = int(np.argmax(ratio))
    flat = np.flatnonzero(ill.ravel())[k]
    idx = [int(i) for i in np.unravel_index(flat, x.update_truth.shape)]
    ji = Judged(value=float(abs(d_test[ill][k])), limit=float(allow[k]),
                noise=float(abs(d_ref[ill][k])),
                detail={"part": "ill-conditioned element", "element": idx,
                        "grad_truth": float(x.grad_truth[ill][k]),
                        "clipped_grad_over_eps": float(abs(x.clip * x.grad_truth[ill][k])
                                                       / x.eps),
                        "ill_conditioned": int(ill.sum())})
    jw.detail["ill_conditioned"] = int(ill.sum())
    return ji if ji.margin > jw.margin else jw


# ----------------------------------------------------------------------------- series


def rms(xs: Sequence[float]) -> float:
    if not len(xs):
        raise ValueError("rms: empty series")
    a = _f64(list(xs))
    return float(np.sqrt(np.mean(a * a)))


def rms_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Root mean square over steps of ``a - b``."""
    if len(a) != len(b):
        raise ValueError(f"rms_diff: lengths differ, {len(a)} vs {len(b)}")
    return rms([float(x) - float(y) for x, y in zip(a, b, strict=True)])
