"""Loss, gradient accumulation, optimizer and the (un-jitted) train step.

Shape legend: M micro-batches, B rows per micro-batch, T sequence, V vocabulary.
``params`` are pure dicts of fp32 arrays (``nnx.to_pure_dict`` of the model state);
``graphdef`` is the model's static structure (``nnx.split``).

Precision policy (ARCHITECTURE.md): the fp32 masters are cast to the compute dtype once
per micro-batch inside the loss, so ``jax.grad`` returns fp32 gradients with respect to
the masters; micro-batch gradients are summed in an fp32 accumulator; the loss is the
token mean over the global batch (each micro-batch contributes sum(nll) / global tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.model import compute_dtype
from jaxlm.weights import decay_mask
from lmspec.config import ExperimentConfig, OptimConfig
from lmspec.schedule import lr_at

Params = dict[str, Any]


def cross_entropy_sum(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Sum over tokens of -log softmax(logits)[target], in fp32."""
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_bt)


def make_loss_fn(graphdef: nnx.GraphDef, precision: str
                 ) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """``loss(params, windows_bt1, num_tokens) = sum(nll) / num_tokens`` for one
    micro-batch; ``num_tokens`` is the token count of the whole global batch."""
    dt = compute_dtype(precision)

    def loss_fn(params: Params, windows_bt1: jax.Array, num_tokens: jax.Array) -> jax.Array:
        # one cast per weight per micro-batch, like DeepSpeed's bf16 module copy
        cast = jax.tree.map(lambda p: p.astype(dt), params)
        model = nnx.merge(graphdef, cast)
        logits_btv = model(windows_bt1[:, :-1])
        return cross_entropy_sum(logits_btv, windows_bt1[:, 1:]) / num_tokens

    return loss_fn


def accumulate_grads(loss_fn: Callable[..., jax.Array], params: Params,
                     windows_mbt1: jax.Array) -> tuple[jax.Array, Params]:
    """Loss and gradient of the global-batch token mean, summed over micro-batches
    with ``lax.scan`` into an fp32 accumulator."""
    num_micro, rows, t1 = windows_mbt1.shape
    num_tokens = jnp.asarray(num_micro * rows * (t1 - 1), jnp.float32)
    grad_fn = jax.value_and_grad(loss_fn)

    def body(carry: tuple[jax.Array, Params], w_bt1: jax.Array
             ) -> tuple[tuple[jax.Array, Params], None]:
        loss_acc, grads_acc = carry
        loss, grads = grad_fn(params, w_bt1, num_tokens)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (loss_acc + loss.astype(jnp.float32), grads_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), windows_mbt1)
    return loss, grads


def lr_values(cfg: ExperimentConfig) -> np.ndarray:
    """``lr_at(s)`` for every step the run can take (and one past the decay, after
    which the rate is constant), fp32."""
    n = max(cfg.train.steps, cfg.optim.decay_steps + 1)
    return np.asarray([lr_at(s, cfg.optim) for s in range(n)], np.float32)


def make_optimizer(cfg: ExperimentConfig, scan_layers: bool
                   ) -> tuple[optax.GradientTransformation, np.ndarray]:
    """Global-norm clipping then AdamW as torch.optim.AdamW computes it (eps outside
    the sqrt, eps_root 0, decoupled decay ``p -= lr*wd*p`` on the masked tensors).

    Returns the transformation and the LR table it indexes by its own step count.
    """
    o: OptimConfig = cfg.optim
    table = lr_values(cfg)
    table_j = jnp.asarray(table)

    def schedule(count: jax.Array) -> jax.Array:
        return table_j[jnp.minimum(count, table_j.shape[0] - 1)]

    mask = decay_mask(cfg.model, scan_layers, o.wd_mask)
    parts: list[optax.GradientTransformation] = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(
        learning_rate=schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, eps_root=0.0,
        weight_decay=o.weight_decay, mask=mask, nesterov=False,
    ))
    return optax.chain(*parts), table


def schedule_count(opt_state: Any) -> jax.Array:
    """The count optax's learning-rate schedule reads at the next update (the
    ``ScaleByScheduleState`` of :func:`make_optimizer`'s chain). It equals the run's data
    step except where the two part: a skipped non-finite step (the optimizer state is
    kept), or a state converted from another trainer (``parity convert``)."""
    found = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
             if any(getattr(k, "tuple_name", "") == "ScaleByScheduleState" for k in path)]
    if len(found) != 1:
        raise ValueError(f"expected one learning-rate schedule count in the optimizer "
                         f"state, found {len(found)}")
    return found[0]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_table: np.ndarray, precision: str, *, return_grads: bool = False
                    ) -> Callable[..., Any]:
    """``step(state, windows_mbt1) -> (state, metrics[, grads])`` for ``jax.jit``.

    ``state`` is ``{"params", "opt", "step"}``; metrics hold the global-batch loss
    before the update, the pre-clip global grad norm and the LR the update used (at
    the schedule's own count, :func:`schedule_count`). When the loss or
    the norm is not finite the update is not applied (``step`` still counts it).
    """
    loss_fn = make_loss_fn(graphdef, precision)
    table_j = jnp.asarray(lr_table)

    def step(state: dict[str, Any], windows_mbt1: jax.Array) -> Any:
        params = state["params"]
        loss, grads = accumulate_grads(loss_fn, params, windows_mbt1)
        grad_norm = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        # a non-finite step leaves params and optimizer state as they were (the host
        # decides, a step later, whether to go on: lmspec.nonfinite); selecting inside
        # the update's fusion costs no extra pass and no host sync
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params, opt = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (new_params, opt), (params, state["opt"]))
        count = schedule_count(state["opt"])
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": table_j[jnp.minimum(count, table_j.shape[0] - 1)],
        }
        new_state = {"params": new_params, "opt": opt, "step": state["step"] + 1}
        if return_grads:
            return new_state, metrics, grads
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, precision: str
                   ) -> Callable[[Params, jax.Array], jax.Array]:
    """``eval(params, windows_mbt1) -> token-mean loss`` (no gradients), looping over
    the micro-batches so memory matches a training micro-step."""
    loss_fn = make_loss_fn(graphdef, precision)

    def evaluate(params: Params, windows_mbt1: jax.Array) -> jax.Array:
        num_micro, rows, t1 = windows_mbt1.shape
        num_tokens = jnp.asarray(num_micro * rows * (t1 - 1), jnp.float32)

        def body(acc: jax.Array, w_bt1: jax.Array) -> tuple[jax.Array, None]:
            return acc + loss_fn(params, w_bt1, num_tokens), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), windows_mbt1)
        return total

    return evaluate
