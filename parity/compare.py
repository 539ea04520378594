"""The comparison maths of the parity harness (numpy only, computed in float64).

Conventions: ``test`` is the JAX side, ``ref`` the reference (DeepSpeed, or Hugging Face);
relative errors divide by the reference. Legend for array names: ``_btv`` = (batch,
tokens, vocab) logits; ``_s`` = one value per training step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from parity.limits import limit

# ----------------------------------------------------------------------------- tensors


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {a.shape} vs {b.shape}")


def rel_l2_error(test: Any, ref: Any) -> float:
    """``||test - ref||_2 / ||ref||_2``; 0 when both are all zeros, inf when only ref is."""
    t, r = _f64(test), _f64(ref)
    _same_shape(t, r, "rel_l2_error")
    num = float(np.linalg.norm((t - r).ravel()))
    den = float(np.linalg.norm(r.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two flattened tensors; 1 when both are zero, 0 when one is."""
    x, y = _f64(a).ravel(), _f64(b).ravel()
    _same_shape(x, y, "cosine")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def max_abs_diff(test: Any, ref: Any) -> float:
    """``max |test - ref|`` over all elements."""
    t, r = _f64(test), _f64(ref)
    _same_shape(t, r, "max_abs_diff")
    return float(np.max(np.abs(t - r))) if t.size else 0.0


def max_rel_diff(test: Any, ref: Any) -> float:
    """``max |test - ref| / max |ref|``: the worst difference relative to the tensor's
    scale (an element-wise ratio would explode where ``ref`` crosses zero)."""
    t, r = _f64(test), _f64(ref)
    _same_shape(t, r, "max_rel_diff")
    if not t.size:
        return 0.0
    num = float(np.max(np.abs(t - r)))
    den = float(np.max(np.abs(r)))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def mean_kl(ref_logits_btv: Any, test_logits_btv: Any) -> float:
    """Mean over tokens of KL(p_ref || p_test), p = softmax over the last (vocab) dim."""
    r, t = _f64(ref_logits_btv), _f64(test_logits_btv)
    _same_shape(r, t, "mean_kl")
    lp, lq = _log_softmax(r), _log_softmax(t)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return float(np.mean(kl))


def logits_stats(test_btv: Any, ref_btv: Any) -> dict[str, float]:
    """max abs / max rel difference and mean per-token KL(ref || test)."""
    return {
        "max_abs": max_abs_diff(test_btv, ref_btv),
        "max_rel": max_rel_diff(test_btv, ref_btv),
        "mean_kl": mean_kl(ref_btv, test_btv),
    }


def per_param(test: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """For every parameter: relative L2 error and cosine of ``test`` against ``ref``.

    Both dicts must hold the same names (strict: a missing tensor is an error, never
    skipped)."""
    missing = sorted(set(ref) - set(test))
    extra = sorted(set(test) - set(ref))
    if missing or extra:
        raise ValueError(f"per_param: names differ; missing {missing}, unexpected {extra}")
    out = {}
    for name in ref:
        out[name] = {
            "rel_err": rel_l2_error(test[name], ref[name]),
            "cosine": cosine(test[name], ref[name]),
            "ref_norm": float(np.linalg.norm(_f64(ref[name]).ravel())),
        }
    return out


def global_norm(tensors: Mapping[str, Any]) -> float:
    """L2 norm of all tensors together."""
    return math.sqrt(sum(float(np.sum(_f64(v) ** 2)) for v in tensors.values()))


def updates(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``after - before`` per parameter (float64)."""
    if set(after) != set(before):
        raise ValueError(
            f"updates: names differ; only after {sorted(set(after) - set(before))}, "
            f"only before {sorted(set(before) - set(after))}"
        )
    return {k: _f64(after[k]) - _f64(before[k]) for k in before}


def clip_coef(grads: Mapping[str, Any], max_norm: float, norm_eps: float = 0.0) -> float:
    """Global-norm clipping factor: ``min(1, max_norm / (norm + norm_eps))``; 1 when
    ``max_norm`` is 0 (off). optax uses ``norm_eps`` 0 (and only scales when norm >
    max_norm), DeepSpeed ZeRO 1e-6."""
    if max_norm <= 0:
        return 1.0
    n = global_norm(grads)
    if n <= max_norm and norm_eps == 0.0:
        return 1.0
    return min(1.0, max_norm / (n + norm_eps))


def adamw_first_update(grads: Mapping[str, Any], params: Mapping[str, Any], optim: Any,
                       name: str, clip_eps: float = 0.0) -> np.ndarray:
    """The exact (float64) first AdamW update of parameter ``name``: clipped gradient
    ``g``, then ``-lr*wd*p - lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = g`` and
    ``v_hat = g**2`` after bias correction (torch.optim.AdamW, decoupled decay).
    ``optim`` is an :class:`lmspec.config.OptimConfig`."""
    from lmspec.schedule import lr_at
    from lmspec.weights import decays

    g = _f64(grads[name]) * clip_coef(grads, optim.grad_clip, clip_eps)
    p = _f64(params[name])
    lr = lr_at(0, optim)
    m_hat = ((1 - optim.beta1) * g) / (1 - optim.beta1)
    v_hat = ((1 - optim.beta2) * g * g) / (1 - optim.beta2)
    wd = optim.weight_decay if decays(name, p.shape, optim.wd_mask) else 0.0
    return -lr * wd * p - lr * m_hat / (np.sqrt(v_hat) + optim.eps)


# ----------------------------------------------------------------------------- series


def rel_diff_series(test_s: Sequence[float], ref_s: Sequence[float]) -> list[float]:
    """``|test - ref| / |ref|`` step by step (inf where ref is 0 and test is not)."""
    if len(test_s) != len(ref_s):
        raise ValueError(f"rel_diff_series: lengths differ, {len(test_s)} vs {len(ref_s)}")
    out = []
    for t, r in zip(test_s, ref_s, strict=True):
        d = abs(float(t) - float(r))
        out.append(d / abs(float(r)) if r != 0 else (0.0 if d == 0 else math.inf))
    return out


def abs_diff_series(a_s: Sequence[float], b_s: Sequence[float]) -> list[float]:
    """``|a - b|`` step by step."""
    if len(a_s) != len(b_s):
        raise ValueError(f"abs_diff_series: lengths differ, {len(a_s)} vs {len(b_s)}")
    return [abs(float(a) - float(b)) for a, b in zip(a_s, b_s, strict=True)]


def rms_gap(a_s: Sequence[float], b_s: Sequence[float]) -> float:
    """Root mean square over steps of ``|a - b|`` (the bf16 gap and floor statistic)."""
    d = abs_diff_series(a_s, b_s)
    if not d:
        raise ValueError("rms_gap: empty series")
    return math.sqrt(sum(x * x for x in d) / len(d))


def gap_over_floor(gap: float, floor: float) -> float:
    """``gap / floor``; 0 if both are 0, inf if only the floor is 0 (no noise to hide in)."""
    if floor == 0.0:
        return 0.0 if gap == 0.0 else math.inf
    return gap / floor


def fingerprint_mismatches(test_records: Sequence[Mapping[str, Any]],
                           ref_records: Sequence[Mapping[str, Any]],
                           steps: int, start: int = 0) -> list[int]:
    """Steps in ``[start, start + steps)`` whose ``batch_fingerprint`` differs, or is
    missing on either side (a missing step counts as a mismatch)."""
    t = {int(r["step"]): r.get("batch_fingerprint") for r in test_records}
    r_ = {int(r["step"]): r.get("batch_fingerprint") for r in ref_records}
    bad = []
    for s in range(start, start + steps):
        a, b = t.get(s), r_.get(s)
        if a is None or b is None or a != b:
            bad.append(s)
    return bad


# ----------------------------------------------------------------------------- checks


@dataclass
class Check:
    """One judged figure: ``{name, value, limit, passed}`` plus how it is judged.

    ``noise`` is the reference's own distance (from the float64 truth, or between two
    reference runs) the limit was derived from; ``margin`` is ``value / limit`` for
    ``<=`` and ``limit / value`` for ``>=``, so <= 1 passes either way."""

    name: str
    value: float
    limit: float
    op: str
    passed: bool
    key: str
    detail: dict[str, Any] = field(default_factory=dict)
    noise: float | None = None
    margin: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("value", "noise", "margin", "limit"):
            v = d[k]
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)  # JSON has no inf/nan
        return d


def _margin(value: float, threshold: float, op: str) -> float:
    from parity.judge import safe_margin

    return safe_margin(threshold, value) if op == ">=" else safe_margin(value, threshold)


def make_check(name: str, key: str, value: float, **detail: Any) -> Check:
    """Judge ``value`` against the fixed limit ``key`` of :mod:`parity.limits`."""
    lim = limit(key)
    value = float(value)
    return Check(name=name, value=value, limit=lim.threshold, op=lim.op,
                 passed=lim.passes(value), key=key, detail=detail,
                 margin=_margin(value, lim.threshold, lim.op))


def judged_check(name: str, key: str, judged: Any, **detail: Any) -> Check:
    """A check from a :class:`parity.judge.Judged` (limit derived from measured noise)."""
    lim = limit(key)
    if judged.op != lim.op:
        raise AssertionError(f"{key}: judged with {judged.op}, limit says {lim.op}")
    d = {**judged.detail, **detail, "multiple": lim.threshold}
    return Check(name=name, value=float(judged.value), limit=float(judged.limit), op=lim.op,
                 passed=judged.passed, key=key, detail=d,
                 noise=None if judged.noise is None else float(judged.noise),
                 margin=float(judged.margin))


def nan_check(name: str, key: str, why: str) -> Check:
    """A check whose inputs are missing (a run failed): NaN, failed."""
    lim = limit(key)
    return Check(name=name, value=math.nan, limit=math.nan if lim.judged else lim.threshold,
                 op=lim.op, passed=False, key=key, detail={"missing": why})


def worst(stats: Mapping[str, Mapping[str, float]], field_: str, *, largest: bool = True
          ) -> tuple[str, float]:
    """The parameter with the largest (or smallest) ``field_`` and that value."""
    if not stats:
        raise ValueError("worst: no parameters")
    items = [(k, float(v[field_])) for k, v in stats.items()]
    # NaN first: a NaN is always the worst value
    for k, v in items:
        if math.isnan(v):
            return k, v
    return (max if largest else min)(items, key=lambda kv: kv[1])
