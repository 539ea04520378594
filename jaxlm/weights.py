"""Hugging Face Llama names and layouts <-> the JAX parameter tree, and safetensors I/O.

HF ``nn.Linear`` weights are (out, in); the JAX model keeps kernels as (in, ...out)
with heads split out, and the scanned stack keeps per-layer tensors on a leading
``layers`` axis. The table :data:`LAYER_TABLE` is the whole conversion. Loading is
strict: missing, unexpected or mis-shaped tensors raise a ``ValueError`` that lists them
(:func:`lmspec.weights.check_names`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmspec import weights as lw
from lmspec.config import ModelConfig

Array = np.ndarray
# (path inside a block, HF suffix after "model.layers.N.", to_hf, from_hf(hf, cfg))
LayerEntry = tuple[tuple[str, ...], str, Callable[[Array], Array],
                   Callable[[Array, ModelConfig], Array]]


def _heads_in(kind: str) -> Callable[[Array, ModelConfig], Array]:
    def f(hf_oi: Array, cfg: ModelConfig) -> Array:  # (N*Q, D) -> (D, N, Q)
        n = cfg.num_attention_heads if kind == "q" else cfg.num_key_value_heads
        return hf_oi.T.reshape(cfg.hidden_size, n, cfg.head_dim)
    return f


def _q_to_hf(w_dnq: Array) -> Array:  # (D, N, Q) -> (N*Q, D)
    return w_dnq.reshape(w_dnq.shape[0], -1).T


def _o_to_hf(w_hqd: Array) -> Array:  # (H, Q, D) -> (D, H*Q)
    return w_hqd.reshape(-1, w_hqd.shape[-1]).T


def _o_from_hf(hf_dm: Array, cfg: ModelConfig) -> Array:  # (D, H*Q) -> (H, Q, D)
    return hf_dm.T.reshape(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size)


def _same(x: Array, _cfg: ModelConfig | None = None) -> Array:
    return x


def _t(x: Array, _cfg: ModelConfig | None = None) -> Array:
    return x.T


LAYER_TABLE: tuple[LayerEntry, ...] = (
    (("input_norm", "scale"), "input_layernorm.weight", _same, _same),
    (("attn", "q_dhq"), "self_attn.q_proj.weight", _q_to_hf, _heads_in("q")),
    (("attn", "k_dkq"), "self_attn.k_proj.weight", _q_to_hf, _heads_in("kv")),
    (("attn", "v_dkq"), "self_attn.v_proj.weight", _q_to_hf, _heads_in("kv")),
    (("attn", "o_hqd"), "self_attn.o_proj.weight", _o_to_hf, _o_from_hf),
    (("post_norm", "scale"), "post_attention_layernorm.weight", _same, _same),
    (("mlp", "gate_df"), "mlp.gate_proj.weight", _t, _t),
    (("mlp", "up_df"), "mlp.up_proj.weight", _t, _t),
    (("mlp", "down_fd"), "mlp.down_proj.weight", _t, _t),
)
# (path, HF name, to_hf, from_hf) of the tensors outside the blocks
TOP_TABLE = (
    (("embed_vd",), "model.embed_tokens.weight", _same, _same),
    (("final_norm", "scale"), "model.norm.weight", _same, _same),
    (("lm_head_dv",), "lm_head.weight", _t, _t),
)


def _get(tree: dict, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_names_of_paths(cfg: ModelConfig, scan_layers: bool) -> dict[tuple, str]:
    """JAX parameter path -> the HF name it holds (layer 0's name for a scanned stack)."""
    out: dict[tuple, str] = {}
    for path, hf, _, _ in TOP_TABLE:
        if hf in lw.param_shapes(cfg):
            out[path] = hf
    for sub, suffix, _, _ in LAYER_TABLE:
        if scan_layers:
            out[("layers", *sub)] = f"model.layers.0.{suffix}"
        else:
            for i in range(cfg.num_hidden_layers):
                out[("layers", i, *sub)] = f"model.layers.{i}.{suffix}"
    return out


def params_to_hf(params: dict, cfg: ModelConfig, scan_layers: bool) -> dict[str, Array]:
    """Pure parameter dict (arrays) -> ``{HF name: fp32 numpy (HF layout)}``."""
    out: dict[str, Array] = {}
    for path, hf, to_hf, _ in TOP_TABLE:
        if hf in lw.param_shapes(cfg):
            out[hf] = to_hf(np.asarray(_get(params, path), np.float32))
    for sub, suffix, to_hf, _ in LAYER_TABLE:
        if scan_layers:
            stack = np.asarray(_get(params, ("layers", *sub)), np.float32)
            for i in range(cfg.num_hidden_layers):
                out[f"model.layers.{i}.{suffix}"] = to_hf(stack[i])
        else:
            for i in range(cfg.num_hidden_layers):
                w = np.asarray(_get(params, ("layers", i, *sub)), np.float32)
                out[f"model.layers.{i}.{suffix}"] = to_hf(w)
    return {k: np.ascontiguousarray(out[k]) for k in lw.param_shapes(cfg)}


def hf_to_params(tensors: dict[str, Array], cfg: ModelConfig, scan_layers: bool,
                 where: str = "weights") -> dict:
    """``{HF name: array}`` -> pure parameter dict (fp32 numpy), strict on names/shapes."""
    lw.check_names(cfg, tensors, where)
    params: dict = {}
    for path, hf, _, from_hf in TOP_TABLE:
        if hf in tensors:
            _set(params, path, np.asarray(from_hf(tensors[hf], cfg), np.float32))
    for sub, suffix, _, from_hf in LAYER_TABLE:
        per_layer = [
            np.asarray(from_hf(np.asarray(tensors[f"model.layers.{i}.{suffix}"]), cfg),
                       np.float32)
            for i in range(cfg.num_hidden_layers)
        ]
        if scan_layers:
            _set(params, ("layers", *sub), np.stack(per_layer))
        else:
            for i, w in enumerate(per_layer):
                _set(params, ("layers", i, *sub), w)
    return params


def decay_mask(cfg: ModelConfig, scan_layers: bool, policy: str) -> dict:
    """Pure dict of bools like the params: AdamW weight decay per :func:`lmspec.weights.decays`
    evaluated on the HF name and HF shape of each tensor."""
    shapes = lw.param_shapes(cfg)
    mask: dict = {}
    for path, hf in hf_names_of_paths(cfg, scan_layers).items():
        _set(mask, path, lw.decays(hf, shapes[hf], policy))
    return mask


def _model_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def to_hf(model: nnx.Module) -> dict[str, Array]:
    """The model's fp32 parameters with HF Llama names and layouts."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _model_params(model))
    return params_to_hf(params, model.cfg, model.scan_layers)


def from_hf(model: nnx.Module, tensors: dict[str, Array], where: str = "weights"
            ) -> nnx.Module:
    """Load HF-named tensors into ``model`` in place (strict); returns the model."""
    params = hf_to_params(tensors, model.cfg, model.scan_layers, where)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    nnx.update(model, state)
    return model


def save_safetensors(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Write the model's fp32 parameters as HF-named safetensors (atomically)."""
    return lw.save_safetensors(to_hf(model), path)


def load_safetensors(model_or_cfg: nnx.Module | ModelConfig, path: str | os.PathLike,
                     **model_kwargs: Any) -> nnx.Module:
    """Strictly load an HF-named safetensors file into a model.

    ``model_or_cfg`` is a :class:`jaxlm.model.Llama` (loaded in place) or a
    ``ModelConfig`` (a new model is built, ``model_kwargs`` passed to ``Llama``).
    """
    tensors = lw.load_safetensors(path)
    if isinstance(model_or_cfg, ModelConfig):
        from jaxlm.model import Llama

        cfg = model_or_cfg
        lw.check_names(cfg, tensors, str(path))
        model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), **model_kwargs))
    else:
        model = model_or_cfg
    return from_hf(model, tensors, str(path))
