"""FLOP counting and MFU, one formula for both trainers.

Training FLOPs per token = 6 N + 12 L H Q T (Chowdhery et al., PaLM, appendix B):
N parameters in matmuls (embedding lookup excluded, ``lm_head`` included even when
tied, since its matmul is still done), L layers, H query heads, Q head dim, T sequence
length. Causal attention is not discounted, as in PaLM.
"""

from __future__ import annotations

from lmspec.config import ModelConfig

# Dense bf16 peak FLOP/s per device. Matched by substring of the device name
# (``jax.Device.device_kind`` / ``torch.cuda.get_device_name``), first match wins.
# The PCIe H100 has a lower clock and fewer SMs than the SXM part (NVIDIA H100 datasheet:
# 1513 TFLOP/s bf16 with sparsity, i.e. 756 dense), so it must match before "H100".
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def num_params(model: ModelConfig, *, include_embedding: bool = True) -> int:
    """Parameter count of the Llama model (norm weights included)."""
    d, f, v = model.hidden_size, model.intermediate_size, model.vocab_size
    q = model.head_dim
    attn = d * model.num_attention_heads * q * 2 + d * model.num_key_value_heads * q * 2
    mlp = 3 * d * f
    per_layer = attn + mlp + 2 * d
    n = model.num_hidden_layers * per_layer + d  # + final norm
    if include_embedding:
        n += v * d
    if not model.tie_word_embeddings or not include_embedding:
        n += v * d  # lm_head
    return n


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 N + 12 L H Q T."""
    n = num_params(model, include_embedding=False)
    attn = 12 * model.num_hidden_layers * model.num_attention_heads * model.head_dim * seq_len
    return float(6 * n + attn)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None for unknown hardware (e.g. CPU)."""
    if not device_name:
        return None
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(tokens_per_s_per_device: float, model: ModelConfig, seq_len: int,
        device_name: str | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where the peak is unknown."""
    peak = peak_flops(device_name)
    if peak is None:
        return None
    return tokens_per_s_per_device * flops_per_token(model, seq_len) / peak
