"""HF-named safetensors for :class:`torchlm.model.Llama` (same files as ``jaxlm`` writes).

Loading is strict: names and shapes must be exactly :func:`lmspec.weights.param_shapes`
(checked by :func:`lmspec.weights.check_names`), so a tied model rejects ``lm_head``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmspec import weights as spec
from torchlm.model import Llama


def to_numpy(model: Llama) -> dict[str, np.ndarray]:
    """The model's parameters as fp32 numpy arrays with HF names."""
    return {
        k: v.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for k, v in model.state_dict().items()
    }


@torch.no_grad()
def load_numpy(model: Llama, tensors: dict[str, np.ndarray], where: str = "weights") -> None:
    """Copy HF-named arrays into ``model`` (strict names and shapes; cast to its dtype)."""
    spec.check_names(model.cfg, tensors, where)
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
    own = model.state_dict()
    for k, v in state.items():
        own[k].copy_(v.to(dtype=own[k].dtype, device=own[k].device))


def save_safetensors(model: Llama, path: str | os.PathLike) -> Path:
    """Write the model's fp32 weights with HF names (atomic)."""
    return spec.save_safetensors(to_numpy(model), path)


def load_safetensors(model: Llama, path: str | os.PathLike) -> None:
    """Load an HF-named fp32 safetensors file into ``model`` strictly."""
    load_numpy(model, spec.load_safetensors(path), where=str(path))
