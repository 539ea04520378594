"""The optax chain against a hand-written numpy AdamW that follows torch.optim.AdamW's
documented algorithm (decoupled decay p *= 1 - lr*wd, then p -= lr/bc1 * m /
(sqrt(v)/sqrt(bc2) + eps)), with ZeRO-free global-norm clipping in front, in float64."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import optax  # noqa: E402

from jaxlm.step import lr_values, make_optimizer  # noqa: E402
from jaxlm.weights import decay_mask, hf_names_of_paths, hf_to_params  # noqa: E402
from lmspec.config import from_dict  # noqa: E402
from lmspec.schedule import lr_at  # noqa: E402
from lmspec.weights import init_weights  # noqa: E402

# fp32 optax vs float64 numpy after 4 steps: a few fp32 roundings of each parameter
OPT_RTOL = 5e-7  # relative to the tensor's largest |value|

MODEL = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


def _cfg(**optim):
    base = {"lr": 0.01, "warmup_steps": 2, "decay_steps": 5, "weight_decay": 0.1,
            "beta1": 0.9, "beta2": 0.95, "eps": 1e-6, "grad_clip": 1.0}
    return from_dict({"model": MODEL, "optim": {**base, **optim}, "train": {"steps": 4}})


def _torch_adamw(params, grads_seq, cfg, mask):
    o = cfg.optim
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for s, grads in enumerate(grads_seq):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        if o.grad_clip > 0:
            norm = np.sqrt(sum(float((x * x).sum()) for x in g.values()))
            if norm > o.grad_clip:
                g = {k: x * (o.grad_clip / norm) for k, x in g.items()}
        lr = lr_at(s, o)
        t = s + 1
        for k in p:
            if mask[k]:
                p[k] = p[k] * (1 - lr * o.weight_decay)
            m[k] = o.beta1 * m[k] + (1 - o.beta1) * g[k]
            v[k] = o.beta2 * v[k] + (1 - o.beta2) * g[k] ** 2
            bc1 = 1 - o.beta1 ** t
            bc2 = 1 - o.beta2 ** t
            denom = np.sqrt(v[k]) / np.sqrt(bc2) + o.eps
            p[k] = p[k] - (lr / bc1) * m[k] / denom
    return p


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


@pytest.mark.parametrize("clip", [0.05, 0.0, 100.0])
@pytest.mark.parametrize("policy", ["matrices", "all", "none"])
def test_optax_chain_matches_torch_adamw(clip: float, policy: str) -> None:
    # eps comparable to sqrt(v) and decay visible, so misplacing either would show
    cfg = _cfg(grad_clip=clip, wd_mask=policy, eps=1e-3, weight_decay=0.5)
    params = hf_to_params(init_weights(cfg.model, 0), cfg.model, True)
    tx, _ = make_optimizer(cfg, scan_layers=True)
    rng = np.random.default_rng(1)
    grads_seq = [jax.tree.map(lambda p: (0.01 * rng.standard_normal(p.shape)).astype(
        np.float32), params) for _ in range(4)]
    state = tx.init(params)
    p = params

    @jax.jit
    def update(g, state, p):
        upd, state = tx.update(g, state, p)
        return optax.apply_updates(p, upd), state

    for g in grads_seq:
        p, state = update(g, state, p)
    mask = _flat(decay_mask(cfg.model, True, policy))
    want = _torch_adamw(_flat(params), [_flat(g) for g in grads_seq], cfg, mask)
    got = _flat(jax.tree.map(np.asarray, p))
    for k, w in want.items():
        assert np.abs(w - _flat(params)[k]).max() > 1e-3  # every tensor moved
        assert np.abs(got[k] - w).max() <= OPT_RTOL * np.abs(w).max(), k


def test_lr_table_is_lr_at_and_covers_all_steps() -> None:
    cfg = from_dict({"optim": {"lr": 3e-3, "warmup_steps": 3, "decay_steps": 7},
                     "train": {"steps": 12}})
    table = lr_values(cfg)
    assert len(table) >= cfg.train.steps
    for s in range(len(table)):
        assert table[s] == np.float32(lr_at(s, cfg.optim))


def test_decay_mask_follows_hf_shapes() -> None:
    cfg = _cfg()
    for scan in (True, False):
        mask = _flat(decay_mask(cfg.model, scan, "matrices"))
        names = hf_names_of_paths(cfg.model, scan)
        assert set(mask) == set(names)
        for path, hf in names.items():
            assert mask[path] == (not hf.endswith("norm.weight")), hf


def test_logged_lr_is_the_one_the_update_used() -> None:
    """The train step logs the LR at optax's schedule count, which a skipped non-finite
    step or a converted state can part from the data step; here the data step is 3 and
    the schedule's count 1: the logged LR must be table[1], and the update must be the
    one table[1] gives."""
    from flax import nnx

    from jaxlm.model import Llama
    from jaxlm.step import make_train_step, schedule_count

    cfg = from_dict({"model": MODEL, "optim": {"lr": 0.01, "warmup_steps": 4,
                                                "decay_steps": 8, "grad_clip": 0.0},
                     "train": {"steps": 6}, "data": {"seq_len": 4}})
    t = cfg.train
    model = Llama(cfg.model, rngs=nnx.Rngs(params=0), scan_layers=t.scan_layers,
                  remat="none", attention="xla")
    graphdef, _ = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx, table = make_optimizer(cfg, scan_layers=t.scan_layers)
    opt = tx.init(params)
    counted = tx.update(jax.tree.map(jnp_zeros, params), opt, params)[1]  # count 1
    assert int(schedule_count(counted)) == 1
    step = jax.jit(make_train_step(graphdef, tx, table, "fp32"))
    windows = np.arange(2 * 5).reshape(1, 2, 5) % MODEL["vocab_size"]
    _, metrics = step({"params": params, "opt": counted, "step": np.int32(3)}, windows)
    assert table[1] != table[3]
    assert float(metrics["lr"]) == float(table[1])


def jnp_zeros(x):
    return np.zeros(x.shape, x.dtype)
