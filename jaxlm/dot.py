"""Two-operand contractions of the model: exactly ``jnp.einsum``, with the spec checked.

An earlier version summed fp32 contractions on the CPU backend in blocks of 128 (about
1.25x CPU step time) to bring JAX's fp32 gradients closer to float64, only to get under a
fixed first-update limit of the parity harness. The harness now judges each side by its
distance from a float64 truth against the reference's own distance (``parity/judge.py``);
with plain ``jnp.einsum`` every clean case passes with margin <= 0.26 on the fp32 gradient
and first update (tiny default on 2 CPU cores: gradient margin 0.24 unblocked vs 0.19
blocked), so no clean case needs the blocking and it was removed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _parse(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` for two operands.

    ``spec`` must be explicit (``"btd,dkq->btkq"``) and every letter of an operand must
    appear in the other operand or in the output (no implicit sums)."""
    sa, sb, out = _parse(spec)
    for s in (sa, sb):
        if any(c not in out and c not in (sb if s is sa else sa) for c in s):
            raise ValueError(f"einsum spec {spec!r}: a letter is summed within one operand")
    return jnp.einsum(spec, a, b)
