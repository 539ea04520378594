"""DeepSpeed config dict, optimizer and LR scheduler from one ``ExperimentConfig``.

The JSON from :func:`build_ds_config` is what ``torchlm ds-config`` prints. The optimizer
and scheduler are passed to ``deepspeed.initialize`` as objects (a torch ``AdamW`` with
the ``lmspec`` weight-decay mask as param groups, and a ``LambdaLR`` over
:func:`lmspec.schedule.lr_at`), so the JSON carries no ``optimizer``/``scheduler``
section; :func:`optimizer_spec` describes them for users who run DeepSpeed their own way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmspec.config import ExperimentConfig
from lmspec.schedule import lr_at
from lmspec.weights import decays


def build_ds_config(cfg: ExperimentConfig, world_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` with ``world_size`` ranks (default ``zero.world_size``).

    ``zero.profile`` picks the settings: ``parity`` (bitwise-strict, what parity runs use)
    or ``bench`` (what users run for speed: ``overlap_comm`` on, with the fused AdamW of
    :func:`build_optimizer` and the fused attention of :func:`model_attention`). Both keep
    the same precision policy, so they train the same math.

    bf16 follows the parity policy (docs/parity.md): gradients accumulated
    (``data_types.grad_accum_dtype``) and reduced (``communication_data_type``) in fp32 so
    that both sides sum the same fp32 gradients (except ZeRO 0, see below).
    ``gradient_clipping`` 0 means off, as ``optim.grad_clip`` 0. The seed is ours
    (``train.seed``: weights and data order), not a DeepSpeed key.
    """
    ws = cfg.zero.world_size if world_size is None else world_size
    t = cfg.train
    bf16 = t.precision == "bf16"
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    if cfg.zero.stage in (1, 2, 3):
        # parity: no communication/compute overlap, so the reduction order is the same
        # every run (bitwise resume); bench: overlap gradient reduction with the backward
        overlap = cfg.zero.profile == "bench"
        zero.update({"contiguous_gradients": True, "overlap_comm": overlap})
    conf: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(ws),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": None,  # no DeepSpeed progress lines
        "wall_clock_breakdown": False,
        # torch.optim.AdamW is on DeepSpeed's ZeRO list; this only silences the check
        "zero_allow_untested_optimizer": True,
    }
    if bf16:
        # DeepSpeed 0.19 accepts fp32 accumulation of bf16 gradients only with ZeRO >= 1
        # (stage 0 raises "unsupported mix of model_dtype and grad_accum_dtype"), so
        # ZeRO 0 keeps its gradients in the bf16 param.grad (micro-steps summed and the
        # rank average stored in bf16): a known deviation from the shared spec, ~3e-3
        # relative on the gradient. Use ZeRO >= 1 for bf16 parity runs.
        accum = "fp32" if cfg.zero.stage >= 1 else "bf16"
        conf["data_types"] = {"grad_accum_dtype": accum}
        conf["communication_data_type"] = "fp32"
    return conf


def param_groups(model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Two AdamW groups (decayed / not decayed) by :func:`lmspec.weights.decays` on the
    HF parameter names; empty groups are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if decays(name, tuple(p.shape), cfg.optim.wd_mask) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def model_attention(cfg: ExperimentConfig) -> str:
    """The :class:`torchlm.model.Llama` attention path of ``zero.profile``: ``repeat_kv``
    (parity) or ``flash`` (bench)."""
    return "flash" if cfg.zero.profile == "bench" else "repeat_kv"


def optimizer_kernel(cfg: ExperimentConfig, device_type: str) -> str:
    """How torch AdamW runs its update: ``fused`` (bench profile: one kernel over all
    tensors; torch has it for CUDA and CPU tensors), ``foreach`` (parity on CUDA) or
    ``single`` (parity on CPU: one tensor at a time, the order the parity runs were
    measured with)."""
    if cfg.zero.profile == "bench":
        return "fused"
    return "foreach" if device_type == "cuda" else "single"


def build_optimizer(model: nn.Module, cfg: ExperimentConfig,
                    device_type: str = "cpu") -> torch.optim.AdamW:
    """torch AdamW with every hyperparameter explicit; its kernel by
    :func:`optimizer_kernel`.

    The base LR is 1.0 and the schedule (:func:`build_scheduler`) multiplies it by
    ``lr_at(step)``, so the LR each update uses is ``lr_at(step)`` bit for bit.
    """
    from torchlm.lean import skip_muon_import

    skip_muon_import()  # DeepSpeed asks whether this AdamW is Muon: no (torchlm.lean)
    o = cfg.optim
    kernel = optimizer_kernel(cfg, device_type)
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=1.0,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        amsgrad=False,
        maximize=False,
        foreach=kernel == "foreach",
        capturable=False,
        differentiable=False,
        fused=kernel == "fused",
    )


class ScheduleLambda:
    """Picklable ``step -> lr_at(step)`` multiplier for ``LambdaLR`` (base LR 1.0)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.optim = cfg.optim

    def __call__(self, step: int) -> float:
        return lr_at(step, self.optim)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: ExperimentConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` whose LR after ``s`` scheduler steps is ``lr_at(s)``.

    LambdaLR applies ``lambda(0)`` on construction and DeepSpeed calls
    ``scheduler.step()`` after every optimizer step, so optimizer step ``s`` (0-based)
    uses ``lr_at(s)``.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleLambda(cfg))


def optimizer_spec(cfg: ExperimentConfig, device_type: str = "cuda") -> dict[str, Any]:
    """Human-readable description of what the trainer passes besides the JSON: the
    optimizer, its schedule and the model's attention path (on ``device_type``)."""
    o = cfg.optim
    return {
        "profile": cfg.zero.profile,
        "attention": model_attention(cfg),
        "type": "torch.optim.AdamW",
        "kernel": optimizer_kernel(cfg, device_type),
        "betas": [o.beta1, o.beta2],
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "wd_mask": o.wd_mask,
        "amsgrad": False,
        "lr_schedule": "torch.optim.lr_scheduler.LambdaLR(base lr 1.0, lmspec.schedule.lr_at)",
        "lr": o.lr,
        "warmup_steps": o.warmup_steps,
        "decay_steps": o.decay_steps,
        "min_lr_ratio": o.min_lr_ratio,
    }
