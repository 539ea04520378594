"""jaxlm.dot.einsum: exactly jnp.einsum (values and gradients), implicit sums refused."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jaxlm import dot  # noqa: E402

SPECS = [  # the model's contractions (K = 256, 512, 768 in the tiny model)
    ("btd,dhq->bthq", (2, 16, 256), (256, 8, 32)),
    ("bthq,hqd->btd", (2, 16, 8, 32), (8, 32, 256)),
    ("btf,fd->btd", (2, 16, 768), (768, 256)),
    ("btd,dv->btv", (2, 16, 256), (256, 512)),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_values_and_grads_are_jnp_einsum(spec, sa, sb, dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal(sa), dtype)
    b = jnp.asarray(rng.standard_normal(sb), dtype)
    w = jnp.asarray(rng.standard_normal(jnp.einsum(spec, a, b).shape), dtype)
    ours = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(w * dot.einsum(spec, x, y)),
                                      argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(w * jnp.einsum(spec, x, y)),
                                     argnums=(0, 1)))
    (v1, g1), (v2, g2) = ours(a, b), ref(a, b)
    np.testing.assert_array_equal(np.asarray(v1, np.float32), np.asarray(v2, np.float32))
    for x, y in zip(g1, g2, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_rejects_implicit_sums():
    with pytest.raises(ValueError, match="summed within one operand"):
        dot.einsum("bd,dv->v", jnp.ones((2, 3)), jnp.ones((3, 4)))
