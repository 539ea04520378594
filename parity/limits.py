"""Every pass/fail limit and multiple of the parity harness, in one place, each with the
reason for its number.

Most checks are judged against noise measured in the same run (see :mod:`parity.judge`):
the reference's distance from a float64 truth, or the distance between two reference
runs that differ only in something harmless. The numbers below are *multiples* of that
noise; the check's limit in a report is the multiple times the noise measured there
(plus the stated absolute term). Margins quoted are the worst measured over the clean
cases in ``docs/parity.md`` (CPU, 2 cores); a multiple is never loosened to make a run
pass: a failure is investigated, and the cause fixed or reported.

A :class:`Limit` says how a value is judged: ``<=`` (an error that must stay small) or
``>=`` (a ratio that must stay large); its ``margin`` is normalised so <= 1 passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """``value <op> threshold`` passes. NaN never passes. For a judged check
    ``threshold`` is the multiple of the measured noise (``judged`` True)."""

    key: str
    threshold: float
    op: str  # "<=" or ">="
    description: str
    judged: bool = False

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

# ---- absolute terms (rounding nobody can avoid), in units of the truth's fp32 rounding
# Where the reference is exact, a faithful fp32 result still carries at least its own
# rounding of the truth (~0.3 ulp RMS) plus a few roundings of the last operations: 4x.
FP32_ROUNDING_FLOOR = 4.0
# First update: the stored fp32 parameter p + u is rounded (<= 0.5 ulp(p) each side, so
# two faithful sides can sit 1 ulp apart) ...
UPDATE_ULPS_PARAM = 1.0
# ... and Adam's fp32 arithmetic adds ~10 roundings of u: (1 - beta1), (1 - beta2) and the
# bias corrections computed in fp32 (up to ~2 ulp each), square, sqrt, + eps, divide, lr
# scale, decay (0.5 ulp each). Worst clean: optax 3.8 ulp(u) from exact where p ~ 0.
UPDATE_ULPS_STEP = 10.0
# fp32 loss curve: the logged loss is an fp32 number after a few fp32 operations per side
# (token mean, / micro-steps, sum over micro-steps, rank mean): two faithful sides sit a
# couple of ulps apart even where the stage pair is bitwise equal (odd shapes: 0.7 ulp RMS).
FP32_LOSS_ULPS = 2.0
# bf16 step-0 loss: a token mean whose per-token terms each carry ~1 bf16 rounding
# (2**-8 relative at most) has an error of about 2**-8 * |loss| / sqrt(tokens).
BF16_LOSS_ROUNDING = 2.0 ** -8

# ---- multiples of the reference's noise. Two faithful fp32 implementations with
# different kernels sit about as far from float64 as each other (ratio ~1, up to ~1.5 on
# small tensors); the multiple leaves a 2x margin over the worst clean ratio measured on
# tiny default, seeds 7, a plain-text corpus and odd shapes (MQA, hidden 96, vocab 1001,
# seq 96, 3 layers, untied), CPU, 2 cores. Worst clean margin (value / limit) in brackets.
# fp32 logits: worst clean ratio ~1.0 (JAX and Hugging Face vs torch's distance) [0.24]
FP32_LOGITS_MULTIPLE = 4.0
# fp32 gradient per tensor: worst clean ratio 1.3 (odd shapes, a norm gain) [0.33]
FP32_GRAD_MULTIPLE = 4.0
# fp32 first update: the L2 part ~1x DeepSpeed's; ill-conditioned elements sit within
# 1/4 of their gradient interval [0.26]
FP32_UPDATE_MULTIPLE = 4.0
# fp32 loss curve: worst clean ratio 1.5 to the combined noise, before the ulp term [0.25]
FP32_LOSS_MULTIPLE = 4.0
# bf16 logits: worst clean ratio 1.0 (JAX bf16 vs torch bf16 distance from float64) [0.33]
BF16_LOGITS_MULTIPLE = 3.0
# bf16 step-0 loss: the token-mean rounding term dominates (clean 1.5e-4 vs 1.6e-3) [0.09]
BF16_LOSS0_MULTIPLE = 4.0
# bf16 gradient per tensor: worst clean ratio 1.44 (odd shapes, a norm gain) [0.36]
BF16_GRAD_MULTIPLE = 4.0
# bf16 loss curve: worst clean ratio 3.0 (text corpus): the stage pair shares torch's bf16
# kernels and drifts apart less than two frameworks do; 8 keeps the 2x margin [0.38]
BF16_CURVE_MULTIPLE = 8.0
# JAX bf16 really bf16: clean ratio 0.97-1.01; a bf16 run done in fp32 sits ~1e-4 [0.41]
BF16_IS_BF16_MIN = 0.4
# bf16 activations layer by layer (parity.probes): JAX bf16 <-> torch bf16 within
# m x (Hugging Face bf16 <-> torch bf16, two faithful bf16 implementations) + a fraction
# of torch bf16's distance from float64 (where the two faithful ones round identically,
# e.g. the embedding rows, the floor is 0). Clean tiny seed 0: 0.31 of the limit.
BF16_ACT_MULTIPLE = 3.0
BF16_ACT_SCALE_FRACTION = 0.25
# bf16 accumulation (parity.probes): median over tensors of JAX's gradient change from
# 1 to 64 micro-steps over torch's (fp32 accumulation, as DeepSpeed is configured).
# Clean ratio ~1.1-1.2 (tiny seed 0: 1.11); a bf16 accumulator grows with the micro-step
# count (planted: 4.5). 2.5 keeps 2x over the clean ratio.
BF16_ACCUM_MULTIPLE = 2.5
# bf16 loss function (parity.probes): each side's loss on the same logits (torch bf16's)
# is an fp32 computation, so the fp32 rule: d loss / d logits within m x torch's distance
# from float64 + the fp32 rounding floor. Clean ratio ~1 (two fp32 log-softmaxes); a
# log-softmax in bf16 sits ~1e4x above.
BF16_LOSS_FN_MULTIPLE = 4.0

LIMITS: dict[str, Limit] = {
    lim.key: lim
    for lim in (
        # fp32, each against the float64 truth of the same weights and batch
        Limit("fp32.logits", FP32_LOGITS_MULTIPLE, "<=",
              "forward logits: ||x - truth|| <= m * ||torch - truth|| + floor", True),
        Limit("fp32.grad", FP32_GRAD_MULTIPLE, "<=",
              "step-0 gradient per tensor: ||g - g64|| <= m * ||g_ds - g64|| + floor, worst "
              "tensor", True),
        Limit("fp32.update", FP32_UPDATE_MULTIPLE, "<=",
              "first AdamW update per tensor vs exact AdamW of g64 (ill-conditioned elements "
              "by their gradient-rounding interval), worst tensor", True),
        Limit("fp32.loss", FP32_LOSS_MULTIPLE, "<=",
              f"RMS|loss_jax - loss_ds| over {FP32_LOSS_STEPS} steps <= m * (DeepSpeed "
              "stage-vs-stage RMS (+) step-0 distance from float64) + 2 ulp", True),
        # bf16
        Limit("bf16.logits", BF16_LOGITS_MULTIPLE, "<=",
              "bf16 forward logits: ||jax - truth|| <= m * ||torch bf16 - truth||", True),
        Limit("bf16.loss_step0", BF16_LOSS0_MULTIPLE, "<=",
              "bf16 step-0 loss: |jax - truth| <= m * |ds - truth| + rounding of a token mean",
              True),
        Limit("bf16.grad", BF16_GRAD_MULTIPLE, "<=",
              "bf16 step-0 gradient per tensor: ||g - g64|| <= m * ||g_ds - g64||, worst "
              "tensor", True),
        Limit("bf16.is_bf16", BF16_IS_BF16_MIN, ">=",
              "bf16 step-0 gradient, all tensors: ||g_jax16 - g64|| / ||g_ds16 - g64|| "
              "(a bf16 run done in higher precision sits far below)", True),
        Limit("bf16.activations", BF16_ACT_MULTIPLE, "<=",
              "bf16 step-0 activations per layer: ||jax - torch|| <= m * ||hf - torch|| + "
              f"{BF16_ACT_SCALE_FRACTION} * ||torch - float64|| (relative), worst point", True),
        Limit("bf16.accum", BF16_ACCUM_MULTIPLE, "<=",
              "bf16 gradient change from 1 to 64 micro-steps, jax / torch with fp32 "
              "accumulation, median tensor", True),
        Limit("bf16.loss_fn", BF16_LOSS_FN_MULTIPLE, "<=",
              "loss function on torch bf16's logits: ||dL/dlogits - float64|| <= m * "
              "torch's + fp32 rounding floor", True),
        Limit("bf16.curve", BF16_CURVE_MULTIPLE, "<=",
              f"RMS|loss_jax - loss_ds| over {BF16_STEPS} steps <= m * the largest RMS "
              "distance between two DeepSpeed bf16 stages", True),
        # both
        Limit("batch_fingerprint_mismatches", 0, "<=",
              "steps whose global-batch fingerprint differs between the two sides"),
        Limit("lr_mismatches", 0, "<=",
              "continued steps (parity continue) whose logged learning rate is not "
              "lr_at(step) within one fp32 ulp: the schedule position was not carried"),
    )
}


def limit(key: str) -> Limit:
    """The :class:`Limit` named ``key``; ValueError lists the known keys."""
    try:
        return LIMITS[key]
    except KeyError:
        raise ValueError(f"unknown limit {key!r}; known: {sorted(LIMITS)}") from None
