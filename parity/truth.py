"""The float64 truth a parity run judges both sides against.

On the run's initial weights: the torch model cast to float64 (``torchlm`` keeps float64
modules in float64 end to end) gives the logits of the forward batch and the loss and
gradient of step 0's global batch (the token mean over every row, which is what both
trainers' gradient accumulation computes for equal-length windows); exact AdamW of that
gradient gives the first update, with each side's own clipping convention (optax scales
by ``max / norm``; DeepSpeed ZeRO by ``max / (norm + 1e-6)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lmspec.config import ExperimentConfig, OptimConfig

# clipping's norm epsilon of each side (see shared/PARITY.md, "clipping")
CLIP_EPS = {"jax": 0.0, "torch": 1e-6}


@dataclass
class Truth:
    """float64 figures of one parity run (``None`` where not computed)."""

    logits: np.ndarray | None = None  # (B, T, V) of the forward batch
    loss: float | None = None  # step 0's global batch
    grads: dict[str, np.ndarray] = field(default_factory=dict)  # step 0
    tokens: int = 0  # tokens in step 0's global batch


def float64_model(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray]):  # -> Llama
    from torchlm import api as tapi

    return tapi.build_model(cfg.model, dict(weights), "fp32").double()


def float64_logits(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                   tokens_bt: np.ndarray) -> np.ndarray:
    """float64 logits (B, T, V) of ``tokens_bt``."""
    import torch

    model = float64_model(cfg, weights)
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens_bt, np.int64))).numpy()


def float64_loss_and_gradient(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                              windows: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Token-mean loss of ``windows`` (B, T+1) and its gradient, in float64."""
    import torch

    model = float64_model(cfg, weights)
    loss = model.loss(torch.from_numpy(np.asarray(windows, np.int64)))
    loss.backward()
    return float(loss.detach()), {k: p.grad.detach().numpy().copy()
                                  for k, p in model.named_parameters()}


def float64_gradient(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                     windows: np.ndarray) -> dict[str, np.ndarray]:
    """Step-0 gradient of the global token-mean loss computed in float64."""
    return float64_loss_and_gradient(cfg, weights, windows)[1]


def compute_truth(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                  batch: np.ndarray, forward_tokens: np.ndarray | None) -> Truth:
    """The float64 truth of a run: step-0 loss and gradient of ``batch`` (the global
    batch, (B, T+1)) and, when given, the logits of ``forward_tokens``."""
    loss, grads = float64_loss_and_gradient(cfg, weights, batch)
    logits = None if forward_tokens is None else float64_logits(cfg, weights, forward_tokens)
    return Truth(logits=logits, loss=loss, grads=grads,
                 tokens=int(batch.shape[0] * (batch.shape[1] - 1)))


def exact_updates(grads: Mapping[str, np.ndarray], init: Mapping[str, np.ndarray],
                  optim: OptimConfig, side: str) -> dict[str, np.ndarray]:
    """Exact (float64) first AdamW update of every parameter from ``grads`` with the
    clipping convention of ``side`` ("jax" or "torch")."""
    from parity import compare as C

    return {k: C.adamw_first_update(grads, init, optim, k, clip_eps=CLIP_EPS[side])
            for k in grads}


def clip_factor(grads: Mapping[str, np.ndarray], optim: OptimConfig, side: str) -> float:
    from parity import compare as C

    return C.clip_coef(grads, optim.grad_clip, CLIP_EPS[side])


def exact_updates_at(grads: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                     exp_avg: Mapping[str, np.ndarray], exp_avg_sq: Mapping[str, np.ndarray],
                     adam_step: int, schedule_step: int, optim: OptimConfig, side: str
                     ) -> dict[str, np.ndarray]:
    """Exact (float64) AdamW update of every parameter in the middle of training
    (``parity continue``): from the state's moments, its Adam step count (bias
    correction ``t = adam_step + 1``) and ``lr_at(schedule_step)``, with the weight-decay
    mask and the clipping convention of ``side``. :func:`exact_updates` is the
    ``adam_step = schedule_step = 0``, zero-moment case."""
    from lmspec.schedule import lr_at
    from lmspec.weights import decays
    from parity import judge as J

    clip = clip_factor(grads, optim, side)
    lr = lr_at(schedule_step, optim)
    out = {}
    for k, g in grads.items():
        p = np.asarray(params[k], np.float64)
        wd = optim.weight_decay if decays(k, p.shape, optim.wd_mask) else 0.0
        out[k] = J.adam_step(g, p, lr, optim.eps, wd, clip,
                             adam_moments(exp_avg[k], exp_avg_sq[k], adam_step, optim))
    return out


def adam_moments(m: np.ndarray, v: np.ndarray, adam_step: int, optim: OptimConfig):
    """The :class:`parity.judge.AdamMoments` of one tensor of a train state."""
    from parity import judge as J

    return J.AdamMoments(m=np.asarray(m, np.float64), v=np.asarray(v, np.float64),
                         count=int(adam_step), beta1=optim.beta1, beta2=optim.beta2)
