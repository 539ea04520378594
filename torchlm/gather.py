"""Full (un-partitioned) fp32 gradients and parameters out of a DeepSpeed engine.

Every function here is a collective: all ranks must call it in the same order. The
result is complete on every rank; callers write it from rank 0 only.

Where the fp32 values live, per mode (DeepSpeed 0.19):
- ZeRO 1/2/3 and bf16 (any stage): the optimizer keeps fp32 partitions;
  ``deepspeed.utils.safe_get_full_grad`` / ``safe_get_full_fp32_param`` assemble them.
- ZeRO 0 in fp32: the module parameters are the fp32 masters and ``param.grad`` holds
  the all-reduced (rank-averaged) gradient after the boundary backward.
- ZeRO 0 in bf16 (DeepSpeed's ``FP16_UnfusedOptimizer`` with bf16): fp32 masters in its
  ``fp32_groups``; gradients accumulate in bf16 ``param.grad``.
"""

from __future__ import annotations

import numpy as np
import torch
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param


def _named_params(engine: DeepSpeedEngine) -> list[tuple[str, torch.nn.Parameter]]:
    return list(engine.module.named_parameters())


def _unfused_masters(engine: DeepSpeedEngine) -> dict[int, torch.Tensor] | None:
    """ZeRO 0 + bf16: module parameter id -> its fp32 master tensor."""
    opt = engine.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return None
    return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
            for lp, hp in zip(lps, hps, strict=True)}


@torch.no_grad()
def set_master_params(engine: DeepSpeedEngine, weights: dict[str, np.ndarray]) -> None:
    """Make the fp32 masters exactly ``weights`` (every rank passes the full arrays).

    In bf16 DeepSpeed builds its fp32 masters from the module after casting it to bf16,
    i.e. from bf16-rounded weights, and ZeRO 0's ``FP16_UnfusedOptimizer`` also takes
    one AdamW step with zero gradients at construction (Adam step count 1 and one
    weight-decay step). The shared spec starts from the fp32 weights with fresh Adam
    state, so restore both here, before the first step (not on resume).
    """
    masters = _unfused_masters(engine)
    for name, p in _named_params(engine):
        value = torch.from_numpy(np.asarray(weights[name], np.float32))
        if masters is not None:
            masters[id(p)].copy_(value.to(masters[id(p)].device))
        elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value.to(p.device))
        else:
            assert p.dtype == torch.float32, name
            p.copy_(value.to(p.device))
        if not hasattr(p, "ds_id"):
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))
    if masters is not None:
        engine.optimizer.optimizer.state.clear()  # undo the construction-time dummy step


def full_grads(engine: DeepSpeedEngine) -> dict[str, np.ndarray]:
    """The accumulated fp32 gradient of every parameter, HF names.

    Call after the backward of the last micro-step of an optimizer step and before the
    ``engine.step()`` that applies it: the values are the gradient of the global-batch
    token mean (DeepSpeed divides each micro loss by the accumulation steps and averages
    over ranks), before clipping.
    """
    out: dict[str, np.ndarray] = {}
    for name, p in _named_params(engine):
        g = safe_get_full_grad(p)
        if g is None:
            raise RuntimeError(f"no gradient for {name}: call full_grads after backward")
        out[name] = g.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
    return out


def full_params(engine: DeepSpeedEngine) -> dict[str, np.ndarray]:
    """The fp32 master weights, HF names (consolidated for every ZeRO stage)."""
    out: dict[str, np.ndarray] = {}
    masters = _unfused_masters(engine)
    for name, p in _named_params(engine):
        v = masters[id(p)] if masters is not None else safe_get_full_fp32_param(p)
        if v is None:
            # ZeRO 0 without bf16: the module parameter is the fp32 master itself
            assert p.dtype == torch.float32 and not hasattr(p, "ds_id"), name
            v = p.data
        out[name] = v.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
    return out


def global_norm(tensors: dict[str, np.ndarray]) -> float:
    """L2 norm over all tensors, accumulated in float64."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                             for v in tensors.values())))
