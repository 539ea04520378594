"""Every pass/fail limit of the parity harness, in one place.

The values are those of the parity issue; they are never loosened to make a run pass.
If a limit fails, the cause is found (see ``shared/PARITY.md``) and reported.

A :class:`Limit` says how a measured value is judged: ``<=`` (an error that must stay
small) or ``>=`` (a similarity that must stay high).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """A threshold: ``value <op> threshold`` passes. NaN never passes."""

    key: str
    threshold: float
    op: str  # "<=" or ">="
    description: str

    def passes(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.op == "<=":
            return value <= self.threshold
        if self.op == ">=":
            return value >= self.threshold
        raise AssertionError(f"unknown op {self.op!r}")  # internal invariant


# Steps over which the training checks are judged.
FP32_LOSS_STEPS = 20
BF16_STEPS = 50
BF16_EARLY_STEPS = 10

LIMITS: dict[str, Limit] = {
    lim.key: lim
    for lim in (
        # fp32
        Limit("fp32.logits_max_abs", 1e-4, "<=",
              "forward logits, max |jax - other| (vs torch and vs Hugging Face)"),
        Limit("fp32.grad_rel_err", 1e-4, "<=",
              "step-0 gradient, relative L2 error, worst parameter"),
        Limit("fp32.update_rel_err", 1e-4, "<=",
              "first AdamW update (params after - before), relative L2 error, worst parameter"),
        Limit("fp32.loss_rel_diff", 1e-5, "<=",
              f"|loss_jax - loss_ds| / |loss_ds|, worst of the first {FP32_LOSS_STEPS} steps"),
        # bf16
        Limit("bf16.loss_rel_diff_step0", 1e-3, "<=",
              "|loss_jax - loss_ds| / |loss_ds| at step 0"),
        Limit("bf16.grad_cosine", 0.99, ">=",
              "step-0 gradient cosine similarity, worst parameter"),
        Limit("bf16.gap_over_floor", 1.0, "<=",
              f"RMS|loss_jax - loss_ds_bf16| / RMS|loss_ds_bf16 - loss_ds_fp32| over "
              f"{BF16_STEPS} steps"),
        Limit("bf16.gap_over_floor_early", 0.5, "<=",
              f"the same ratio over the first {BF16_EARLY_STEPS} steps"),
        # both
        Limit("batch_fingerprint_mismatches", 0, "<=",
              "steps whose global-batch fingerprint differs between the two sides"),
    )
}


def limit(key: str) -> Limit:
    """The :class:`Limit` named ``key``; ValueError lists the known keys."""
    try:
        return LIMITS[key]
    except KeyError:
        raise ValueError(f"unknown limit {key!r}; known: {sorted(LIMITS)}") from None
