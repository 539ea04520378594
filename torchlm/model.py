"""Llama decoder as a plain single-device PyTorch module (the reference side).

Numerics follow the shared spec (``lmspec``, docs/lmspec.md) and Hugging Face's
``modeling_llama``: RMSNorm statistics in fp32 (HF order), half-split rotary embeddings
with cos/sin computed in fp32 then cast, grouped-query attention through
``F.scaled_dot_product_attention(is_causal=True)``, SwiGLU MLP, optional tied
``lm_head``, logits and cross-entropy in fp32. Parameter names and layouts are HF
Llama's, so ``state_dict()`` loads into ``transformers.LlamaForCausalLM`` strictly.
No parallelism lives here; DeepSpeed wraps this module from the outside.

Two attention paths (``Llama(cfg, attention=...)``), the same function of the inputs:
``"repeat_kv"`` (the default, what parity runs use) repeats the K/V heads as HF's
``repeat_kv`` and lets SDPA pick its kernel; ``"flash"`` (DeepSpeed's ``bench`` profile)
keeps K/V at their own head count (``enable_gqa``) and, on CUDA, allows only the fused
kernels (FlashAttention, cuDNN, memory-efficient), so a slow fallback is an error.

Shape legend:
    B batch, T sequence length, D hidden size, H query heads, K key/value heads,
    Q head dim, F MLP intermediate size, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmspec.config import ModelConfig
from lmspec.weights import INIT_STD

ATTENTION_KINDS = ("repeat_kv", "flash")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp32 inputs; float64 stays float64 (the harness's float64 truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Root-mean-square norm, HF order: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        x32_btd = _at_least_fp32(x_btd)
        var_bt1 = x32_btd.pow(2).mean(-1, keepdim=True)
        y_btd = x32_btd * torch.rsqrt(var_bt1 + self.eps)
        return self.weight * y_btd.to(x_btd.dtype)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, Q) for positions 0..T-1, computed in fp32, cast to ``dtype``.

    Computed on every call instead of kept as a buffer: DeepSpeed's bf16 mode casts a
    module's buffers to bf16, which would round ``inv_freq`` before the product.
    """
    q = cfg.head_dim
    inv_freq_h = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, q, 2, dtype=torch.int64, device=device).float() / q)
    )  # (Q/2,)
    pos_t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs_th = torch.outer(pos_t, inv_freq_h)
    emb_tq = torch.cat([freqs_th, freqs_th], dim=-1)
    return emb_tq.cos().to(dtype), emb_tq.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x_bhtq: torch.Tensor, cos_tq: torch.Tensor, sin_tq: torch.Tensor) -> torch.Tensor:
    return x_bhtq * cos_tq + rotate_half(x_bhtq) * sin_tq


def attention_repeat_kv(q_bhtq: torch.Tensor, k_bktq: torch.Tensor,
                        v_bktq: torch.Tensor) -> torch.Tensor:
    """Causal attention with K/V repeated to the query heads first (HF ``repeat_kv``:
    query head h reads kv head h // (H / K)); SDPA chooses its kernel."""
    rep = q_bhtq.shape[1] // k_bktq.shape[1]
    if rep != 1:
        k_bktq = k_bktq.repeat_interleave(rep, dim=1)
        v_bktq = v_bktq.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q_bhtq, k_bktq, v_bktq, is_causal=True)


def attention_flash(q_bhtq: torch.Tensor, k_bktq: torch.Tensor,
                    v_bktq: torch.Tensor) -> torch.Tensor:
    """Causal attention in one fused kernel; grouped K/V heads are mapped inside the
    kernel (same head mapping as :func:`attention_repeat_kv`, no repeated copy)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q_bhtq.shape[1] != k_bktq.shape[1]
    if q_bhtq.device.type == "cuda":
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION]
        if gqa and q_bhtq.dtype == torch.float32:
            # fp32 on CUDA leaves only the memory-efficient kernel, which takes equal
            # head counts: repeat K/V as HF's repeat_kv does
            return attention_repeat_kv_in(fused, q_bhtq, k_bktq, v_bktq)
    else:  # CPU: its flash kernel, or the math one where that does not apply
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(fused, set_priority=True):
        return F.scaled_dot_product_attention(q_bhtq, k_bktq, v_bktq, is_causal=True,
                                              enable_gqa=gqa)


def attention_repeat_kv_in(backends: list, q_bhtq: torch.Tensor, k_bktq: torch.Tensor,
                           v_bktq: torch.Tensor) -> torch.Tensor:
    """:func:`attention_repeat_kv` restricted to ``backends`` (SDPA back-end list)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends, set_priority=True):
        return attention_repeat_kv(q_bhtq, k_bktq, v_bktq)


ATTENTION_FNS = {"repeat_kv": attention_repeat_kv, "flash": attention_flash}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str = "repeat_kv") -> None:
        super().__init__()
        if attention not in ATTENTION_FNS:
            raise ValueError(f"attention={attention!r}: allowed are {list(ATTENTION_KINDS)}")
        self.attend = ATTENTION_FNS[attention]
        d, q = cfg.hidden_size, cfg.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = q
        self.q_proj = nn.Linear(d, self.num_heads * q, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * q, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * q, bias=False)
        self.o_proj = nn.Linear(self.num_heads * q, d, bias=False)

    def forward(self, x_btd: torch.Tensor, cos_tq: torch.Tensor,
                sin_tq: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_btd.shape
        q_bhtq = self.q_proj(x_btd).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k_bktq = self.k_proj(x_btd).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_bktq = self.v_proj(x_btd).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_bhtq = apply_rope(q_bhtq, cos_tq, sin_tq)
        k_bktq = apply_rope(k_bktq, cos_tq, sin_tq)
        o_bhtq = self.attend(q_bhtq, k_bktq, v_bktq)
        o_btd = o_bhtq.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(o_btd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str = "repeat_kv") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_btd: torch.Tensor, cos_tq: torch.Tensor,
                sin_tq: torch.Tensor) -> torch.Tensor:
        h_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_tq, sin_tq)
        return h_btd + self.mlp(self.post_attention_layernorm(h_btd))


class LlamaBody(nn.Module):
    """HF ``LlamaModel``: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, attention: str = "repeat_kv") -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attention)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """Causal Llama LM with HF parameter names; ``forward`` returns fp32 logits.

    With ``tie_word_embeddings`` there is no ``lm_head`` module (and no ``lm_head.weight``
    in the state dict, as :func:`lmspec.weights.param_shapes` says): the output projection
    uses ``model.embed_tokens.weight``. ``attention`` is one of :data:`ATTENTION_KINDS`
    (see the module docstring); it changes kernels, not parameters.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "repeat_kv") -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = LlamaBody(cfg, attention)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) matrices, ones for norm gains (the distribution of
        :func:`lmspec.weights.init_weights`; load that for cross-framework runs)."""
        for p in self.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, INIT_STD, generator=generator)

    def forward(self, tokens_bt: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> fp32 logits (B, T, V)."""
        if tokens_bt.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be int32 or int64, got {tokens_bt.dtype}")
        body = self.model
        x_btd = body.embed_tokens(tokens_bt)
        cos_tq, sin_tq = rope_cos_sin(self.cfg, tokens_bt.shape[1], x_btd.dtype, x_btd.device)
        for layer in body.layers:
            x_btd = layer(x_btd, cos_tq, sin_tq)
        x_btd = body.norm(x_btd)
        if self.cfg.tie_word_embeddings:
            logits_btv = F.linear(x_btd, body.embed_tokens.weight)
        else:
            logits_btv = self.lm_head(x_btd)
        return _at_least_fp32(logits_btv)

    def loss(self, windows_bt1: torch.Tensor) -> torch.Tensor:
        """Token-mean cross-entropy (fp32) of windows (B, T+1): predict w[:, 1:] from
        w[:, :-1]."""
        return token_loss(self(windows_bt1[:, :-1]), windows_bt1[:, 1:])


def token_loss(logits_btv: torch.Tensor, targets_bt: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all B*T tokens, log-softmax in fp32."""
    return F.cross_entropy(
        _at_least_fp32(logits_btv).reshape(-1, logits_btv.shape[-1]),
        targets_bt.reshape(-1).long(),
    )
