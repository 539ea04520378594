"""Learning-rate schedule: linear warm-up, then cosine decay, then constant.

A pure function of the step; both trainers evaluate it (jaxlm as a table indexed by
the optimizer step, torchlm through ``LambdaLR``) and are tested against it.
"""

from __future__ import annotations

import math

from lmspec.config import OptimConfig


def lr_at(step: int, optim: OptimConfig) -> float:
    """Learning rate of the update made at optimizer step ``step`` (0-based).

    Warm-up rises linearly from 0 (at step -1) to ``lr`` at step ``warmup_steps - 1``:
    ``lr * (step + 1) / warmup_steps``, so step 0 already moves the weights. From
    ``warmup_steps`` to ``decay_steps`` a half cosine falls from ``lr`` to
    ``min_lr_ratio * lr`` (as in Loshchilov & Hutter, SGDR, without restarts); after
    ``decay_steps`` the rate stays at ``min_lr_ratio * lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    lr = optim.lr
    if step < optim.warmup_steps:
        return lr * (step + 1) / optim.warmup_steps
    min_lr = optim.min_lr_ratio * lr
    if step >= optim.decay_steps:
        return min_lr
    span = optim.decay_steps - optim.warmup_steps
    progress = (step - optim.warmup_steps) / span
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_table(num_steps: int, optim: OptimConfig) -> list[float]:
    """``[lr_at(0), ..., lr_at(num_steps - 1)]``."""
    return [lr_at(s, optim) for s in range(num_steps)]
