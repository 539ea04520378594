"""What the trainer chooses for the hardware it runs on: the attention kernel and the
remat policy (``auto`` in the config) and the XLA compile options of the train step.

Shape legend as in :mod:`jaxlm.model`: B rows, T sequence, D hidden, H query heads,
K kv heads, Q head dim, F MLP hidden, V vocabulary, L layers.

Rules (docs/jaxlm.md):

- ``train.attention: auto`` -> ``cudnn`` (cuDNN flash attention through
  ``jax.nn.dot_product_attention``) when the devices are NVIDIA GPUs of compute
  capability >= 8.0, the compute dtype is bf16, and the head dim is a multiple of 8 and
  at most 128 (256 on Hopper and later), which is what JAX's cuDNN path accepts;
  ``xla`` otherwise (fp32 policies always use ``xla``: cuDNN's flash kernel has no fp32).
- ``train.remat: auto`` -> the first of ``none``, ``dots_saveable``, ``full`` whose
  estimated activation memory per device (:func:`activation_bytes`) fits in
  ``REMAT_BUDGET_FRACTION`` of the device memory left after the train state
  (:func:`state_bytes`); ``full`` if none fits. Device memory is the allocator's limit on
  accelerators, physical RAM shared by the local devices on CPU.
"""

from __future__ import annotations

import os
from typing import Any

from lmspec.config import ExperimentConfig, ModelConfig

# Compile options of the train step on GPUs (DebugOptions fields, checked by XLA: an
# unknown name is an error at compile time, not an abort). The latency-hiding scheduler
# overlaps the FSDP all-gathers / reduce-scatters with compute (JAX's "GPU performance
# tips"; NVIDIA's JAX-Toolbox sets it by default); on one GPU it changes nothing.
GPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_gpu_enable_latency_hiding_scheduler": True,
}

# Activation estimate may use at most this share of the memory left after the train
# state: XLA's temporaries, fragmentation and the estimate's own error take the rest.
REMAT_BUDGET_FRACTION = 0.5
REMAT_ORDER = ("none", "dots_saveable", "full")


def platform_of(devices: Any) -> str:
    """``"gpu"``, ``"cpu"``, ``"tpu"`` of the first device."""
    return list(devices)[0].platform


def compiler_options(platform: str) -> dict[str, Any]:
    """XLA compile options for the train step on ``platform`` (empty off GPU)."""
    return dict(GPU_COMPILER_OPTIONS) if platform == "gpu" else {}


def cudnn_attention_supported(head_dim: int, precision: str, platform: str,
                              compute_capability: str | None) -> bool:
    """Whether JAX's cuDNN flash attention takes these shapes on this device."""
    if platform != "gpu" or precision != "bf16" or not compute_capability:
        return False
    cc = tuple(int(x) for x in compute_capability.split("."))
    max_head_dim = 256 if cc >= (9, 0) else 128
    return cc >= (8, 0) and head_dim % 8 == 0 and head_dim <= max_head_dim


def resolve_attention(requested: str, model: ModelConfig, precision: str, devices: Any) -> str:
    """``train.attention`` with ``auto`` replaced by ``cudnn`` or ``xla`` (module doc)."""
    if requested != "auto":
        return requested
    dev = list(devices)[0]
    cc = getattr(dev, "compute_capability", None)
    ok = cudnn_attention_supported(model.head_dim, precision, dev.platform, cc)
    return "cudnn" if ok else "xla"


def state_bytes(model: ModelConfig, precision: str) -> int:
    """Train-state bytes of the whole model during a step: fp32 masters, AdamW's two fp32
    moments, the fp32 gradient accumulator and one micro-step's gradient, plus the
    compute-dtype copy of the weights in bf16."""
    from lmspec.flops import num_params

    n = num_params(model, include_embedding=True)
    per_param = 4 + 8 + 4 + 4 + (2 if precision == "bf16" else 0)
    return n * per_param


def activation_bytes(model: ModelConfig, rows: int, seq_len: int, precision: str,
                     attention: str, remat: str) -> int:
    """Estimated bytes the backward pass keeps from one micro-step's forward on ``rows``
    rows of ``seq_len`` tokens, under a remat policy.

    Per token and layer, without remat: the block input, both norm outputs, q/k/v before
    and after rotary, the attention output, the residual, gate/up/silu/product of the MLP
    (``a`` bytes each, the compute dtype) and the attention's own residuals (XLA: the
    fp32 (H, T) probabilities and scores; cuDNN: an fp32 statistic per head).
    ``dots_saveable`` keeps only matmul outputs (q, k, v, attention scores, attention
    output, o/gate/up/down projections); ``full`` keeps only each block's input, plus
    one block's full set while it is recomputed. The fp32 logits, log-probabilities
    and compute-dtype logits of the head come on top in every case.
    """
    d, f = model.hidden_size, model.intermediate_size
    h, k, q = model.num_attention_heads, model.num_key_value_heads, model.head_dim
    a = 2 if precision == "bf16" else 4
    attn_xla = 2 * h * seq_len * 4
    attn = h * 4 if attention == "cudnn" else attn_xla
    full_layer = a * (6 * d + 2 * (h + k) * q + h * q + 4 * f) + attn
    dots_attn = 0 if attention == "cudnn" else h * seq_len * a
    dots_layer = a * (d + (h + 2 * k) * q + h * q + 2 * d + 2 * f) + dots_attn
    per_layer = {"none": full_layer, "dots_saveable": dots_layer, "full": a * d}[remat]
    tokens = rows * seq_len
    body = tokens * model.num_hidden_layers * per_layer
    if remat == "full":
        body += tokens * full_layer  # the block being recomputed
    head = tokens * model.vocab_size * (4 + 4 + a)
    return int(body + head)


def device_memory_bytes(devices: Any) -> int:
    """Memory one device can use: the allocator's limit where the runtime reports one,
    else the machine's physical RAM divided among the local devices (CPU)."""
    devs = list(devices)
    stats = None
    try:
        stats = devs[0].memory_stats()
    except Exception:  # noqa: BLE001 - some runtimes raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = [d for d in devs if d.process_index == devs[0].process_index]
    return int(ram // max(1, len(local)))


def resolve_remat(requested: str, cfg: ExperimentConfig, *, rows_per_device: int,
                  param_shards: int, attention: str, device_bytes: int) -> str:
    """``train.remat`` with ``auto`` replaced by the cheapest policy that fits (module
    doc). ``param_shards`` is how many ways the parameters are split (fsdp x tensor)."""
    if requested != "auto":
        return requested
    precision, seq = cfg.train.precision, cfg.data.seq_len
    free = device_bytes - state_bytes(cfg.model, precision) / max(1, param_shards)
    budget = REMAT_BUDGET_FRACTION * free
    for policy in REMAT_ORDER:
        if activation_bytes(cfg.model, rows_per_device, seq, precision, attention,
                            policy) <= budget:
            return policy
    return "full"
