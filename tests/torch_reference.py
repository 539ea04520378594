"""Single-process plain-torch AdamW training: the reference the DeepSpeed runs are held to.

Written independently of ``torchlm.ds_config``/``torchlm.trainer``: full global batch in
one forward, global-norm clipping by hand, param groups from ``lmspec.weights``'s
mask, LR set from ``lmspec.schedule.lr_at`` before every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmspec.config import ExperimentConfig
from lmspec.data import Dataset
from lmspec.schedule import lr_at
from lmspec.weights import decays, init_weights
from torchlm.model import Llama
from torchlm.weights import load_numpy, to_numpy


@dataclass
class ReferenceRun:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grads: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    params: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


def reference_run(cfg: ExperimentConfig, keep_grads: tuple[int, ...] = (),
                  keep_params: tuple[int, ...] = (),
                  weights: dict[str, np.ndarray] | None = None) -> ReferenceRun:
    """``cfg.train.steps`` steps from ``weights`` (default: lmspec init, train.seed)."""
    torch.manual_seed(0)
    data = Dataset.from_config(cfg, progress=False)
    model = Llama(cfg.model)
    load_numpy(model, init_weights(cfg.model, cfg.train.seed) if weights is None else weights)
    o = cfg.optim
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decays(n, tuple(p.shape), o.wd_mask)],
         "weight_decay": o.weight_decay},
        {"params": [p for n, p in named if not decays(n, tuple(p.shape), o.wd_mask)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0,
                            betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    out = ReferenceRun()
    for step in range(cfg.train.steps):
        lr = lr_at(step, o)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = model.loss(torch.from_numpy(data.global_batch(step)))
        loss.backward()
        if step in keep_grads:
            out.grads[step] = {n: p.grad.detach().numpy().copy() for n, p in named}
        # global norm accumulated in float64 (torch's fp32 CPU norm of a large tensor is
        # off by ~1e-5 relative); clip as the spec says: scale by max/norm if norm > max
        norm = float(torch.stack([p.grad.double().pow(2).sum() for _, p in named]).sum().sqrt())
        if 0 < o.grad_clip < norm:
            for _, p in named:
                p.grad.mul_(o.grad_clip / norm)
        opt.step()
        out.losses.append(float(loss.detach()))
        out.grad_norms.append(float(norm))
        out.lrs.append(lr)
        if step in keep_params:
            out.params[step] = to_numpy(model)
    return out
