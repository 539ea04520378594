"""The parity judgement (parity.judge) on synthetic arrays: a tensor within the
reference's noise passes, one 10x over fails, and ill-conditioned AdamW elements are
judged by what their gradient rounding allows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from parity import judge as J
from parity import limits as L


def _noisy(x, rel, rng):
    return x + rel * np.sqrt(np.mean(x * x)) * rng.standard_normal(x.shape)


def test_tensor_within_noise_passes_and_10x_over_fails():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((128, 64))
    ref = _noisy(truth, 1e-6, rng)
    same = _noisy(truth, 1e-6, rng)
    worse = _noisy(truth, 1e-5, rng)
    ok = J.judge_tensor(same, ref, truth, multiple=4.0)
    bad = J.judge_tensor(worse, ref, truth, multiple=4.0)
    assert ok.passed and 0.15 < ok.margin < 0.35  # ~1x the noise against a 4x limit
    assert not bad.passed and bad.margin > 2
    assert ok.noise == pytest.approx(1e-6, rel=0.05)  # relative to ||truth||
    assert ok.to_dict()["margin"] == ok.margin


def test_exact_reference_still_allows_fp32_rounding():
    rng = np.random.default_rng(1)
    truth = rng.standard_normal(1000)
    rounded = truth.astype(np.float32).astype(np.float64)
    one_more = (rounded + J.ulp32(rounded) * rng.choice([-1, 0, 1], 1000)).astype(np.float64)
    assert J.judge_tensor(rounded, truth, truth, 4.0).passed  # the reference is exact
    assert J.judge_tensor(one_more, truth, truth, 4.0).passed  # +-1 ulp more
    assert not J.judge_tensor(truth * (1 + 1e-5), truth, truth, 4.0).passed


def test_ge_judgement_and_margins():
    j = J.Judged(value=0.2, limit=0.5, op=">=")
    assert not j.passed and j.margin == pytest.approx(2.5)
    assert J.Judged(value=1.0, limit=0.5, op=">=").passed
    assert J.safe_margin(0.0, 0.0) == 0.0 and J.safe_margin(1.0, 0.0) == math.inf
    assert not J.Judged(value=math.nan, limit=1.0).passed
    name, w = J.worst({"a": J.Judged(1, 2), "b": J.Judged(3, 2), "c": J.Judged(0, 1)})
    assert name == "b" and w.margin == 1.5


def test_adam_interval_is_linear_below_eps_and_vanishes_above():
    lr, eps = 1e-3, 1e-8
    w_small = J.adam_interval_halfwidth(np.array([0.0]), np.array([1e-10]), lr, eps, 1.0)
    assert w_small[0] == pytest.approx(lr * 1e-10 / (eps + 1e-10), rel=1e-6)
    w_big = J.adam_interval_halfwidth(np.array([1e-3]), np.array([1e-10]), lr, eps, 1.0)
    assert w_big[0] < 2e-15  # lr*eps*delta/g**2 = 1e-15


def _update_case(rng, grad_err, flip_small=0.0):
    """A tensor whose first update is judged: g with a few elements near/below eps."""
    lr, eps, wd, clip = 1e-4, 1e-8, 0.1, 0.5
    p = rng.standard_normal((64, 32)) * 0.02
    g = rng.standard_normal((64, 32)) * 1e-3
    g.ravel()[:5] = [2e-9, -5e-9, 1e-8, 0.0, 3e-8]  # clipped |g| at or below eps

    def side(g_side, clip_eps_shift=0.0):
        u = J.adam_first_step(g_side, p, lr, eps, wd, clip * (1 - clip_eps_shift))
        return (p + u).astype(np.float32).astype(np.float64) - p

    g_ref = g + grad_err * rng.standard_normal(g.shape)
    g_test = g + grad_err * rng.standard_normal(g.shape)
    g_test.ravel()[0] += flip_small
    u = J.adam_first_step(g, p, lr, eps, wd, clip)
    x = J.UpdateInputs(init=p, grad_truth=g, update_truth=u,
                       update_test=side(g_test), update_ref=side(g_ref), update_ref_truth=u,
                       grad_ref=g_ref, lr=lr, eps=eps, clip=clip)
    return x


def test_update_ill_conditioned_elements_judged_by_their_gradient_bound():
    rng = np.random.default_rng(2)
    # gradient rounding ~1e-10: elements below eps move by up to lr*clip*1e-10/eps = 5e-7,
    # hundreds of parameter ulps; they pass because the gradient bound allows it
    x = _update_case(rng, 1e-10)
    j = J.judge_update(x, multiple=4.0, grad_multiple=4.0)
    assert j.passed, j
    assert max(abs(x.update_test - x.update_truth).ravel()[:5]) > 50 * J.ulp32(0.02)
    # the same element 20x further than any gradient rounding allows fails, and is named
    bad = J.judge_update(_update_case(np.random.default_rng(2), 1e-10, flip_small=2e-8),
                         multiple=4.0, grad_multiple=4.0)
    assert not bad.passed
    assert bad.detail["part"] == "ill-conditioned element" and bad.detail["element"] == [0, 0]


def test_update_well_conditioned_part_catches_an_optimizer_difference():
    rng = np.random.default_rng(3)
    x = _update_case(rng, 1e-10)
    # weight decay applied twice on the test side: lr*wd*p ~ 2e-7, ~100 ulps of p
    x.update_test = x.update_test - 1e-4 * 0.1 * x.init
    j = J.judge_update(x, multiple=4.0, grad_multiple=4.0)
    assert not j.passed
    assert j.margin > 10


def test_limits_have_reasons_and_sane_multiples():
    for key, lim in L.LIMITS.items():
        assert lim.description and lim.op in ("<=", ">=")
        if lim.judged and lim.op == "<=":
            assert 1.0 < lim.threshold <= 20.0, key
    assert 0 < L.limit("bf16.is_bf16").threshold < 1
    with pytest.raises(ValueError, match="unknown limit"):
        L.limit("nope")


def test_update_well_conditioned_only_tensor():
    """No element near eps: only the L2 part judges; one ulp of p per element passes, a
    decay coefficient 10% off fails."""
    rng = np.random.default_rng(4)
    lr, eps, wd = 1e-4, 1e-8, 0.1
    p = rng.standard_normal((32, 16)) * 0.02
    g = np.sign(rng.standard_normal((32, 16))) * (1e-3 + rng.random((32, 16)) * 1e-3)
    u = J.adam_first_step(g, p, lr, eps, wd, 1.0)

    def stored(uu):
        return (p + uu).astype(np.float32).astype(np.float64) - p

    base = dict(init=p, grad_truth=g, update_truth=u, update_ref=stored(u), update_ref_truth=u,
                grad_ref=g + 1e-11 * rng.standard_normal(g.shape), lr=lr, eps=eps, clip=1.0)
    ok = J.judge_update(J.UpdateInputs(update_test=stored(u), **base), 4.0, 4.0)
    assert ok.passed and ok.detail["ill_conditioned"] == 0
    assert ok.detail["part"] == "well-conditioned elements (L2)"
    off = stored(J.adam_first_step(g, p, lr, eps, 1.1 * wd, 1.0))
    bad = J.judge_update(J.UpdateInputs(update_test=off, **base), 4.0, 4.0)
    assert not bad.passed
