"""Planted porting bugs for the parity harness's sensitivity catalogue (test code only).

Each :class:`Plant` is one small, realistic mistake someone porting the DeepSpeed model
to JAX could make, applied by replacing ONE function or method of a ``jaxlm`` module
after that module is imported (``sitecustomize.py`` beside this file does it when
``PARITY_PLANT=<name>`` is set; tests call :func:`apply` directly). Nothing here touches
``torchlm`` or ``lmspec``: the DeepSpeed reference stays the reference.

``category`` is where :mod:`parity.localize` should say the port went wrong;
``precision`` is the run that shows it (bf16 plants are no-ops in fp32).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Plant:
    name: str
    description: str
    category: str
    module: str  # the jaxlm module whose attribute is replaced
    precision: str  # "fp32" or "bf16": the parity run that exposes it
    patch: Callable[[Any], dict[str, Any]]  # module -> {attribute path: new value}
    overrides: tuple[str, ...] = ()  # config the catalogue judges it on


# ----------------------------------------------------------------------------- forward


def _rope_interleaved(m: Any) -> dict[str, Any]:
    import jax.numpy as jnp

    def rope_cos_sin(seq_len, head_dim, theta, dtype, start=0):
        # GPT-J / Meta-checkpoint layout: frequencies repeated per (even, odd) pair
        inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        pos = jnp.arange(seq_len, dtype=jnp.float32) + jnp.asarray(start, jnp.float32)
        freqs = jnp.outer(pos, inv_freq)
        emb = jnp.repeat(freqs, 2, axis=-1)
        return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)

    def rotate_half(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return jnp.stack([-x2, x1], axis=-1).reshape(x.shape)

    return {"rope_cos_sin": rope_cos_sin, "rotate_half": rotate_half}


def _norm_eps(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def __call__(self, x_btd):
        x32 = x_btd.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + 1e-6)  # Flax's default eps, not config.rms_norm_eps
        return self.scale[...].astype(self.dtype) * y.astype(x_btd.dtype)

    return {"RMSNorm.__call__": __call__}


def _attention(m: Any, *, scale_by_hidden: bool = False, tiled_kv: bool = False
               ) -> Callable[..., Any]:
    """Attention.__call__ as in jaxlm.model with one change."""
    import jax
    import jax.numpy as jnp

    def __call__(self, x_btd):
        dt = self.dtype
        q = m.dot.einsum("btd,dhq->bthq", x_btd, self.q_dhq[...].astype(dt))
        k = m.dot.einsum("btd,dkq->btkq", x_btd, self.k_dkq[...].astype(dt))
        v = m.dot.einsum("btd,dkq->btkq", x_btd, self.v_dkq[...].astype(dt))
        cos, sin = m.rope_cos_sin(x_btd.shape[1], q.shape[-1], self.theta, dt)
        q, k = m.apply_rope(q, cos, sin), m.apply_rope(k, cos, sin)
        scale = None
        if scale_by_hidden:  # 1/sqrt(D) instead of 1/sqrt(Q)
            scale = 1.0 / math.sqrt(x_btd.shape[-1])
        if tiled_kv:  # query head h reads kv head h % K instead of h // (H/K)
            rep = q.shape[2] // k.shape[2]
            k, v = jnp.tile(k, (1, 1, rep, 1)), jnp.tile(v, (1, 1, rep, 1))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return m.dot.einsum("bthq,hqd->btd", o, self.o_hqd[...].astype(dt))

    return __call__


def _mlp_swap(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def __call__(self, x_btd):
        dt = self.dtype
        g = m.dot.einsum("btd,df->btf", x_btd, self.gate_df[...].astype(dt))
        u = m.dot.einsum("btd,df->btf", x_btd, self.up_df[...].astype(dt))
        s = jax.nn.silu(u.astype(jnp.float32)).astype(u.dtype)  # silu on up, not gate
        return m.dot.einsum("btf,fd->btd", s * g, self.down_fd[...].astype(dt))

    return {"MLP.__call__": __call__}


def _tied_head(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def __call__(self, tokens_bt):
        dt = self.dtype
        x = jnp.take(self.embed_vd[...].astype(dt), tokens_bt, axis=0)
        if self.scan_layers:
            graphdef, state_l = nnx.split(self.layers)
            block = self._block_fn(graphdef)
            x, _ = jax.lax.scan(lambda c, s: (block(s, c), None), x, state_l)
        else:
            for layer in self.layers:
                graphdef, state = nnx.split(layer)
                x = self._block_fn(graphdef)(state, x)
        x = self.final_norm(x)
        # the output projection always reads the embedding (tie_word_embeddings ignored)
        return m.dot.einsum("btd,dv->btv", x, self.embed_vd[...].astype(dt).T
                            ).astype(jnp.float32)

    return {"Llama.__call__": __call__}


# ----------------------------------------------------------------------------- optimizer


def _optimizer(m: Any, *, eps_inside: bool = False, betas_swapped: bool = False,
               decay_all: bool = False, decay_unscaled: bool = False,
               clip_per_tensor: bool = False, lr_offset: int = 0) -> dict[str, Any]:
    """jaxlm.step.make_optimizer with one setting wrong."""
    import jax
    import jax.numpy as jnp
    import optax

    def make_optimizer(cfg, scan_layers):
        o = cfg.optim
        table = m.lr_values(cfg)  # the logged LR stays right
        table_j = jnp.asarray(table)

        def schedule(count):
            return table_j[jnp.minimum(count + lr_offset, table_j.shape[0] - 1)]

        mask = m.decay_mask(cfg.model, scan_layers, o.wd_mask)
        if decay_all:
            mask = jax.tree.map(lambda _: True, mask)
        parts = []
        if o.grad_clip > 0:
            if clip_per_tensor:
                def clip(updates, params=None):
                    def one(g):
                        n = jnp.sqrt(jnp.sum(g * g))
                        return g * jnp.minimum(1.0, o.grad_clip / jnp.maximum(n, 1e-30))
                    return jax.tree.map(one, updates)
                parts.append(optax.stateless(clip))
            else:
                parts.append(optax.clip_by_global_norm(o.grad_clip))
        b1, b2 = (o.beta2, o.beta1) if betas_swapped else (o.beta1, o.beta2)
        eps, eps_root = (0.0, o.eps) if eps_inside else (o.eps, 0.0)
        if decay_unscaled:
            # decay added after the LR scaling: p -= wd * p instead of lr * wd * p
            parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
                      optax.scale_by_learning_rate(schedule),
                      optax.add_decayed_weights(-o.weight_decay, mask)]
        else:
            parts.append(optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                                     eps_root=eps_root, weight_decay=o.weight_decay,
                                     mask=mask, nesterov=False))
        return optax.chain(*parts), table

    return {"make_optimizer": make_optimizer}


# ----------------------------------------------------------------------------- loss


def _z_loss(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def cross_entropy_sum(logits_btv, targets_bt):
        x = logits_btv.astype(jnp.float32)
        logp = jax.nn.log_softmax(x, axis=-1)
        nll = -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
        z = jax.nn.logsumexp(x, axis=-1)
        return jnp.sum(nll + 1e-4 * z * z)  # PaLM's z-loss, left on from another recipe

    return {"cross_entropy_sum": cross_entropy_sum}


def _micro_mean(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def accumulate_grads(loss_fn, params, windows_mbt1):
        _, rows, t1 = windows_mbt1.shape
        # each micro-batch's own token mean, summed: M times the global mean
        num_tokens = jnp.asarray(rows * (t1 - 1), jnp.float32)
        grad_fn = jax.value_and_grad(loss_fn)

        def body(carry, w):
            loss_acc, acc = carry
            loss, grads = grad_fn(params, w, num_tokens)
            return (loss_acc + loss, jax.tree.map(lambda a, g: a + g, acc, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        windows_mbt1)
        return loss, grads

    return {"accumulate_grads": accumulate_grads}


# ----------------------------------------------------------------------------- data


def _row_offset(m: Any) -> dict[str, Any]:
    import jax

    base = m.Dataset

    class ShiftedRows:
        """The dataset as the trainer's last data-parallel device reads it: one row on."""

        def __init__(self, ds: Any, cfg: Any) -> None:
            self._ds = ds
            dp = jax.device_count()
            self._rows = cfg.train.global_batch_size // cfg.grad_accum_steps(dp)
            self._per_dev = max(1, self._rows // dp)
            self._total = cfg.train.global_batch_size

        def __getattr__(self, name: str) -> Any:
            return getattr(self._ds, name)

        def _src(self, g: int) -> int:
            last = (g % self._rows) // self._per_dev == self._rows // self._per_dev - 1
            return (g + 1) % self._total if last and self._rows > 1 else g

        def global_batch_rows(self, step, start, stop):
            import numpy as np
            return np.stack([self._ds.global_batch_rows(step, s, s + 1)[0]
                             for s in map(self._src, range(start, stop))])

        def global_batch(self, step):
            return self.global_batch_rows(step, 0, self._total)

    class Dataset:
        @staticmethod
        def from_config(cfg, **kw):
            return ShiftedRows(base.from_config(cfg, **kw), cfg)

    return {"Dataset": Dataset}


# ----------------------------------------------------------------------------- bf16


def _bf16_grad_accum(m: Any) -> dict[str, Any]:
    orig_make_loss_fn = m.make_loss_fn

    def make_loss_fn(graphdef, precision):
        fn = orig_make_loss_fn(graphdef, precision)
        fn.bf16_accumulate = precision == "bf16"  # tells accumulate_grads the policy
        return fn

    return {"make_loss_fn": make_loss_fn, "accumulate_grads": _bf16_accumulate(m)}


def _bf16_accumulate(m: Any) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp

    orig = m.accumulate_grads

    def accumulate_grads(loss_fn, params, windows_mbt1):
        if not getattr(loss_fn, "bf16_accumulate", False):
            return orig(loss_fn, params, windows_mbt1)
        num_micro, rows, t1 = windows_mbt1.shape
        num_tokens = jnp.asarray(num_micro * rows * (t1 - 1), jnp.float32)
        grad_fn = jax.value_and_grad(loss_fn)

        def body(carry, w):
            loss_acc, acc = carry
            loss, grads = grad_fn(params, w, num_tokens)
            acc = jax.tree.map(lambda a, g: (a + g.astype(jnp.bfloat16)).astype(jnp.bfloat16),
                               acc, grads)
            return (loss_acc + loss.astype(jnp.float32), acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.bfloat16), params)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        windows_mbt1)
        return loss, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    return accumulate_grads


def _bf16_norm_stats(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def __call__(self, x_btd):
        # statistics in the activation dtype (bf16 under the bf16 policy), not fp32
        var = jnp.mean(x_btd * x_btd, axis=-1, keepdims=True)
        y = x_btd * jax.lax.rsqrt(var + jnp.asarray(self.eps, x_btd.dtype))
        return self.scale[...].astype(self.dtype) * y

    return {"RMSNorm.__call__": __call__}


def _bf16_softmax_loss(m: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def make_loss_fn(graphdef, precision):
        dt = m.compute_dtype(precision)

        def loss_fn(params, windows_bt1, num_tokens):
            cast = jax.tree.map(lambda p: p.astype(dt), params)
            logits = nnx.merge(graphdef, cast)(windows_bt1[:, :-1])
            # log-softmax in the compute dtype (bf16), only the sum in fp32
            logp = jax.nn.log_softmax(logits.astype(dt), axis=-1)
            nll = -jnp.take_along_axis(logp, windows_bt1[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(nll.astype(jnp.float32)) / num_tokens

        return loss_fn

    return {"make_loss_fn": make_loss_fn}


# ----------------------------------------------------------------------------- the table

M, S, T = "jaxlm.model", "jaxlm.step", "jaxlm.trainer"

PLANTS: dict[str, Plant] = {p.name: p for p in (
    Plant("rope_interleaved", "rotary embedding on interleaved (even, odd) pairs instead of "
          "HF's half-split rotate_half", "forward:self_attn", M, "fp32", _rope_interleaved),
    Plant("norm_eps", "RMSNorm eps fixed at 1e-6 (Flax default) instead of rms_norm_eps",
          "forward:input_layernorm", M, "fp32", _norm_eps),
    Plant("attn_scale", "attention logits scaled by 1/sqrt(hidden) instead of 1/sqrt(head_dim)",
          "forward:self_attn", M, "fp32",
          lambda m: {"Attention.__call__": _attention(m, scale_by_hidden=True)}),
    Plant("gqa_tiled", "GQA: query head h reads kv head h % K (tile) instead of h // (H/K) "
          "(repeat_kv)", "forward:self_attn", M, "fp32",
          lambda m: {"Attention.__call__": _attention(m, tiled_kv=True)}),
    Plant("mlp_swap", "SwiGLU gate and up projections swapped: silu(up) * gate",
          "forward:mlp", M, "fp32", _mlp_swap),
    Plant("tied_head", "output projection reads the embedding although the config is untied",
          "forward:logits", M, "fp32", _tied_head),
    Plant("adam_eps_inside", "AdamW eps inside the square root (optax eps_root) instead of "
          "outside", "optimizer:eps", S, "fp32",
          lambda m: _optimizer(m, eps_inside=True)),
    Plant("betas_swapped", "beta1 and beta2 swapped (identical first step: bias correction "
          "hides it until step 1)", "optimizer:after_step0", S, "fp32",
          lambda m: _optimizer(m, betas_swapped=True)),
    Plant("decay_all", "weight decay on every tensor (norm gains too) instead of the "
          "matrices mask", "optimizer:decay_mask", S, "fp32",
          lambda m: _optimizer(m, decay_all=True)),
    Plant("decay_unscaled", "decoupled decay not multiplied by the LR: p -= wd*p instead of "
          "lr*wd*p", "optimizer:decay_coefficient", S, "fp32",
          lambda m: _optimizer(m, decay_unscaled=True)),
    Plant("clip_per_tensor", "gradient clipping per tensor instead of by the global norm",
          "optimizer:clipping", S, "fp32", lambda m: _optimizer(m, clip_per_tensor=True)),
    Plant("lr_offset", "LR schedule read one step ahead (lr_at(step + 1))",
          "optimizer:lr", S, "fp32", lambda m: _optimizer(m, lr_offset=1)),
    Plant("z_loss", "an extra z-loss term 1e-4 * logsumexp^2 per token", "loss", S, "fp32",
          _z_loss),
    Plant("micro_mean", "loss reduction: each micro-batch's own token mean, summed over "
          "micro-steps, instead of the global token mean", "loss", S, "fp32", _micro_mean),
    Plant("row_offset", "the last data-parallel device reads its rows one row on",
          "data", T, "fp32", _row_offset),
    # with the config's 4 micro-steps its rounding hides in the bf16 backward's own noise;
    # the harness's accumulation probe (parity.probes, 64 micro-steps) is what sees it
    Plant("bf16_grad_accum", "bf16 gradients summed over micro-steps in a bf16 accumulator",
          "bf16:gradients", S, "bf16", _bf16_grad_accum),
    Plant("bf16_norm_stats", "RMSNorm statistics in bf16 instead of fp32",
          "bf16:forward", M, "bf16", _bf16_norm_stats),
    Plant("bf16_softmax_loss", "loss log-softmax in bf16 instead of fp32",
          "bf16:loss", S, "bf16", _bf16_softmax_loss),
)}


def _resolve(module: Any, path: str) -> tuple[Any, str]:
    *owners, attr = path.split(".")
    obj = module
    for o in owners:
        obj = getattr(obj, o)
    return obj, attr


def apply(name: str, module: Any | None = None) -> Callable[[], None]:
    """Apply plant ``name`` to its (imported) module; returns a function that undoes it."""
    if name not in PLANTS:
        raise ValueError(f"PARITY_PLANT={name!r}: unknown plant; known: {sorted(PLANTS)}")
    plant = PLANTS[name]
    module = module if module is not None else importlib.import_module(plant.module)
    saved = []
    for path, value in plant.patch(module).items():
        obj, attr = _resolve(module, path)
        if not hasattr(obj, attr):
            raise AttributeError(f"plant {name}: {plant.module}.{path} does not exist")
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def undo() -> None:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)

    return undo


def log(msg: str) -> None:
    print(f"[plant] {msg}", file=sys.stderr, flush=True)
