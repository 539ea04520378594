"""jaxlm model and weights against an independent pure-numpy Llama (HF layouts, float64).

The reference below is written from the HF Llama formulas directly on HF-named tensors
(x @ W.T, repeat_kv, an explicit causal mask), sharing no code with jaxlm.model.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm import api, weights  # noqa: E402
from jaxlm.model import Llama  # noqa: E402
from lmspec.config import ExperimentConfig, ModelConfig, TrainConfig, from_dict  # noqa: E402
from lmspec.weights import init_weights, param_shapes  # noqa: E402

LOGIT_ATOL = 1e-5  # fp32 JAX vs float64 numpy, logits
GRAD_RTOL = 1e-3  # fp32 JAX gradient vs float64 central finite difference
GRAD_ATOL = 1e-7

SMALL = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                    rope_theta=500.0, rms_norm_eps=1e-5)


def _cfg(model: ModelConfig, scan: bool = True) -> ExperimentConfig:
    return ExperimentConfig(model=model, train=TrainConfig(scan_layers=scan))


def _weights(model: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    w = init_weights(model, seed)
    rng = np.random.default_rng(seed + 1)
    for k in w:  # non-trivial norm gains so a mixed-up norm shows
        if w[k].ndim == 1:
            w[k] = (1.0 + 0.3 * rng.standard_normal(w[k].shape)).astype(np.float32)
        else:  # larger weights: logits of size O(1) make the comparison sharper
            w[k] = (w[k] * 5).astype(np.float32)
    return w


# ----------------------------------------------------------------------------- reference


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rope(x_bhtq, theta):
    t, q = x_bhtq.shape[-2], x_bhtq.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, q, 2) / q)
    f = np.outer(np.arange(t), inv)
    emb = np.concatenate([f, f], -1)
    rot = np.concatenate([-x_bhtq[..., q // 2:], x_bhtq[..., : q // 2]], -1)
    return x_bhtq * np.cos(emb) + rot * np.sin(emb)


def ref_logits(m: ModelConfig, w: dict[str, np.ndarray], tokens_bt: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in w.items()}
    b, t = tokens_bt.shape
    h, kv, q = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    x = w["model.embed_tokens.weight"][tokens_bt]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(m.num_hidden_layers):
        p = f"model.layers.{i}."
        a = _rms(x, w[p + "input_layernorm.weight"], m.rms_norm_eps)
        qh = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, h, q).transpose(0, 2, 1, 3)
        kh = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, kv, q).transpose(0, 2, 1, 3)
        vh = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, kv, q).transpose(0, 2, 1, 3)
        qh, kh = _rope(qh, m.rope_theta), _rope(kh, m.rope_theta)
        kh = np.repeat(kh, h // kv, axis=1)  # HF repeat_kv
        vh = np.repeat(vh, h // kv, axis=1)
        s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(q)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ vh).transpose(0, 2, 1, 3).reshape(b, t, h * q)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        a = _rms(x, w[p + "post_attention_layernorm.weight"], m.rms_norm_eps)
        g = a @ w[p + "mlp.gate_proj.weight"].T
        u = a @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], m.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if m.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


def ref_loss(m: ModelConfig, w: dict[str, np.ndarray], windows: np.ndarray) -> float:
    z = ref_logits(m, w, windows[:, :-1])
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    tgt = windows[:, 1:]
    return float(-np.take_along_axis(logp, tgt[..., None], -1).mean())


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_numpy_reference(scan: bool, tied: bool) -> None:
    m = ModelConfig(**{**SMALL.__dict__, "tie_word_embeddings": tied})
    w = _weights(m)
    tokens = np.random.default_rng(3).integers(0, m.vocab_size, (2, 67)).astype(np.int32)
    got = api.logits(_cfg(m, scan), w, tokens, "fp32")
    want = ref_logits(m, w, tokens)
    assert got.dtype == np.float32 and got.shape == (2, 67, m.vocab_size)
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL)


def test_bf16_logits_close_but_not_fp32() -> None:
    w = _weights(SMALL)
    tokens = np.random.default_rng(4).integers(0, SMALL.vocab_size, (2, 33)).astype(np.int32)
    f32 = api.logits(_cfg(SMALL), w, tokens, "fp32")
    b16 = api.logits(_cfg(SMALL), w, tokens, "bf16")
    assert b16.dtype == np.float32
    diff = np.abs(b16 - f32).max()
    assert 0 < diff < 0.1 * np.abs(f32).max()


def test_grads_match_finite_differences() -> None:
    m = SMALL
    w = _weights(m)
    windows = np.random.default_rng(5).integers(0, m.vocab_size, (4, 17)).astype(np.int32)
    loss, grads = api.loss_and_grads(_cfg(m), w, windows, "fp32")
    assert abs(loss - ref_loss(m, w, windows)) < 1e-5
    assert set(grads) == set(param_shapes(m))
    assert all(g.dtype == np.float32 and g.shape == w[k].shape for k, g in grads.items())
    rng = np.random.default_rng(6)
    picks = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.0.post_attention_layernorm.weight", "model.norm.weight",
             "model.embed_tokens.weight", "lm_head.weight"]
    h = 1e-3
    for name in picks:
        g = grads[name]
        # the entry with the largest gradient and one random entry of each tensor
        idxs = [np.unravel_index(np.argmax(np.abs(g)), g.shape),
                tuple(rng.integers(0, s) for s in g.shape)]
        for idx in idxs:
            wp = {k: v.astype(np.float64) for k, v in w.items()}
            wm = {k: v.copy() for k, v in wp.items()}
            wp[name][idx] += h
            wm[name][idx] -= h
            fd = (ref_loss(m, wp, windows) - ref_loss(m, wm, windows)) / (2 * h)
            assert abs(g[idx] - fd) <= GRAD_ATOL + GRAD_RTOL * abs(fd), (name, idx, g[idx], fd)


def test_micro_batches_sum_to_full_batch_grad() -> None:
    w = _weights(SMALL)
    windows = np.random.default_rng(7).integers(0, SMALL.vocab_size, (4, 9)).astype(np.int32)
    l1, g1 = api.loss_and_grads(_cfg(SMALL), w, windows, "fp32", num_micro=1)
    l4, g4 = api.loss_and_grads(_cfg(SMALL), w, windows, "fp32", num_micro=4)
    assert abs(l1 - l4) <= 1e-6 * abs(l1)
    for k in g1:
        np.testing.assert_allclose(g4[k], g1[k], rtol=1e-4, atol=1e-7)


def test_scan_and_loop_layers_agree_and_roundtrip(tmp_path) -> None:
    w = _weights(SMALL)
    tokens = np.arange(20, dtype=np.int32).reshape(2, 10)
    a = api.logits(_cfg(SMALL, True), w, tokens, "fp32")
    b = api.logits(_cfg(SMALL, False), w, tokens, "fp32")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    model = Llama(SMALL, rngs=nnx.Rngs(1))
    weights.from_hf(model, w)
    path = tmp_path / "w.safetensors"
    weights.save_safetensors(model, path)
    for scan in (True, False):
        loaded = weights.load_safetensors(SMALL, path, scan_layers=scan)
        back = weights.to_hf(loaded)
        assert all(np.array_equal(back[k], w[k]) for k in w)
    out = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(out, a, rtol=0, atol=1e-5)


def test_remat_policies_give_same_grads() -> None:
    w = _weights(SMALL)
    windows = np.random.default_rng(8).integers(0, SMALL.vocab_size, (2, 9)).astype(np.int32)
    base = from_dict({"model": SMALL.__dict__})
    ref = api.loss_and_grads(base, w, windows, "fp32")
    for remat in ("full", "dots_saveable"):
        cfg = from_dict({"model": SMALL.__dict__, "train": {"remat": remat}})
        loss, grads = api.loss_and_grads(cfg, w, windows, "fp32")
        assert loss == pytest.approx(ref[0], rel=1e-6)
        # recomputation changes XLA's fusion, hence fp32 rounding of single entries;
        # compare whole tensors (relative L2 error), which a wrong gradient would fail
        for k in grads:
            err = np.linalg.norm(grads[k] - ref[1][k]) / np.linalg.norm(ref[1][k])
            assert err <= 1e-5, (remat, k, err)


def test_strict_loading_lists_missing_and_extra(tmp_path) -> None:
    w = _weights(SMALL)
    bad = dict(w)
    del bad["model.norm.weight"]
    bad["model.layers.9.mlp.up_proj.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\]") as e:
        api.logits(_cfg(SMALL), bad, np.zeros((1, 2), np.int32), "fp32")
    assert "unexpected keys ['model.layers.9.mlp.up_proj.weight']" in str(e.value)
    wrong = dict(w)
    wrong["lm_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="wrong shapes"):
        weights.from_hf(Llama(SMALL, rngs=nnx.Rngs(0)), wrong)


def test_bad_inputs_raise() -> None:
    w = _weights(SMALL)
    with pytest.raises(ValueError, match="train.precision"):
        api.logits(_cfg(SMALL), w, np.zeros((1, 2), np.int32), "fp16")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        api.logits(_cfg(SMALL), w, np.full((1, 2), 97, np.int32), "fp32")
    with pytest.raises(ValueError, match="2-D"):
        api.logits(_cfg(SMALL), w, np.zeros((2,), np.int32), "fp32")
    with pytest.raises(ValueError, match="num_micro"):
        api.loss_and_grads(_cfg(SMALL), w, np.zeros((3, 5), np.int32), "fp32", num_micro=2)
    with pytest.raises(ValueError, match="train.remat"):
        Llama(SMALL, rngs=nnx.Rngs(0), remat="some")


def test_sample_argument_errors() -> None:
    from jaxlm.generate import sample

    cfg = _cfg(SMALL)
    kw = {"max_new_tokens": 4, "temperature": 0.0, "seed": 0}
    with pytest.raises(ValueError, match="--max-new-tokens=-1"):
        sample(cfg, {}, [1], **{**kw, "max_new_tokens": -1})
    with pytest.raises(ValueError, match="--temperature=-0.5"):
        sample(cfg, {}, [1], **{**kw, "temperature": -0.5})
    with pytest.raises(ValueError, match="encodes to no tokens"):
        sample(cfg, {}, [], **kw)
    with pytest.raises(ValueError, match="exceeds model.max_position_embeddings=256"):
        sample(cfg, {}, [1] * 253, **kw)  # 253 + 4 > 256


def test_greedy_sample_follows_argmax() -> None:
    from jaxlm.generate import sample

    w = _weights(SMALL)
    cfg = _cfg(SMALL)
    prompt = [5, 9, 11]
    new = sample(cfg, weights.hf_to_params(w, SMALL, True), prompt, max_new_tokens=4,
                 temperature=0.0, seed=0)
    seq = list(prompt)
    for _ in range(4):  # re-derive each greedy choice from the reference logits
        seq.append(int(np.argmax(ref_logits(SMALL, w, np.array([seq]))[0, -1])))
    assert new == seq[len(prompt):]


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_kv_cache_generation_equals_recomputing_the_prefix(scan: bool) -> None:
    """jaxlm generate's key/value cache (prefill, then one token a step): the same greedy
    tokens and sampled tokens as recomputing the whole prefix for every token, and each
    cached step's logits those of the full forward at that position."""
    from dataclasses import replace

    from jaxlm.generate import sample

    w = _weights(SMALL)
    cfg = _cfg(SMALL)
    cfg = replace(cfg, train=replace(cfg.train, scan_layers=scan))
    params = weights.hf_to_params(w, SMALL, scan)
    prompt = [5, 9, 11, 2, 40]
    for temperature in (0.0, 0.8):
        kw = {"max_new_tokens": 12, "temperature": temperature, "seed": 3}
        assert sample(cfg, params, prompt, cache=True, **kw) == \
            sample(cfg, params, prompt, cache=False, **kw)
    model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Llama(
        SMALL, rngs=nnx.Rngs(0), scan_layers=scan)))[0], params)
    seq = np.array([[5, 9, 11, 2, 40, 7, 7, 1]], np.int32)
    full = np.asarray(model(jnp.asarray(seq)))
    kv = model.init_cache(1, seq.shape[1])
    got, kv = model.decode(jnp.asarray(seq[:, :5]), kv, jnp.int32(0))
    parts = [np.asarray(got)]
    for p in range(5, seq.shape[1]):
        got, kv = model.decode(jnp.asarray(seq[:, p:p + 1]), kv, jnp.int32(p))
        parts.append(np.asarray(got))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=2e-5)
