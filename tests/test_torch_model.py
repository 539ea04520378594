"""torchlm.model against Hugging Face's LlamaForCausalLM (independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmspec.config import load_config
from lmspec.weights import init_weights, param_shapes
from torchlm import api
from torchlm.model import Llama
from torchlm.weights import load_numpy, load_safetensors, save_safetensors, to_numpy

LOGIT_ATOL = 1e-5  # issue 4: max |logit diff| vs transformers, fp32
BATCH, SEQ = 4, 128
SMALL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128"]


def small_cfg(*overrides: str):
    return load_config("configs/tiny.yaml", [*SMALL, *overrides])


def random_weights(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """lmspec init, with norm gains moved off 1 so a norm-weight bug would show, and
    matrices scaled up so logits are O(1) (differences are not hidden by tiny logits)."""
    rng = np.random.default_rng(seed + 100)
    w = init_weights(cfg.model, seed)
    for k, v in w.items():
        if v.ndim == 1:
            w[k] = (1.0 + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        else:
            w[k] = (v * 3.0).astype(np.float32)
    return w


def tokens(cfg, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        0, cfg.model.vocab_size, (BATCH, SEQ), dtype=np.int32
    )


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 4, 8])
def test_logits_match_transformers(tie: bool, kv_heads: int) -> None:
    cfg = small_cfg(f"model.tie_word_embeddings={tie}", f"model.num_key_value_heads={kv_heads}")
    w = random_weights(cfg)
    tok = tokens(cfg)
    ours = api.logits(cfg, w, tok, "fp32")
    ref = api.hf_logits(cfg, w, tok)
    assert ours.shape == (BATCH, SEQ, cfg.model.vocab_size)
    assert ours.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    assert np.abs(ours - ref).max() <= LOGIT_ATOL


def test_reference_detects_a_rope_change() -> None:
    """The HF comparison can fail: a different rope_theta moves logits far beyond 1e-5."""
    cfg = small_cfg()
    other = small_cfg("model.rope_theta=500.0")
    w = random_weights(cfg)
    tok = tokens(cfg)
    assert np.abs(api.logits(other, w, tok, "fp32") - api.hf_logits(cfg, w, tok)).max() > 1e-3


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_names_are_hf(tie: bool) -> None:
    cfg = small_cfg(f"model.tie_word_embeddings={tie}")
    model = Llama(cfg.model)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == param_shapes(cfg.model)
    assert ("lm_head.weight" in got) is (not tie)


def test_loss_is_fp32_token_mean_cross_entropy() -> None:
    cfg = small_cfg()
    w = random_weights(cfg)
    win = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (3, 17), dtype=np.int32)
    model = api.build_model(cfg.model, w)
    loss = model.loss(torch.from_numpy(win))
    logits = api.hf_logits(cfg, w, win[:, :-1]).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, win[:, 1:, None].astype(np.int64), -1).mean()
    assert loss.dtype == torch.float32
    assert abs(float(loss.detach()) - ref) <= 1e-5 * abs(ref)


def test_grad_accumulation_equals_full_batch_gradient() -> None:
    cfg = small_cfg()
    w = random_weights(cfg)
    win = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (4, 33), dtype=np.int32)
    l1, g1 = api.loss_and_grads(cfg, w, win, "fp32")
    l2, g2 = api.loss_and_grads(cfg, w, win, "fp32", num_micro=2)
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    assert set(g1) == set(param_shapes(cfg.model))
    for k in g1:
        assert g1[k].dtype == np.float32
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_bf16_casts_every_weight_and_stays_close() -> None:
    cfg = small_cfg()
    w = random_weights(cfg)
    model = api.build_model(cfg.model, w, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tok = tokens(cfg)
    lo16 = api.logits(cfg, w, tok, "bf16")
    lo32 = api.logits(cfg, w, tok, "fp32")
    assert lo16.dtype == np.float32
    err = np.abs(lo16 - lo32).max()
    assert 0 < err < 0.1 * np.abs(lo32).max()
    loss, grads = api.loss_and_grads(cfg, w, np.concatenate([tok, tok[:, :1]], 1), "bf16")
    assert np.isfinite(loss) and all(g.dtype == np.float32 for g in grads.values())


@pytest.mark.parametrize("tie", [False, True])
def test_safetensors_roundtrip_strict(tmp_path, tie: bool) -> None:
    cfg = small_cfg(f"model.tie_word_embeddings={tie}")
    a = Llama(cfg.model)
    path = save_safetensors(a, tmp_path / "w.safetensors")
    b = Llama(cfg.model)
    load_safetensors(b, path)
    wa, wb = to_numpy(a), to_numpy(b)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    other = Llama(small_cfg(f"model.tie_word_embeddings={not tie}").model)
    with pytest.raises(ValueError, match="lm_head"):
        load_safetensors(other, path)


def test_bad_inputs_raise() -> None:
    cfg = small_cfg()
    w = init_weights(cfg.model, 0)
    with pytest.raises(ValueError, match="precision"):
        api.logits(cfg, w, tokens(cfg), "fp16")
    with pytest.raises(ValueError, match="tokens"):
        api.logits(cfg, w, np.zeros((2, 3), np.float32), "fp32")
    with pytest.raises(ValueError, match="num_micro"):
        api.loss_and_grads(cfg, w, np.zeros((3, 5), np.int32), "fp32", num_micro=2)


def test_float64_model_computes_in_float64() -> None:
    """The harness's float64 truth casts the module to double: no step may drop to fp32
    (RMSNorm statistics, logits and loss only promote bf16 up to fp32)."""
    cfg = small_cfg()
    w = random_weights(cfg)
    win = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (2, 33), dtype=np.int64)
    m32 = api.build_model(cfg.model, w)
    m64 = api.build_model(cfg.model, w).double()
    norm_in = torch.randn(2, 5, cfg.model.hidden_size, dtype=torch.float64)
    assert m64.model.norm(norm_in).dtype == torch.float64
    logits64 = m64(torch.from_numpy(win[:, :-1]))
    loss64 = m64.loss(torch.from_numpy(win))
    assert logits64.dtype == torch.float64 and loss64.dtype == torch.float64
    # fp32 and float64 agree to fp32 rounding, and are not bitwise equal
    loss32 = m32.loss(torch.from_numpy(win))
    diff = abs(float(loss32.detach()) - float(loss64.detach()))
    assert 0 < diff <= 1e-5 * float(loss64.detach())


# ----------------------------------------------------------------------------- attention paths

# fp32 attention against a float64 softmax(QK^T/sqrt(Q))V. Each output is a convex
# combination of <= 96 values of size ~1-4, so rounding stays within a few fp32 ulps of
# the exact value: measured 5.7e-7 to 7.3e-7 (both paths, torch 2.13 CPU). 2e-6 (2.7x the
# worst) leaves room for another kernel's summation order; a wrong head mapping, mask or
# scale is off by > 1e-2.
ATTN_ATOL = 2e-6


def attention_float64(q, k, v):
    """Independent reference: explicit causal softmax attention in float64, query head
    h reading kv head h // (H / K) (HF ``repeat_kv``)."""
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (6, 1)])
def test_flash_attention_matches_explicit_attention(heads: int, kv_heads: int) -> None:
    from torchlm.model import attention_flash, attention_repeat_kv

    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, 96, 32, generator=g)
    k = torch.randn(2, kv_heads, 96, 32, generator=g)
    v = torch.randn(2, kv_heads, 96, 32, generator=g)
    want = attention_float64(q, k, v)
    for fn in (attention_flash, attention_repeat_kv):
        got = fn(q, k, v)
        assert got.dtype == torch.float32 and got.shape == (2, heads, 96, 32)
        err = (got.double() - want).abs().max().item()
        assert err <= ATTN_ATOL, (fn.__name__, err)
    # the check can fail: the wrong kv-head mapping (h % K instead of h // (H/K))
    if kv_heads not in (1, heads):
        wrong = attention_float64(q, k[:, torch.arange(heads) % kv_heads],
                                  v[:, torch.arange(heads) % kv_heads])
        assert (attention_flash(q, k, v).double() - wrong).abs().max().item() > 1e-2


def test_model_attention_paths_agree() -> None:
    """The bench profile's model (flash) and the parity one (repeat_kv): same logits."""
    cfg = small_cfg("model.num_attention_heads=4", "model.num_key_value_heads=2")
    w = random_weights(cfg)
    x = torch.from_numpy(tokens(cfg).astype(np.int64))
    out = {}
    for kind in ("repeat_kv", "flash"):
        m = Llama(cfg.model, attention=kind)
        load_numpy(m, w)
        with torch.no_grad():
            out[kind] = m(x)
    diff = (out["flash"] - out["repeat_kv"]).abs().max().item()
    assert diff <= LOGIT_ATOL, diff
    with pytest.raises(ValueError, match="attention='fast'"):
        Llama(cfg.model, attention="fast")


# On CUDA the bench profile allows only fused kernels (no math fallback), so running at
# all proves one was found. fp32 (TF32 off): the memory-efficient kernel, a few fp32 ulps
# like the CPU kernels (1e-5 allows 10x the CPU bound). bf16: inputs rounded to bf16
# first and the reference is float64 on those same values; the kernel rounds the softmax
# probabilities (relative 2^-9 each) before P @ V and rounds the output (relative 2^-9),
# so |error| <= 2^-8 * max|v| (measured on an H100: 8.1e-3, with max|v| 5.19 the bound is 2.0e-2).
CUDA_FP32_ATTN_ATOL = 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flash_attention_on_cuda(precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torchlm.model import attention_flash

    api.configure_torch()  # TF32 off
    dtype = api.compute_dtype(precision)
    g = torch.Generator().manual_seed(1)
    # llama-1b's head layout: 32 query heads over 8 kv heads, head dim 64
    q, k, v = (torch.randn(2, h, 512, 64, generator=g).to(dtype) for h in (32, 8, 8))
    want = attention_float64(q.double(), k.double(), v.double())
    got = attention_flash(q.cuda(), k.cuda(), v.cuda())
    assert got.dtype == dtype
    err = (got.double().cpu() - want).abs().max().item()
    print(f"cuda {precision} flash attention max abs err {err:.3e}")  # noqa: T201
    bound = CUDA_FP32_ATTN_ATOL if precision == "fp32" else 2.0**-8 * v.abs().max().item()
    assert err <= bound, (err, bound)
