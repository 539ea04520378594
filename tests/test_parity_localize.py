"""parity.localize on synthetic data (no trainers): the ladder names the first quantity
over its noise, the optimizer search names the one setting that explains an update, the
data step names step, micro-step and rank; and on a small real model the activation
capture of both frameworks agrees, while a planted norm bug is found where it is."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lmspec.config import load_config
from lmspec.schedule import lr_at
from lmspec.weights import init_weights, param_shapes
from parity import localize as L

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=96",
         "data.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs/tiny.yaml", SMALL)


def run(label, side, precision, metrics, grads=None, params=None):
    spec = SimpleNamespace(label=label, side=side, precision=precision)
    return SimpleNamespace(spec=spec, metrics=metrics, grads0=grads, params0=params, error=None)


def metrics(losses, fps=None, parts=None, lrs=None, optim=None):
    out = []
    for s, loss in enumerate(losses):
        rec = {"step": s, "loss": loss, "batch_fingerprint": (fps or {}).get(s, f"fp{s}"),
               "lr": lrs[s] if lrs else (lr_at(s, optim) if optim else 1e-3)}
        if parts is not None:
            rec["batch_fingerprint_parts"] = parts[s]
        out.append(rec)
    return out


def noisy(x, rel, rng):
    x = np.asarray(x, np.float64)
    return x + rel * np.linalg.norm(x) / np.sqrt(x.size) * rng.standard_normal(x.shape)


def test_compare_to_truth_names_the_first_over():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    truth = {n: rng.standard_normal(50) for n in names}
    ref = {n: noisy(truth[n], 1e-7, rng) for n in names}
    test = {"a": noisy(truth["a"], 3e-7, rng), "b": noisy(truth["b"], 1e-3, rng),
            "c": noisy(truth["c"], 1e-2, rng)}
    rows = L.compare_to_truth(test, ref, truth, names, 10.0, 1e-6)
    assert [r.over for r in rows] == [False, True, True]
    assert L.first_over(rows).name == "b"
    assert L.first_over(rows[:1]) is None


def test_data_divergence_names_step_micro_step_and_rank():
    parts = [[f"p{s}.{k}" for k in range(8)] for s in range(4)]
    bad = [list(p) for p in parts]
    bad[2][5] = "other"
    bad[2][7] = "other"
    a = run("jax fp32", "jax", "fp32", metrics([1.0] * 4, {2: "x"}, bad))
    b = run("ds zero1 fp32", "torch", "fp32", metrics([1.0] * 4, parts=parts))
    d = L.data_divergence(a, b, world_size=2)
    assert (d["step"], d["part"], d["micro_step"], d["rank"], d["parts_differing"]) == \
        (2, 5, 2, 1, 2)
    assert L.data_divergence(b, b, 2) is None
    # without parts: the step alone
    a2 = run("jax fp32", "jax", "fp32", metrics([1.0] * 4, {3: "x"}))
    b2 = run("ds", "torch", "fp32", metrics([1.0] * 4))
    assert L.data_divergence(a2, b2, 2) == {"step": 3, "test": "jax fp32", "ref": "ds"}


def _grads_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    p = init_weights(cfg.model, 0)
    g = {}
    for k, shape in param_shapes(cfg.model).items():
        # magnitudes from 1e-10 to 1e-2: some elements near eps, a global norm above 1
        g[k] = rng.standard_normal(shape) * 10.0 ** rng.uniform(-10, -2, shape)
    g["model.embed_tokens.weight"][0] *= 3e3
    return g, p


VARIANTS = [("lr", {"lr": "step1"}), ("eps", {"eps_inside": True}),
            ("decay_mask", {"decay": "all"}), ("decay_coefficient", {"decay_lr_scaled": False}),
            ("decay_coefficient", {"coupled": True}), ("clipping", {"clip": "tensor"}),
            ("betas", {"bias2": False})]


@pytest.mark.parametrize("setting,kw", VARIANTS)
def test_explain_optimizer_names_the_setting(cfg, setting, kw):
    g, p = _grads_params(cfg)
    kw = {k: (lr_at(1, cfg.optim) if v == "step1" else v) for k, v in kw.items()}
    rng = np.random.default_rng(1)
    names = list(param_shapes(cfg.model))
    u_test = {k: v.astype(np.float32) for k, v in L.adamw_step0(g, p, cfg.optim, **kw).items()}
    u_ref = {k: noisy(v, 1e-7, rng) for k, v in
             L.adamw_step0(g, p, cfg.optim, clip_eps=1e-6).items()}
    rows = L.optimizer_rows(u_test, g, u_ref, g, p, cfg.optim, names)
    assert any(r.over for r in rows)
    why = L.explain_optimizer(u_test, g, p, cfg.optim, rows)
    assert why is not None and why["setting"] == setting, why
    assert why["left_over_with_it"] == 0
    # a faithful update is not over anywhere
    u_ok = {k: v.astype(np.float32) for k, v in L.adamw_step0(g, p, cfg.optim).items()}
    assert not any(r.over for r in L.optimizer_rows(u_ok, g, u_ref, g, p, cfg.optim, names))


def test_later_divergence_and_logged_lr(cfg):
    o = cfg.optim
    base = [6.0 - 0.1 * s for s in range(8)]
    ds = run("ds", "torch", "fp32", metrics(base, optim=o))
    late = [x * (1 + (3e-4 if s >= 3 else 1e-7)) for s, x in enumerate(base)]
    f = L.later_divergence(run("j", "jax", "fp32", metrics(late, optim=o)), [ds], o)
    assert f["category"] == "optimizer:after_step0" and f["step"] == 3
    lrs = [lr_at(s, o) for s in range(8)]
    lrs[4] *= 1.5
    f = L.later_divergence(run("j", "jax", "fp32", metrics(base, lrs=lrs)), [ds], o)
    assert f["category"] == "optimizer:lr" and "step 4" in f["headline"]
    assert L.later_divergence(run("j", "jax", "fp32", metrics(base, optim=o)), [ds], o) is None


def _synthetic_truth(cfg, rng, bad_act=None, bad_grad=None):
    names = L.activation_names(cfg.model.num_hidden_layers)
    acts64 = {n: rng.standard_normal((2, 4, 8)) for n in names}
    torch32 = {n: noisy(acts64[n], 1e-7, rng) for n in names}
    jax32 = {n: noisy(acts64[n], 2e-7 if n != bad_act else 1e-2, rng) for n in names}
    g64, p = _grads_params(cfg)
    gds = {k: noisy(v, 1e-7, rng) for k, v in g64.items()}
    gj = {k: noisy(v, 2e-7 if k != bad_grad else 1e-3, rng) for k, v in g64.items()}
    truth = {"acts64": acts64, "torch32": torch32, "jax32": jax32, "loss64": 5.0,
             "grads64": g64}
    upd = L.adamw_step0(gj, p, cfg.optim)
    upd_ds = L.adamw_step0(gds, p, cfg.optim, clip_eps=1e-6)
    jax = run("jax fp32", "jax", "fp32", metrics([5.0 * (1 + 1e-8)] * 4, optim=cfg.optim),
              gj, {k: p[k] + upd[k] for k in p})
    ds = run("ds zero1 fp32", "torch", "fp32", metrics([5.0 * (1 - 1e-8)] * 4, optim=cfg.optim),
             gds, {k: p[k] + upd_ds[k] for k in p})
    return truth, p, {"jax fp32": jax, "ds zero1 fp32": ds}


def test_fp32_ladder_on_synthetic_runs(cfg):
    rng = np.random.default_rng(2)
    truth, p, runs = _synthetic_truth(cfg, rng)
    assert L.fp32_ladder(cfg, p, None, runs, truth) is None
    truth, p, runs = _synthetic_truth(cfg, rng, bad_act="layer 1 mlp")
    f = L.fp32_ladder(cfg, p, None, runs, truth)
    assert f["category"] == "forward:mlp" and "layer 1 mlp at step 0" in f["headline"]
    truth, p, runs = _synthetic_truth(cfg, rng, bad_grad="model.layers.1.mlp.up_proj.weight")
    f = L.fp32_ladder(cfg, p, None, runs, truth)
    assert f["category"] == "gradient:model.layers.1.mlp.up_proj.weight", f["headline"]
    truth, p, runs = _synthetic_truth(cfg, rng)
    runs["jax fp32"].metrics[0]["loss"] = 5.01
    assert L.fp32_ladder(cfg, p, None, runs, truth)["category"] == "loss"
    truth, p, runs = _synthetic_truth(cfg, rng)
    runs["jax fp32"].metrics[1]["batch_fingerprint"] = "other"
    f = L.fp32_ladder(cfg, p, None, runs, truth)
    assert f["category"] == "data" and "step 1" in f["headline"]


def test_capture_agrees_across_frameworks_and_finds_a_planted_norm_bug(cfg):
    sys.path.insert(0, str(ROOT / "tests" / "plants"))
    import parity_plants

    w = init_weights(cfg.model, 1)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 16))
    names = L.activation_names(cfg.model.num_hidden_layers)
    t64 = L.torch_activations(cfg, w, tokens, "fp64")
    t32 = L.torch_activations(cfg, w, tokens, "fp32")
    j32 = L.jax_activations(cfg, w, tokens, "fp32")
    assert list(j32) == list(t32) == names
    rows = L.compare_to_truth(j32, t32, t64, names, L.FWD_MULTIPLE, L.FWD_ABS)
    assert L.first_over(rows) is None, [r.to_dict() for r in rows]
    undo = parity_plants.apply("norm_eps")
    try:
        bad = L.jax_activations(cfg, w, tokens, "fp32")
    finally:
        undo()
    r = L.first_over(L.compare_to_truth(bad, t32, t64, names, L.FWD_MULTIPLE, L.FWD_ABS))
    assert r is not None and r.name == "layer 0 input_layernorm"


def _synthetic_bf16(cfg, rng, bad_act=None, loss_off=0.0, bad_grad=None):
    names = L.activation_names(cfg.model.num_hidden_layers)
    acts64 = {n: rng.standard_normal((2, 4, 8)) for n in names}
    torch16 = {n: noisy(acts64[n], 4e-3, rng) for n in names}
    hf16 = {n: noisy(torch16[n], 3e-3, rng) for n in names}
    jax16 = {n: noisy(torch16[n], 3e-3 if n != bad_act else 3e-2, rng) for n in names}
    g64, p = _grads_params(cfg)
    gt = {k: noisy(v, 1e-2, rng) for k, v in g64.items()}
    gh = {k: noisy(v, 5e-3, rng) for k, v in gt.items()}
    gj = {k: noisy(v, 5e-3 if k != bad_grad else 5e-2, rng) for k, v in gt.items()}
    truth = {"acts64": acts64, "torch16": torch16, "hf16": hf16, "jax16": jax16,
             "loss64": 5.0, "grads64": g64, "torch16_loss": 5.001, "hf16_loss": 5.0011,
             "torch16_grads": gt, "hf16_grads": gh}
    jax = run("jax bf16", "jax", "bf16", metrics([5.0011 + loss_off] * 4, optim=cfg.optim), gj)
    ds = run("ds zero1 bf16", "torch", "bf16", metrics([5.001] * 4, optim=cfg.optim), gt)
    return truth, p, {"jax bf16": jax, "ds zero1 bf16": ds}


def test_bf16_ladder_on_synthetic_runs(cfg):
    rng = np.random.default_rng(3)
    truth, p, runs = _synthetic_bf16(cfg, rng)
    assert L.bf16_ladder(cfg, p, None, runs, truth) is None
    truth, p, runs = _synthetic_bf16(cfg, rng, bad_act="layer 0 input_layernorm")
    f = L.bf16_ladder(cfg, p, None, runs, truth)
    assert f["category"] == "bf16:forward" and "layer 0 input_layernorm" in f["headline"]
    truth, p, runs = _synthetic_bf16(cfg, rng, loss_off=0.01)
    assert L.bf16_ladder(cfg, p, None, runs, truth)["category"] == "bf16:loss"
    truth, p, runs = _synthetic_bf16(cfg, rng, bad_grad="model.norm.weight")
    f = L.bf16_ladder(cfg, p, None, runs, truth)
    assert f["category"] == "bf16:gradients" and "model.norm.weight" in f["headline"]


def test_bf16_curve_judges_the_first_steps(cfg):
    def mk(label, side, prec, losses):
        r = run(label, side, prec, metrics(losses, optim=cfg.optim))
        r.spec.zero_stage = None if side == "jax" else 1
        return r

    base = [6.0 - 0.05 * s for s in range(12)]
    ds32 = mk("ds zero1 fp32", "torch", "fp32", base)
    ds16 = mk("ds zero1 bf16", "torch", "bf16", [x + 1e-3 * (-1) ** s for s, x in
                                                 enumerate(base)])
    ok = mk("jax bf16", "jax", "bf16", [x + 1e-3 * (-1) ** s + 1e-4 for s, x in
                                        enumerate(base)])
    assert L.bf16_curve(ok, [ds16], [ds32]) is None
    bad = mk("jax bf16", "jax", "bf16", [x + 2e-3 for x in base])
    f = L.bf16_curve(bad, [ds16], [ds32])
    assert f["category"] == "bf16:loss" and "steps 0-9" in f["headline"]
