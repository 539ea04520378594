"""In-process entry points for the parity harness (single process, no DeepSpeed).

``precision="bf16"`` mirrors DeepSpeed's bf16 mode: the whole module (norm gains
included) is cast to bfloat16 for forward and backward; gradients are returned as fp32
(DeepSpeed copies the bf16 gradients into fp32 buffers before accumulating).
"""

from __future__ import annotations

import numpy as np
import torch

from lmspec.config import PRECISIONS, ExperimentConfig, ModelConfig
from torchlm.model import Llama
from torchlm.weights import load_numpy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configure_torch(num_threads: int | None = None) -> None:
    """Deterministic CPU/GPU numerics: no TF32, deterministic kernels where cheap."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if num_threads is not None:
        torch.set_num_threads(max(1, num_threads))


def compute_dtype(precision: str) -> torch.dtype:
    """torch dtype of the forward/backward pass for a precision name."""
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}: allowed are {list(PRECISIONS)}")
    return DTYPES[precision]


def build_model(model_cfg: ModelConfig, weights: dict[str, np.ndarray] | None,
                precision: str = "fp32", device: str | torch.device = "cpu") -> Llama:
    """A :class:`Llama` with ``weights`` loaded strictly, cast to the compute dtype."""
    dtype = compute_dtype(precision)
    model = Llama(model_cfg)
    if weights is not None:
        load_numpy(model, weights)
    return model.to(device=device, dtype=dtype)


def _as_tokens(a: np.ndarray, name: str, ndim: int = 2) -> torch.Tensor:
    a = np.asarray(a)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer array of {ndim} dims, got "
                         f"{a.dtype} {a.shape}")
    return torch.from_numpy(a.astype(np.int64))


def logits(cfg: ExperimentConfig, weights: dict[str, np.ndarray], tokens: np.ndarray,
           precision: str) -> np.ndarray:
    """fp32 logits (B, T, V) of ``tokens`` (B, T) under ``precision``."""
    configure_torch()
    model = build_model(cfg.model, weights, precision)
    with torch.no_grad():
        out_btv = model(_as_tokens(tokens, "tokens"))
    return out_btv.float().numpy()


def loss_and_grads(cfg: ExperimentConfig, weights: dict[str, np.ndarray],
                   windows: np.ndarray, precision: str, num_micro: int = 1
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """Token-mean loss of ``windows`` (B, T+1) and its fp32 gradient per HF name.

    ``num_micro`` > 1 splits the batch into equal micro-batches (rows in order) whose
    gradients (each of its micro-batch mean / ``num_micro``) are summed in fp32, as
    DeepSpeed's gradient accumulation does.
    """
    configure_torch()
    model = build_model(cfg.model, weights, precision)
    w = _as_tokens(windows, "windows")
    if num_micro < 1 or w.shape[0] % num_micro:
        raise ValueError(f"num_micro={num_micro} must be >= 1 and divide the batch "
                         f"size {w.shape[0]}")
    params = dict(model.named_parameters())
    acc = {k: torch.zeros(p.shape, dtype=torch.float32) for k, p in params.items()}
    total = 0.0
    for chunk in w.chunk(num_micro, dim=0):
        model.zero_grad(set_to_none=True)
        loss = model.loss(chunk) / num_micro
        loss.backward()
        total += float(loss.detach())
        for k, p in params.items():
            acc[k] += p.grad.float()
    return total, {k: v.numpy() for k, v in acc.items()}


def hf_config(model_cfg: ModelConfig):  # -> transformers.LlamaConfig
    """The equivalent ``transformers.LlamaConfig`` (built locally, nothing downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_key_value_heads,
        head_dim=model_cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
    )


def hf_model(model_cfg: ModelConfig, weights: dict[str, np.ndarray],
             attn_implementation: str = "eager"):  # -> transformers.LlamaForCausalLM
    """``transformers.LlamaForCausalLM`` in fp32 with ``weights`` loaded strictly."""
    from transformers import LlamaForCausalLM

    from lmspec.weights import check_names

    check_names(model_cfg, weights, "weights")
    config = hf_config(model_cfg)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).float().eval()
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()}
    if model_cfg.tie_word_embeddings:
        # HF registers the tied lm_head.weight (same Parameter) in its state dict
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if model_cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_logits(cfg: ExperimentConfig, weights: dict[str, np.ndarray],
              tokens: np.ndarray) -> np.ndarray:
    """fp32 logits (B, T, V) from Hugging Face's ``LlamaForCausalLM`` (independent
    reference for the harness)."""
    configure_torch()
    model = hf_model(cfg.model, weights)
    with torch.no_grad():
        out = model(input_ids=_as_tokens(tokens, "tokens"), use_cache=False)
    return out.logits.float().numpy()
