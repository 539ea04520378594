"""Each planted porting bug of tests/plants/ takes effect (the patched path computes
something else than the original on a tiny input), bf16 plants leave fp32 untouched,
and the import-time overlay plants in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmspec.config import load_config
from lmspec.weights import init_weights

ROOT = Path(__file__).resolve().parents[1]
PLANT_DIR = ROOT / "tests" / "plants"
sys.path.insert(0, str(PLANT_DIR))
import parity_plants  # noqa: E402

SMALL = ["model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=96",
         "data.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = load_config(ROOT / "configs/tiny.yaml", SMALL)
    w = init_weights(cfg.model, 3)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.model.vocab_size, size=(8, cfg.data.seq_len + 1))
    return cfg, w, windows


def _plant(name):
    return parity_plants.apply(name)


def _forward(cfg, w, windows, precision="fp32"):
    from jaxlm import api

    return api.logits(cfg, w, windows[:, :-1], precision)


def _loss_grads(cfg, w, windows, precision="fp32", num_micro=4):
    from jaxlm import api  # looks jaxlm.step's functions up at call time: plants are seen

    return api.loss_and_grads(cfg, w, windows, precision, num_micro)


def _opt_updates(cfg, w, steps=2):
    import jax
    import jax.numpy as jnp

    from jaxlm import step as S
    from jaxlm.weights import hf_to_params

    tx, _ = S.make_optimizer(cfg, cfg.train.scan_layers)
    params = jax.tree.map(jnp.asarray, hf_to_params(w, cfg.model, cfg.train.scan_layers, "w"))
    state = tx.init(params)
    rng = np.random.default_rng(1)
    out = []
    for _ in range(steps):
        # magnitudes from 1e-9 (near eps) to 0.1: a global norm above the clip (~4.5)
        grads = jax.tree.map(lambda p: jnp.asarray(
            rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-9, -1, p.shape), jnp.float32),
            params)
        upd, state = tx.update(grads, state, params)
        out.append(np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(upd)]))
    return out


FORWARD = ["rope_interleaved", "norm_eps", "attn_scale", "gqa_tiled", "mlp_swap", "tied_head"]
OPTIM = ["adam_eps_inside", "decay_all", "decay_unscaled", "clip_per_tensor", "lr_offset"]
LOSS = ["z_loss", "micro_mean"]


def test_catalogue_covers_the_issue():
    cats = {p.category.split(":")[0] for p in parity_plants.PLANTS.values()}
    assert len(parity_plants.PLANTS) >= 15
    assert cats == {"forward", "optimizer", "loss", "data", "bf16"}
    tested = set(FORWARD + OPTIM + LOSS + ["betas_swapped", "row_offset", "bf16_grad_accum",
                                            "bf16_norm_stats", "bf16_softmax_loss"])
    assert tested == set(parity_plants.PLANTS)
    for p in parity_plants.PLANTS.values():
        assert p.module.startswith("jaxlm.") and p.description and p.precision in ("fp32",
                                                                                   "bf16")


@pytest.mark.parametrize("name", FORWARD)
def test_forward_plant_changes_logits(small, name):
    cfg, w, windows = small
    before = _forward(cfg, w, windows)
    undo = _plant(name)
    try:
        after = _forward(cfg, w, windows)
    finally:
        undo()
    assert np.max(np.abs(after - before)) > 1e-3 * np.max(np.abs(before))
    np.testing.assert_array_equal(_forward(cfg, w, windows), before)  # undone


@pytest.mark.parametrize("name", LOSS)
def test_loss_plant_changes_loss(small, name):
    cfg, w, windows = small
    loss0, _ = _loss_grads(cfg, w, windows)
    undo = _plant(name)
    try:
        loss1, _ = _loss_grads(cfg, w, windows)
    finally:
        undo()
    assert abs(loss1 - loss0) > 1e-4 * abs(loss0)


@pytest.mark.parametrize("name", OPTIM)
def test_optimizer_plant_changes_the_first_update(small, name):
    cfg, w, _ = small
    before = _opt_updates(cfg, w, 1)[0]
    undo = _plant(name)
    try:
        after = _opt_updates(cfg, w, 1)[0]
    finally:
        undo()
    assert np.linalg.norm(after - before) > 1e-4 * np.linalg.norm(before)


def test_betas_swapped_changes_only_later_updates(small):
    cfg, w, _ = small
    before = _opt_updates(cfg, w, 2)
    undo = _plant("betas_swapped")
    try:
        after = _opt_updates(cfg, w, 2)
    finally:
        undo()
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6, atol=1e-12)
    assert np.linalg.norm(after[1] - before[1]) > 1e-3 * np.linalg.norm(before[1])


def _rms_norm_out(x):
    from jaxlm.model import RMSNorm

    norm = RMSNorm(x.shape[-1], 1e-5, x.dtype)
    return np.asarray(norm(x).astype("float32"))


def test_bf16_norm_stats_changes_bf16_norms_only():
    import jax.numpy as jnp

    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32) * 3
    x32, x16 = jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)
    before = (_rms_norm_out(x32), _rms_norm_out(x16))
    undo = _plant("bf16_norm_stats")
    try:
        after = (_rms_norm_out(x32), _rms_norm_out(x16))
    finally:
        undo()
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    assert not np.array_equal(after[1], before[1])


def test_bf16_softmax_loss_changes_the_bf16_loss_only():
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm import step as S

    class Bigram(nnx.Module):  # a stand-in model: logits = a table row per token
        def __init__(self) -> None:
            self.table = nnx.Param(jnp.asarray(
                np.random.default_rng(0).standard_normal((96, 96)) * 4, jnp.float32))

        def __call__(self, tokens_bt):
            return jnp.take(self.table[...], tokens_bt, axis=0).astype(jnp.float32)

    graphdef, state = nnx.split(Bigram())
    params = nnx.to_pure_dict(state)
    w_bt1 = jnp.asarray(np.random.default_rng(1).integers(0, 96, (4, 17)), jnp.int32)
    n = jnp.asarray(64.0)

    def losses():
        return [float(S.make_loss_fn(graphdef, p)(params, w_bt1, n)) for p in ("fp32", "bf16")]

    before = losses()
    undo = _plant("bf16_softmax_loss")
    try:
        after = losses()
    finally:
        undo()
    assert after[0] == pytest.approx(before[0], rel=1e-6)
    assert after[1] != before[1]


def test_bf16_grad_accum_sums_bf16_micro_gradients_in_bf16():
    import jax.numpy as jnp

    from jaxlm import step as S

    rng = np.random.default_rng(0)
    w_mbt1 = jnp.asarray(rng.standard_normal((4, 2, 33)), jnp.float32)

    def make(precision):
        def loss_fn(params, w, num_tokens):
            a = params["a"].astype(jnp.bfloat16 if precision == "bf16" else jnp.float32)
            return jnp.sum((a * w.astype(a.dtype)).astype(jnp.float32)) / num_tokens
        return loss_fn

    undo = _plant("bf16_grad_accum")
    try:
        outs = {}
        for prec in ("fp32", "bf16"):
            fn = make(prec)
            fn.bf16_accumulate = prec == "bf16"  # what the planted make_loss_fn sets
            outs[prec] = np.asarray(S.accumulate_grads(fn, {"a": jnp.ones((2, 33))},
                                                       w_mbt1)[1]["a"])
    finally:
        undo()
    ref16 = np.asarray(S.accumulate_grads(make("bf16"), {"a": jnp.ones((2, 33))}, w_mbt1)[1]["a"])
    ref32 = np.asarray(S.accumulate_grads(make("fp32"), {"a": jnp.ones((2, 33))}, w_mbt1)[1]["a"])
    np.testing.assert_array_equal(outs["fp32"], ref32)
    assert not np.array_equal(outs["bf16"], ref16)
    # every planted sum is a bf16 value
    np.testing.assert_array_equal(outs["bf16"],
                                  np.asarray(jnp.asarray(outs["bf16"], jnp.bfloat16), np.float32))


def test_bf16_grad_accum_tags_the_loss_with_the_policy():
    from jaxlm import step as S

    undo = _plant("bf16_grad_accum")
    try:
        graphdef = None  # the original make_loss_fn only closes over it
        assert S.make_loss_fn(graphdef, "bf16").bf16_accumulate is True
        assert S.make_loss_fn(graphdef, "fp32").bf16_accumulate is False
    finally:
        undo()


def test_row_offset_shifts_one_devices_rows(small, tmp_path):
    from jaxlm import trainer
    from lmspec.data import Dataset

    text = tmp_path / "c.txt"
    text.write_text("".join(f"row {i} of a small corpus for the plant\n" for i in range(300)))
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      SMALL + [f"data.source=text:{text}", f"data.cache_dir={tmp_path}",
                               "model.vocab_size=512"])
    clean = Dataset.from_config(cfg, progress=False).global_batch(0)
    undo = _plant("row_offset")
    try:
        shifted = trainer.Dataset.from_config(cfg, progress=False).global_batch(0)
    finally:
        undo()
    same = [bool(np.array_equal(a, b)) for a, b in zip(clean, shifted, strict=True)]
    assert not all(same) and any(same)  # one device's rows moved, the others did not


def test_overlay_plants_at_import_in_a_fresh_interpreter():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLANT_DIR), str(ROOT)]),
               PARITY_PLANT="norm_eps", JAX_PLATFORMS="cpu")
    code = ("import jaxlm.trainer, jaxlm.model as m; "
            "print(m.RMSNorm.__call__.__module__)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "parity_plants"
    assert "norm_eps planted in jaxlm.model" in r.stderr
    bad = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True,
                         env=dict(env, PARITY_PLANT="no_such_plant"), timeout=60)
    assert bad.returncode != 0 and "unknown plant" in bad.stderr
