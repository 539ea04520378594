"""In-process entry points for the parity harness: single device, HF-named numpy in/out.

Both functions use the trainer's own code paths (:mod:`jaxlm.model`, :mod:`jaxlm.step`)
so what they check is what trains. In ``fp32`` matmuls run at full fp32 precision
(``jax.default_matmul_precision("float32")``; GPUs otherwise use TF32).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import step as _step
from jaxlm import tuning
from jaxlm.model import Llama, compute_dtype
from jaxlm.weights import hf_to_params, params_to_hf
from lmspec.config import ExperimentConfig


def matmul_precision(precision: str) -> contextlib.AbstractContextManager[Any]:
    """Full fp32 matmuls for the fp32 policy; the default (bf16 inputs) otherwise."""
    compute_dtype(precision)  # validates
    if precision == "fp32":
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


def _graphdef(cfg: ExperimentConfig, precision: str, rows: int) -> nnx.GraphDef:
    """The model's structure on one device, ``auto`` settings resolved as the trainer
    resolves them (:mod:`jaxlm.tuning`) for ``rows`` rows at once."""
    t = cfg.train
    devices = jax.devices()[:1]
    attention = tuning.resolve_attention(t.attention, cfg.model, precision, devices)
    one = dataclasses.replace(cfg, train=dataclasses.replace(t, precision=precision))
    remat = tuning.resolve_remat(t.remat, one, rows_per_device=rows, param_shards=1,
                                 attention=attention,
                                 device_bytes=tuning.device_memory_bytes(devices))
    abstract = nnx.eval_shape(lambda: Llama(
        cfg.model, rngs=nnx.Rngs(0), dtype=compute_dtype(precision),
        scan_layers=t.scan_layers, remat=remat, attention=attention,
    ))
    graphdef, _ = nnx.split(abstract)
    return graphdef


def _device_params(cfg: ExperimentConfig, weights: dict[str, np.ndarray]) -> dict:
    params = hf_to_params(weights, cfg.model, cfg.train.scan_layers, "weights")
    dev = jax.devices()[0]
    return jax.tree.map(lambda x: jax.device_put(x, dev), params)


def _check_tokens(tokens: np.ndarray, cfg: ExperimentConfig, name: str, ndim: int = 2) -> None:
    if tokens.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D int array, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
    v = cfg.model.vocab_size
    if tokens.size and (tokens.min() < 0 or tokens.max() >= v):
        raise ValueError(f"{name}: token ids must be in [0, {v}) (model.vocab_size)")


def logits(cfg: ExperimentConfig, weights: dict[str, np.ndarray], tokens: np.ndarray,
           precision: str) -> np.ndarray:
    """fp32 logits (B, T, V) of HF-named fp32 ``weights`` on int tokens (B, T)."""
    tokens = np.asarray(tokens)
    _check_tokens(tokens, cfg, "tokens")
    graphdef = _graphdef(cfg, precision, tokens.shape[0])
    dt = compute_dtype(precision)
    params = _device_params(cfg, weights)

    @jax.jit
    def fwd(params: dict, tokens_bt: jax.Array) -> jax.Array:
        cast = jax.tree.map(lambda p: p.astype(dt), params)
        return nnx.merge(graphdef, cast)(tokens_bt)

    with matmul_precision(precision):
        out_btv = fwd(params, jnp.asarray(tokens, jnp.int32))
    return np.asarray(out_btv, np.float32)


def loss_and_grads(cfg: ExperimentConfig, weights: dict[str, np.ndarray],
                   batch_windows: np.ndarray, precision: str, num_micro: int = 1
                   ) -> tuple[float, dict[str, np.ndarray]]:
    """Global token-mean loss of windows (B, T+1) and its fp32 gradients, HF-named.

    ``num_micro`` splits the batch into that many micro-batches (rows in order) and
    accumulates in fp32 exactly as the trainer does.
    """
    windows = np.asarray(batch_windows)
    _check_tokens(windows, cfg, "batch_windows")
    if windows.shape[1] < 2:
        raise ValueError(f"batch_windows: need T+1 >= 2 columns, got {windows.shape}")
    if num_micro < 1 or windows.shape[0] % num_micro:
        raise ValueError(
            f"num_micro={num_micro} must be >= 1 and divide the batch size {windows.shape[0]}"
        )
    graphdef = _graphdef(cfg, precision, windows.shape[0] // num_micro)
    params = _device_params(cfg, weights)
    # looked up on the module at call time: the trainer's own step functions
    loss_fn = _step.make_loss_fn(graphdef, precision)
    w_mbt1 = windows.reshape(num_micro, windows.shape[0] // num_micro, windows.shape[1])

    @jax.jit
    def run(params: dict, w_mbt1: jax.Array) -> tuple[jax.Array, dict]:
        return _step.accumulate_grads(loss_fn, params, w_mbt1)

    with matmul_precision(precision):
        loss, grads = run(params, jnp.asarray(w_mbt1, jnp.int32))
    grads_np = jax.tree.map(lambda g: np.asarray(g, np.float32), grads)
    return float(loss), params_to_hf(grads_np, cfg.model, cfg.train.scan_layers)


def loss_on_logits(cfg: ExperimentConfig, weights: dict[str, np.ndarray],
                   windows: np.ndarray, logits: np.ndarray, precision: str
                   ) -> tuple[float, np.ndarray]:
    """The trainer's loss (``jaxlm.step.make_loss_fn``, looked up at call time) of
    ``windows`` (B, T+1) with the model's logits replaced by ``logits`` (B, T, V), and its
    gradient with respect to those logits (fp32): the loss function alone, on inputs
    another implementation can be given too."""
    windows = np.asarray(windows)
    _check_tokens(windows, cfg, "windows")
    b, t1 = windows.shape
    if np.shape(logits) != (b, t1 - 1, cfg.model.vocab_size):
        raise ValueError(f"logits: expected shape {(b, t1 - 1, cfg.model.vocab_size)}, "
                         f"got {np.shape(logits)}")
    graphdef = _graphdef(cfg, precision, b)
    params = _device_params(cfg, weights)
    loss_fn = _step.make_loss_fn(graphdef, precision)
    fixed = jnp.asarray(logits, jnp.float32)  # the dtype Llama returns its logits in
    num_tokens = jnp.asarray(b * (t1 - 1), jnp.float32)
    orig = Llama.__call__

    def loss_of(delta: jax.Array) -> jax.Array:
        def call(self: Any, tokens_bt: jax.Array) -> jax.Array:
            return fixed + delta

        Llama.__call__ = call  # for the duration of this trace only
        try:
            return loss_fn(params, jnp.asarray(windows, jnp.int32), num_tokens)
        finally:
            Llama.__call__ = orig

    loss, grad = jax.value_and_grad(loss_of)(jnp.zeros_like(fixed))
    return float(loss), np.asarray(grad, np.float32)
