"""Comparison maths and limits of the parity harness, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from parity import compare as C
from parity.limits import BF16_STEPS, FP32_LOSS_STEPS, LIMITS, limit


def test_limits_keys_and_ops():
    assert {k: v.op for k, v in LIMITS.items()} == {
        "fp32.logits": "<=", "fp32.grad": "<=", "fp32.update": "<=", "fp32.loss": "<=",
        "bf16.logits": "<=", "bf16.loss_step0": "<=", "bf16.grad": "<=", "bf16.is_bf16": ">=",
        "bf16.activations": "<=", "bf16.accum": "<=", "bf16.loss_fn": "<=",
        "bf16.curve": "<=", "batch_fingerprint_mismatches": "<=", "lr_mismatches": "<="}
    assert LIMITS["batch_fingerprint_mismatches"].threshold == 0
    assert LIMITS["lr_mismatches"].threshold == 0
    assert (FP32_LOSS_STEPS, BF16_STEPS) == (20, 50)
    with pytest.raises(ValueError, match="unknown limit"):
        limit("nope")


def test_limit_judgement_edges():
    le, ge = limit("batch_fingerprint_mismatches"), limit("bf16.is_bf16")
    assert le.passes(0) and not le.passes(1)
    assert ge.passes(ge.threshold) and not ge.passes(ge.threshold * 0.999)
    assert not le.passes(float("nan")) and not ge.passes(float("nan"))
    assert not le.passes(math.inf)


def test_rel_l2_error_and_cosine_closed_form():
    ref = np.array([3.0, 4.0])
    assert C.rel_l2_error(np.array([3.0, 4.5]), ref) == pytest.approx(0.5 / 5.0)
    assert C.rel_l2_error(ref, ref) == 0.0
    assert C.rel_l2_error(np.zeros(2), np.zeros(2)) == 0.0
    assert C.rel_l2_error(np.ones(2), np.zeros(2)) == math.inf
    assert C.cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert C.cosine([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(-1.0)
    assert C.cosine([0.0, 0.0], [0.0, 0.0]) == 1.0
    assert C.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        C.rel_l2_error(np.ones(3), np.ones(2))


def test_rel_l2_error_is_float64_even_for_float32_inputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(10_000).astype(np.float32)
    test = ref + np.float32(1e-7) * ref
    # float32 subtraction would lose most digits here; the answer is 1e-7 (to fp32 rounding)
    assert C.rel_l2_error(test, ref) == pytest.approx(1e-7, rel=0.1)


def test_max_abs_and_rel_diff():
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    test = np.array([[1.5, -4.0], [2.0, 0.25]])
    assert C.max_abs_diff(test, ref) == 0.5
    assert C.max_rel_diff(test, ref) == pytest.approx(0.5 / 4.0)


def test_mean_kl_closed_form():
    ref = np.array([[[0.0, 0.0], [1.0, 2.0]]])  # (B=1, T=2, V=2)
    test = np.array([[[math.log(3.0), 0.0], [11.0, 12.0]]])  # token 2: same dist., shifted
    # token 1: p=(1/2,1/2), q=(3/4,1/4): KL = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3); token 2: 0
    assert C.mean_kl(ref, test) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-12)
    assert C.mean_kl(ref, ref) == 0.0
    s = C.logits_stats(test, ref)
    assert s["max_abs"] == pytest.approx(10.0) and s["mean_kl"] > 0


def test_series_statistics():
    assert C.rel_diff_series([1.0, 2.2], [1.0, 2.0]) == pytest.approx([0.0, 0.1])
    assert C.rms_gap([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))
    assert C.rms_gap([0.0, 0.0], [3.0, -4.0]) == pytest.approx(math.sqrt(12.5))
    assert C.gap_over_floor(0.5, 2.0) == 0.25
    assert C.gap_over_floor(0.0, 0.0) == 0.0
    assert C.gap_over_floor(1e-9, 0.0) == math.inf
    with pytest.raises(ValueError, match="lengths differ"):
        C.rms_gap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        C.rms_gap([], [])


def test_fingerprint_mismatches_counts_missing_steps():
    a = [{"step": s, "batch_fingerprint": f"f{s}"} for s in range(5)]
    b = [dict(r) for r in a]
    assert C.fingerprint_mismatches(a, b, 5) == []
    b[2]["batch_fingerprint"] = "other"
    del b[3]
    assert C.fingerprint_mismatches(a, b, 5) == [2, 3]
    assert C.fingerprint_mismatches(a, a, 6) == [5]  # a step past the end is missing


def test_per_param_updates_and_global_norm():
    before = {"w": np.array([1.0, 1.0]), "b": np.array([0.0])}
    after_ref = {"w": np.array([0.9, 1.1]), "b": np.array([0.5])}
    after_test = {"w": np.array([0.9, 1.1]), "b": np.array([0.55])}
    u_ref, u_test = C.updates(after_ref, before), C.updates(after_test, before)
    np.testing.assert_allclose(u_ref["w"], [-0.1, 0.1])
    stats = C.per_param(u_test, u_ref)
    assert stats["w"]["rel_err"] == pytest.approx(0.0, abs=1e-15)
    assert stats["b"]["rel_err"] == pytest.approx(0.1)
    assert C.worst(stats, "rel_err") == ("b", pytest.approx(0.1))
    assert C.worst(stats, "cosine", largest=False)[1] == pytest.approx(1.0)
    assert C.global_norm({"a": np.array([3.0]), "b": np.array([4.0])}) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="missing"):
        C.per_param({"w": before["w"]}, before)


def test_worst_prefers_nan():
    stats = {"a": {"rel_err": 1.0}, "b": {"rel_err": float("nan")}}
    name, value = C.worst(stats, "rel_err")
    assert name == "b" and math.isnan(value)


def test_make_check_and_judged_check():
    from parity.judge import Judged

    ok = C.make_check("fp", "batch_fingerprint_mismatches", 0, step=3)
    bad = C.make_check("fp", "batch_fingerprint_mismatches", 2)
    assert ok.passed and ok.limit == 0 and ok.op == "<=" and ok.detail == {"step": 3}
    assert ok.margin == 0 and not bad.passed and bad.margin == math.inf
    assert bad.to_dict()["margin"] == "inf"
    j = C.judged_check("g", "fp32.grad", Judged(value=2e-7, limit=4e-7, noise=1e-7), param="w")
    assert j.passed and j.margin == 0.5 and j.noise == 1e-7 and j.limit == 4e-7
    assert j.detail == {"param": "w", "multiple": limit("fp32.grad").threshold}
    over = C.judged_check("g", "fp32.grad", Judged(value=5e-7, limit=4e-7, noise=1e-7))
    assert not over.passed and over.margin == pytest.approx(1.25)
    n = C.nan_check("g", "fp32.grad", "run failed").to_dict()
    assert n["value"] == "nan" and not n["passed"] and n["detail"] == {"missing": "run failed"}


def test_adamw_first_update_closed_form_and_torch():
    from lmspec.config import OptimConfig
    from lmspec.schedule import lr_at

    o = OptimConfig(lr=1e-2, warmup_steps=0, decay_steps=10, weight_decay=0.1, eps=1e-8,
                    grad_clip=1.0, wd_mask="matrices")
    grads = {"w": np.array([[3.0, -4.0]]), "n": np.array([0.0])}  # global norm 5
    params = {"w": np.array([[1.0, 2.0]]), "n": np.array([1.0])}
    assert C.clip_coef(grads, 1.0) == pytest.approx(0.2)
    assert C.clip_coef(grads, 10.0) == 1.0 and C.clip_coef(grads, 0.0) == 1.0
    lr = lr_at(0, o)
    gc = np.array([[0.6, -0.8]])
    expect = -lr * 0.1 * params["w"] - lr * gc / (np.abs(gc) + 1e-8)
    np.testing.assert_allclose(C.adamw_first_update(grads, params, o, "w"), expect, rtol=1e-12)
    # the norm gain is not decayed under "matrices" and its gradient is 0: no update
    assert C.adamw_first_update(grads, params, o, "n").tolist() == [0.0]

    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor(params["w"], dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    p.grad = torch.tensor(gc)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy() - params["w"],
                               C.adamw_first_update(grads, params, o, "w"), rtol=1e-10)
