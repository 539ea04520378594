"""jaxlm.dot.einsum: same values as jnp.einsum, closer to float64 for long fp32 contractions."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jaxlm import dot  # noqa: E402

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the blocked path is the CPU backend's")

SPECS = [  # the model's contractions (K = 256, 512, 768 in the tiny model)
    ("btd,dhq->bthq", (2, 16, 256), (256, 8, 32)),
    ("bthq,hqd->btd", (2, 16, 8, 32), (8, 32, 256)),
    ("btf,fd->btd", (2, 16, 768), (768, 256)),
    ("btd,dv->btv", (2, 16, 256), (256, 512)),
]


def _rel(x, ref) -> float:
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_values_and_grads_match_jnp_einsum(spec, sa, sb):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    w = rng.standard_normal(jnp.einsum(spec, a, b).shape).astype(np.float32)
    ours = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(w * dot.einsum(spec, x, y)),
                                      argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(w * jnp.einsum(spec, x, y)),
                                     argnums=(0, 1)))
    (v1, (ga1, gb1)), (v2, (ga2, gb2)) = ours(a, b), ref(a, b)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for g1, g2 in ((ga1, ga2), (gb1, gb2)):
        assert g1.shape == g2.shape and g1.dtype == np.float32
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4)


def test_long_contraction_is_closer_to_float64():
    """K = 512 (the lm_head input gradient's length) and the backward contractions (256
    and 1024 long): XLA:CPU's unblocked dot is 4.1e-7 / 2.9e-7 / 2.9e-7 from float64 on
    these operands, blocks of 128 2.1e-7 each."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 512)).astype(np.float32)
    b = rng.standard_normal((512, 256)).astype(np.float32)
    g = rng.standard_normal((1024, 256)).astype(np.float32)
    out, vjp = jax.vjp(lambda x, y: dot.einsum("mk,kn->mn", x, y), a, b)
    da, db = vjp(g)
    a64, b64, g64 = (x.astype(np.float64) for x in (a, b, g))
    assert _rel(out, a64 @ b64) < 2.6e-7
    assert _rel(da, g64 @ b64.T) < 2.6e-7
    assert _rel(db, a64.T @ g64) < 2.6e-7


def test_other_dtypes_are_plain_einsum():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((4, 8, 256)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((256, 64)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dot.einsum("btd,dv->btv", a, b), np.float32),
                                  np.asarray(jnp.einsum("btd,dv->btv", a, b), np.float32))


def test_rejects_implicit_sums():
    with pytest.raises(ValueError, match="summed within one operand"):
        dot.einsum("bd,dv->v", jnp.ones((2, 3)), jnp.ones((3, 4)))
