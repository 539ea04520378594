"""Llama decoder in Flax NNX, written for one device; parallelism is applied from outside.

Shape legend (suffixes on tensor names):
    B batch, T sequence, D hidden (``embed``), H query heads, K key/value heads,
    Q head dim, F MLP hidden (``mlp``), V vocabulary, L layers.

Every parameter carries logical axis names in its ``out_sharding`` metadata (``vocab``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``norm``, and ``layers`` for
the scanned stack); activations are constrained at block boundaries with ``act_*``
names through :func:`jaxlm.sharding.constrain`, which is a no-op unless the trainer set
a mesh and a rules table. No mesh axis names appear here.

Numerics follow Hugging Face ``LlamaForCausalLM`` (and ``ARCHITECTURE.md``): RMSNorm
statistics in fp32, half-split rotary embeddings (``rotate_half``), grouped-query
attention where query head ``h`` reads key/value head ``h // (H / K)``, causal softmax in
fp32, SwiGLU MLP, logits cast to fp32. Matmuls go through :func:`jaxlm.dot.einsum`
(blocked fp32 accumulation on CPU; plain ``jnp.einsum`` elsewhere). Parameters are
stored in fp32; every weight is cast to the compute dtype where it is used (a no-op when
the caller already cast them, as the trainer does once per micro-batch, mirroring
DeepSpeed's bf16 mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import dot
from jaxlm.sharding import constrain
from lmspec.config import ModelConfig

INIT_STD = 0.02  # Hugging Face LlamaConfig.initializer_range (lmspec.weights.INIT_STD)

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

ACT_BTD = ("act_batch", "act_seq", "act_embed")
ACT_BTHQ = ("act_batch", "act_seq", "act_heads", "act_head_dim")
ACT_BTKQ = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")
ACT_BTF = ("act_batch", "act_seq", "act_mlp")
ACT_BTV = ("act_batch", "act_seq", "act_vocab")


# generation's key/value cache: (keys, values), (B, S, kv_heads, head_dim) per layer
KVCache = tuple[jax.Array, jax.Array]

def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...],
           *, ones: bool = False) -> nnx.Param:
    """An fp32 parameter with logical axis names; N(0, 0.02) or ones (norm gains)."""
    assert len(shape) == len(names), (shape, names)
    if ones:
        value = jnp.ones(shape, jnp.float32)
    else:
        assert rngs is not None
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm in Hugging Face's order: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, dtype: Any) -> None:
        self.scale = _param(None, (dim,), ("norm",), ones=True)  # (D,)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32_btd = x_btd.astype(jnp.float32)
        var_bt1 = jnp.mean(x32_btd * x32_btd, axis=-1, keepdims=True)
        y_btd = x32_btd * jax.lax.rsqrt(var_bt1 + self.eps)
        scale_d = self.scale[...].astype(self.dtype)
        y_btd = y_btd.astype(x_btd.dtype)
        if jnp.dtype(scale_d.dtype).itemsize >= 4 and jnp.dtype(y_btd.dtype).itemsize >= 4:
            return scale_d * y_btd
        # Low precision: the product of two bf16 (or fp16) numbers is exact in fp32, so
        # rounding it once gives torch's bf16 product bit for bit; what the fp32 multiply
        # changes is the backward: the scale's gradient, a sum over every token of the
        # micro-batch, is accumulated in fp32 and rounded once, as torch does, instead of
        # being reduced in bf16 (XLA on CPU adds bf16 reductions in bf16).
        out_dtype = jnp.result_type(scale_d.dtype, y_btd.dtype)
        return (scale_d.astype(jnp.float32) * y_btd.astype(jnp.float32)).astype(out_dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: Any,
                 start: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (T, Q) of HF Llama's rotary embedding at positions start..start+T-1,
    computed in fp32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    pos_t = jnp.arange(seq_len, dtype=jnp.float32) + jnp.asarray(start, jnp.float32)
    freqs_tq2 = jnp.outer(pos_t, inv_freq)
    emb_tq = jnp.concatenate([freqs_tq2, freqs_tq2], axis=-1)
    return jnp.cos(emb_tq).astype(dtype), jnp.sin(emb_tq).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_bthq: jax.Array, cos_tq: jax.Array, sin_tq: jax.Array) -> jax.Array:
    cos = cos_tq[None, :, None, :]
    sin = sin_tq[None, :, None, :]
    return x_bthq * cos + rotate_half(x_bthq) * sin


class Attention(nnx.Module):
    """Causal grouped-query attention with rotary embeddings and no biases."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, attention: str, rngs: nnx.Rngs
                 ) -> None:
        d, h, k, q = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim)
        self.q_dhq = _param(rngs, (d, h, q), ("embed", "heads", "head_dim"))
        self.k_dkq = _param(rngs, (d, k, q), ("embed", "kv_heads", "head_dim"))
        self.v_dkq = _param(rngs, (d, k, q), ("embed", "kv_heads", "head_dim"))
        self.o_hqd = _param(rngs, (h, q, d), ("heads", "head_dim", "embed"))
        self.theta = cfg.rope_theta
        self.dtype = dtype
        self.attention = attention

    def __call__(self, x_btd: jax.Array, kv: KVCache | None = None,
                 pos: jax.Array | None = None) -> Any:
        """Attention output (B, T, D); with ``kv`` (generation): the T new tokens sit at
        positions pos..pos+T-1, their keys and values are written into the cache and
        they attend to every cached position up to their own; returns (output, cache)."""
        dt = self.dtype
        q_bthq = dot.einsum("btd,dhq->bthq", x_btd, self.q_dhq[...].astype(dt))
        k_btkq = dot.einsum("btd,dkq->btkq", x_btd, self.k_dkq[...].astype(dt))
        v_btkq = dot.einsum("btd,dkq->btkq", x_btd, self.v_dkq[...].astype(dt))
        q_bthq = constrain(q_bthq, ACT_BTHQ)
        k_btkq = constrain(k_btkq, ACT_BTKQ)
        v_btkq = constrain(v_btkq, ACT_BTKQ)
        start = 0 if kv is None else pos
        cos_tq, sin_tq = rope_cos_sin(x_btd.shape[1], q_bthq.shape[-1], self.theta, dt,
                                      start=start)
        q_bthq = apply_rope(q_bthq, cos_tq, sin_tq)
        k_btkq = apply_rope(k_btkq, cos_tq, sin_tq)
        # scale defaults to 1/sqrt(Q); softmax runs in fp32 inside; GQA groups query
        # heads [g*H/K, (g+1)*H/K) on kv head g, as HF's repeat_kv does.
        impl = "cudnn" if self.attention == "cudnn" else None
        if kv is None:
            o_bthq = jax.nn.dot_product_attention(
                q_bthq, k_btkq, v_btkq, is_causal=True, implementation=impl
            )
        else:
            k_bskq = jax.lax.dynamic_update_slice(kv[0], k_btkq.astype(kv[0].dtype),
                                                  (0, pos, 0, 0))
            v_bskq = jax.lax.dynamic_update_slice(kv[1], v_btkq.astype(kv[1].dtype),
                                                  (0, pos, 0, 0))
            t, s = x_btd.shape[1], k_bskq.shape[1]
            # query i (position pos+i) sees cached positions j <= pos+i
            mask_11ts = (jnp.arange(s)[None, :] <= pos + jnp.arange(t)[:, None])[None, None]
            o_bthq = jax.nn.dot_product_attention(q_bthq, k_bskq.astype(dt),
                                                  v_bskq.astype(dt), mask=mask_11ts)
            kv = (k_bskq, v_bskq)
        o_bthq = constrain(o_bthq, ACT_BTHQ)
        out_btd = dot.einsum("bthq,hqd->btd", o_bthq, self.o_hqd[...].astype(dt))
        return out_btd if kv is None else (out_btd, kv)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, rngs: nnx.Rngs) -> None:
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_df = _param(rngs, (d, f), ("embed", "mlp"))
        self.up_df = _param(rngs, (d, f), ("embed", "mlp"))
        self.down_fd = _param(rngs, (f, d), ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        g_btf = dot.einsum("btd,df->btf", x_btd, self.gate_df[...].astype(dt))
        u_btf = dot.einsum("btd,df->btf", x_btd, self.up_df[...].astype(dt))
        # silu in fp32, rounded once: torch's bf16 silu kernel does exactly this, while
        # jax.nn.silu on bf16 rounds sigmoid(x) before the multiply (a second rounding
        # that differed from torch in ~38% of elements; found by the parity harness)
        s_btf = jax.nn.silu(g_btf.astype(jnp.float32)).astype(g_btf.dtype)
        h_btf = constrain(s_btf * u_btf, ACT_BTF)
        return dot.einsum("btf,fd->btd", h_btf, self.down_fd[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm decoder block: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, attention: str, rngs: nnx.Rngs
                 ) -> None:
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype=dtype, attention=attention, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, kv: KVCache | None = None,
                 pos: jax.Array | None = None) -> Any:
        if kv is None:
            h_btd = x_btd + self.attn(self.input_norm(x_btd))
        else:
            a_btd, kv = self.attn(self.input_norm(x_btd), kv, pos)
            h_btd = x_btd + a_btd
        out_btd = constrain(h_btd + self.mlp(self.post_norm(h_btd)), ACT_BTD)
        return out_btd if kv is None else (out_btd, kv)


class Llama(nnx.Module):
    """Llama decoder: ``model(tokens_bt) -> logits_btv`` (fp32).

    Args:
        cfg: model shapes (HF Llama names).
        rngs: parameter initialisation RNGs (N(0, 0.02) matrices, ones for norm gains;
            use :func:`jaxlm.weights.from_hf` to load ``lmspec.weights.init_weights``).
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); params stay fp32.
        scan_layers: stack the blocks on a leading ``layers`` axis and run them with
            ``lax.scan`` (compile time flat in depth) instead of a Python loop.
        remat: ``none``, ``full`` or ``dots_saveable`` rematerialisation of each block.
        attention: ``xla`` or ``cudnn`` (GPU only) for ``jax.nn.dot_product_attention``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 scan_layers: bool = True, remat: str = "none", attention: str = "xla"
                 ) -> None:
        if remat not in REMAT_POLICIES:
            raise ValueError(f"train.remat={remat!r}: allowed are {list(REMAT_POLICIES)}")
        if attention not in ("xla", "cudnn"):
            raise ValueError(f"train.attention={attention!r}: allowed are ['xla', 'cudnn']")
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat = remat
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed_vd = _param(rngs, (v, d), ("vocab", "embed"))
        if scan_layers:
            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(r: nnx.Rngs) -> Block:
                return Block(cfg, dtype=dtype, attention=attention, rngs=r)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([
                Block(cfg, dtype=dtype, attention=attention, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ])
        self.final_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head_dv = _param(rngs, (d, v), ("embed", "vocab"))

    def _block_fn(self, graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array], jax.Array]:
        def run(state: Any, x_btd: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(x_btd)

        policy = self.remat
        if policy == "none":
            return run
        return jax.checkpoint(run, policy=REMAT_POLICIES[policy])

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty key/value cache for :meth:`decode`: (K, V), each
        (L, B, max_len, kv_heads, head_dim) in the compute dtype."""
        c = self.cfg
        shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def decode(self, tokens_bt: jax.Array, cache: KVCache, pos: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """Generation with a key/value cache: logits (B, T, V) of ``tokens_bt`` placed at
        positions pos..pos+T-1 after the ``pos`` tokens already cached (prefill: the
        prompt at pos 0; then one token at a time), and the updated cache. The same
        blocks as :meth:`__call__`, attending to the cached keys instead of recomputing
        them (tests/test_jax_model.py: the same greedy tokens)."""
        dt = self.dtype
        table_vd = self.embed_vd[...].astype(dt)
        x_btd = jnp.take(table_vd, tokens_bt, axis=0)
        k_all, v_all = cache
        if self.scan_layers:
            graphdef, state_l = nnx.split(self.layers)

            def body(x_btd: jax.Array, layer: Any) -> tuple[jax.Array, KVCache]:
                state, k, v = layer
                x_btd, kv = nnx.merge(graphdef, state)(x_btd, (k, v), pos)
                return x_btd, kv

            x_btd, (k_all, v_all) = jax.lax.scan(body, x_btd, (state_l, k_all, v_all))
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                x_btd, (k, v) = layer(x_btd, (k_all[i], v_all[i]), pos)
                ks.append(k)
                vs.append(v)
            k_all, v_all = jnp.stack(ks), jnp.stack(vs)
        return self._logits(x_btd), (k_all, v_all)

    def _logits(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        x_btd = self.final_norm(x_btd)
        if self.cfg.tie_word_embeddings:
            head_dv = self.embed_vd[...].astype(dt).T
        else:
            head_dv = self.lm_head_dv[...].astype(dt)
        logits_btv = constrain(dot.einsum("btd,dv->btv", x_btd, head_dv), ACT_BTV)
        return logits_btv.astype(jnp.float32)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        dt = self.dtype
        # gather rows from a whole table: a lookup into a vocab/embed-sharded table makes
        # the SPMD partitioner replicate the gathered activations instead
        table_vd = constrain(self.embed_vd[...].astype(dt), (None, None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0)
        x_btd = constrain(x_btd, ACT_BTD)
        if self.scan_layers:
            graphdef, state_l = nnx.split(self.layers)
            block = self._block_fn(graphdef)

            def body(x_btd: jax.Array, state: Any) -> tuple[jax.Array, None]:
                return block(state, x_btd), None

            x_btd, _ = jax.lax.scan(body, x_btd, state_l)
        else:
            for layer in self.layers:
                graphdef, state = nnx.split(layer)
                x_btd = self._block_fn(graphdef)(state, x_btd)
        return self._logits(x_btd)


def compute_dtype(precision: str) -> Any:
    """The activation/weight dtype of a precision policy (``fp32`` or ``bf16``)."""
    if precision == "fp32":
        return jnp.float32
    if precision == "bf16":
        return jnp.bfloat16
    raise ValueError(f"train.precision={precision!r}: allowed are ['fp32', 'bf16']")
