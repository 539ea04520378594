"""Full (un-partitioned) fp32 gradients, parameters and AdamW moments out of (and into) a
DeepSpeed engine.

Every function here is a collective: all ranks must call it in the same order. The
result is complete on every rank; callers write it from rank 0 only.

Where the fp32 values live, per mode (DeepSpeed 0.19):
- ZeRO 1/2/3 and bf16 (any stage): the optimizer keeps fp32 partitions;
  ``deepspeed.utils.safe_get_full_grad`` / ``safe_get_full_fp32_param`` assemble them.
- ZeRO 0 in fp32: the module parameters are the fp32 masters and ``param.grad`` holds
  the all-reduced (rank-averaged) gradient after the boundary backward.
- ZeRO 0 in bf16 (DeepSpeed's ``FP16_UnfusedOptimizer`` with bf16): fp32 masters in its
  ``fp32_groups``; gradients accumulate in bf16 ``param.grad``.

AdamW's moments live in the wrapped torch optimizer's ``state``, keyed by the tensors
DeepSpeed put in its param groups (flat fp32 partitions under ZeRO 1-3 and bf16, the
masters or the module parameters under ZeRO 0). ZeRO 1-3 and bf16:
``deepspeed.utils.safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state``;
ZeRO 0: the torch state of the parameter's master. Under ZeRO 1/2 and DeepSpeed's
``BF16_Optimizer`` those two functions reach the state through views that DeepSpeed links
at its first ``step()`` (its private ``_lazy_init_hp_params_optimizer_state``):
:func:`link_optimizer_state` makes that link for an engine that has not stepped. ZeRO 3
keeps the tensors its torch optimizer steps in ``fp32_partitioned_groups_flat`` (in the
param groups only while stepping): :func:`stepped_tensors` reads them there.
"""

from __future__ import annotations

import numpy as np
import torch
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

# AdamW's per-parameter state (torch names); "step" is the update count
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed holds ``p``'s fp32 state in partitions (ZeRO 1-3, bf16)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _torch_state(torch_optimizer: torch.optim.Optimizer, p: torch.nn.Parameter,
                 masters: dict[int, torch.Tensor] | None) -> dict:
    """ZeRO 0: the torch AdamW state of ``p``'s master (``p`` itself in fp32)."""
    key = masters[id(p)] if masters is not None else p
    if key not in torch_optimizer.state:
        raise RuntimeError("the optimizer has no state for a parameter (not stepped, and "
                           "init_optimizer_state was not called)")
    return torch_optimizer.state[key]


def link_optimizer_state(engine: DeepSpeedEngine) -> None:
    """Link ZeRO 1/2 and ``BF16_Optimizer`` parameters to the torch optimizer's state,
    which DeepSpeed does only inside its first ``step()``; a no-op elsewhere. Call after
    ``load_checkpoint`` or :func:`init_optimizer_state` on an engine that has not stepped."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def stepped_tensors(engine: DeepSpeedEngine, torch_optimizer: torch.optim.Optimizer
                    ) -> list[tuple[dict, torch.Tensor]]:
    """(param group, tensor) of every tensor this rank's torch AdamW updates: the tensors
    in its param groups, except under ZeRO 3, whose optimizer puts each fp32 sub-group
    partition into its param group only while stepping it."""
    opt = engine.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        groups = torch_optimizer.param_groups
        return [(groups[opt.sub_group_to_group_id[i]], t) for i, t in enumerate(flat)]
    return [(g, p) for g in torch_optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def init_optimizer_state(engine: DeepSpeedEngine, torch_optimizer: torch.optim.Optimizer,
                         step: int) -> None:
    """Give every tensor the torch AdamW updates the state its first ``step()`` creates
    (zero moments; ``step`` a float32 scalar, on the tensor's device for the fused and
    capturable kernels, else on the CPU: torch's ``Adam._init_group``) but with update
    count ``step``; then :func:`link_optimizer_state`. Call after
    :func:`set_master_params` (which clears the ZeRO 0 + bf16 state)."""
    for group, t in stepped_tensors(engine, torch_optimizer):
        on_device = group.get("fused") or group.get("capturable")
        torch_optimizer.state[t] = {
            "step": torch.tensor(float(step), dtype=torch.float32,
                                 device=t.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format),
        }
    link_optimizer_state(engine)


def optimizer_steps(engine: DeepSpeedEngine, torch_optimizer: torch.optim.Optimizer
                    ) -> list[float]:
    """The AdamW update count of every tensor this rank's torch optimizer updates (one
    without state counts 0: torch AdamW creates the state at its first step)."""
    out = []
    for _, t in stepped_tensors(engine, torch_optimizer):
        st = torch_optimizer.state.get(t, {})
        out.append(float(st["step"]) if "step" in st else 0.0)
    return out


def full_optimizer_state(engine: DeepSpeedEngine, torch_optimizer: torch.optim.Optimizer,
                         key: str) -> dict[str, np.ndarray]:
    """AdamW's ``key`` (``exp_avg`` or ``exp_avg_sq``) of every parameter, fp32, HF names
    (consolidated; a collective under ZeRO 1-3)."""
    out: dict[str, np.ndarray] = {}
    masters = _unfused_masters(engine)
    for name, p in _named_params(engine):
        if _partitioned(p):
            v = safe_get_full_optimizer_state(p, key)
        else:
            v = _torch_state(torch_optimizer, p, masters)[key]
        out[name] = v.detach().to(device="cpu", dtype=torch.float32).reshape(
            tuple(getattr(p, "ds_shape", p.shape))).numpy().copy()
    return out


@torch.no_grad()
def set_optimizer_state(engine: DeepSpeedEngine, torch_optimizer: torch.optim.Optimizer,
                        key: str, values: dict[str, np.ndarray]) -> None:
    """Make AdamW's ``key`` of every parameter exactly ``values`` (full arrays, HF names,
    on every rank); the state must exist (:func:`init_optimizer_state`)."""
    masters = _unfused_masters(engine)
    for name, p in _named_params(engine):
        value = torch.from_numpy(np.asarray(values[name], np.float32))
        if _partitioned(p):
            safe_set_full_optimizer_state(p, value.to(p.device), key)
        else:
            target = _torch_state(torch_optimizer, p, masters)[key]
            target.copy_(value.reshape(target.shape).to(target.device))
