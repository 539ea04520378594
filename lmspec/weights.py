"""Parameter names, shapes and a framework-neutral initialisation.

Names and layouts are Hugging Face Llama's (``nn.Linear`` weights are (out, in)).
The parity harness initialises once here (numpy, seeded), writes safetensors, and
both sides load the same file, since RNGs cannot be matched across frameworks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmspec.config import ModelConfig
from lmspec.errors import UserError, UserFileNotFoundError

INIT_STD = 0.02  # Hugging Face LlamaConfig.initializer_range


def param_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's Hugging Face name and shape, in a fixed order."""
    d, f, v = model.hidden_size, model.intermediate_size, model.vocab_size
    hq = model.num_attention_heads * model.head_dim
    hkv = model.num_key_value_heads * model.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(model.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (hq, d)
        shapes[p + "self_attn.k_proj.weight"] = (hkv, d)
        shapes[p + "self_attn.v_proj.weight"] = (hkv, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, hq)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not model.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def decays(name: str, shape: tuple[int, ...], policy: str) -> bool:
    """Whether AdamW weight decay applies to this parameter under ``policy``.

    ``matrices``: tensors with ndim >= 2 (projections, embeddings, lm_head), not the
    RMSNorm gains (as in nanoGPT and most Llama recipes); ``all``; ``none``.
    """
    if policy == "matrices":
        return len(shape) >= 2
    if policy == "all":
        return True
    if policy == "none":
        return False
    raise ValueError(f"optim.wd_mask={policy!r}: allowed are ['matrices', 'all', 'none']")


def init_weights(model: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded fp32 weights: N(0, 0.02) matrices, ones for RMSNorm gains."""
    rng = np.random.default_rng([seed, 0x11A4A])
    out: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(model).items():
        if len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(
                np.float32
            )
    return out


def check_names(model: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """Strict check: same names and shapes as :func:`param_shapes`, else a UserError
    that lists the missing, unexpected and mis-shaped tensors."""
    expected = param_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    bad = sorted(
        f"{k}: {tuple(tensors[k].shape)} != {expected[k]}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != expected[k]
    )
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        if bad:
            parts.append(f"wrong shapes {bad}")
        raise UserError(f"{where}: " + "; ".join(parts))


def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write numpy tensors as safetensors, atomically."""
    from safetensors.numpy import save_file

    from lmspec.io import atomic_write

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(arrays, tmp))


def _check_weights_path(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"weights file {path} is a directory; name a .safetensors file")
    if not path.is_file():
        raise UserFileNotFoundError(f"weights file not found: {path}")


def _unreadable(path: Path, e: BaseException) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"weights file {path} is not a readable safetensors file ({first}); "
                     "is it truncated or another format? Write it again (e.g. "
                     "safetensors.numpy.save_file)")


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy; a UserError naming the file when it is
    missing, a folder, or not a complete safetensors file (garbage, truncated)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    _check_weights_path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, TypeError, ValueError) as e:  # TypeError: e.g. a bf16 dtype
        raise _unreadable(path, e) from e


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a safetensors file's header only (no tensor is read), with the
    errors of :func:`load_safetensors`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_weights_path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, TypeError, ValueError) as e:
        raise _unreadable(path, e) from e
