"""Two-operand contractions for the model, with blocked fp32 accumulation on CPU.

XLA:CPU (jaxlib 0.10) lowers an fp32 ``dot`` to a YNNPACK kernel that accumulates every
output element in one sequential FMA chain over the whole contraction (checked bitwise
for K = 256 and 512). Its rounding error grows like sqrt(K): 2.9e-7 relative at K = 256,
4.1e-7 at K = 512, against 2.1e-7 / 2.4e-7 for MKL's sgemm (PyTorch), which accumulates
blocks of 128 and adds the block sums. Over the tiny model this made JAX's fp32 gradients
1.4-1.5x further from float64 than PyTorch's (4.7e-7 vs 3.1e-7 relative); AdamW's first
step ``g / (|g| + eps)`` turns that noise into update differences wherever |g| < eps.

:func:`einsum` splits a long contraction into blocks of at most :data:`BLOCK` (128)
flattened elements, contracts each block with XLA's dot and adds the partial results in
order (cascaded summation: the same products, summed in an order with a smaller error
bound). The backward pass is blocked the same way (``jax.custom_vjp``), so the weight and
input gradients get the same accuracy. It applies only to fp32 operands on the CPU
backend; everywhere else (bf16, GPU, TPU) it is exactly ``jnp.einsum``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 128  # flattened contraction elements per partial sum (MKL sgemm's K block)


def _parse(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


def _blocked(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` as an ordered sum of contractions over slices of the first
    contracted letter, each covering at most ``BLOCK`` flattened contraction elements."""
    sa, sb, out = _parse(spec)
    contracted = [c for c in sa if c in sb and c not in out]
    if not contracted:
        return jnp.einsum(spec, a, b)
    size = {c: a.shape[sa.index(c)] for c in contracted}
    total = math.prod(size.values())
    if total <= BLOCK:
        return jnp.einsum(spec, a, b)
    lead = contracted[0]
    inner = total // size[lead]
    step = max(1, BLOCK // inner)
    acc = None
    for start in range(0, size[lead], step):
        stop = min(size[lead], start + step)
        part = jnp.einsum(spec, jax.lax.slice_in_dim(a, start, stop, axis=sa.index(lead)),
                          jax.lax.slice_in_dim(b, start, stop, axis=sb.index(lead)))
        acc = part if acc is None else acc + part
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_blocked(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return _blocked(spec, a, b)


def _fwd(spec: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
    return _blocked(spec, a, b), (a, b)


def _bwd(spec: str, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    sa, sb, out = _parse(spec)
    return _blocked(f"{out},{sb}->{sa}", g, b), _blocked(f"{sa},{out}->{sb}", a, g)


_einsum_blocked.defvjp(_fwd, _bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` for two operands; on the CPU backend with fp32 operands
    the contraction (forward and backward) is accumulated in blocks of ``BLOCK``.

    ``spec`` must be explicit (``"btd,dkq->btkq"``) and every letter of an operand must
    appear in the other operand or in the output (no implicit sums)."""
    sa, sb, out = _parse(spec)
    for s in (sa, sb):
        if any(c not in out and c not in (sb if s is sa else sa) for c in s):
            raise ValueError(f"einsum spec {spec!r}: a letter is summed within one operand")
    if (a.dtype != jnp.float32 or b.dtype != jnp.float32
            or jax.default_backend() != "cpu"):
        return jnp.einsum(spec, a, b)
    return _einsum_blocked(spec, a, b)
