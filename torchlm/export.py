"""Offline export of a DeepSpeed checkpoint to HF-named fp32 safetensors (no processes).

The trainer already writes ``model.safetensors`` at the end of a run; this reads any
saved checkpoint (e.g. of a run that was stopped) and returns the fp32 master weights:

- ZeRO 1/2/3: DeepSpeed's ``zero_to_fp32`` merges the per-rank fp32 partitions, except
  ZeRO 1 + bf16 (DeepSpeed's ``BF16_Optimizer``, ``bf16_zero_pp_rank_*`` files, which
  ``zero_to_fp32`` rejects): merged here from its ``param_slice_mappings``.
- ZeRO 0, fp32: the module state dict is the fp32 master.
- ZeRO 0, bf16: the module holds bf16 copies; the fp32 masters are the optimizer's
  ``fp32_groups``, in the order of :func:`torchlm.ds_config.param_groups`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from lmspec.config import ExperimentConfig, load_config
from lmspec.weights import check_names, decays, param_shapes
from torchlm.runfolder import CKPT_SUBDIR, latest_checkpoint, verify_checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"


def checkpoint_weights(out_dir: str | os.PathLike, tag: str | None = None
                       ) -> dict[str, np.ndarray]:
    """fp32 master weights (HF names, strict) of checkpoint ``tag`` (default: latest)
    of the run in ``out_dir``."""
    out_dir = Path(out_dir)
    cfg = load_config(out_dir / "config.yaml")
    tag = tag or latest_checkpoint(out_dir)
    folder = out_dir / CKPT_SUBDIR / (tag or "")
    if not tag or not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} in {out_dir / CKPT_SUBDIR}")
    verify_checkpoint(out_dir, tag, say=lambda m: print(m, file=sys.stderr))
    if not any(folder.glob("*optim_states.pt")):  # ZeRO 0 keeps no partitioned states
        state = _zero0_weights(cfg, folder / MODEL_STATES)
    elif _is_bf16_optimizer(folder):
        state = _bf16_optimizer_weights(cfg, folder)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(out_dir / CKPT_SUBDIR), tag=tag)
    out = {k: v.detach().to(torch.float32).numpy().copy() for k, v in state.items()}
    check_names(cfg.model, out, f"checkpoint {folder}")
    return out


def _zero0_weights(cfg: ExperimentConfig, path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint
    module = ckpt["module"]
    optim = ckpt.get("optimizer") or {}
    if "fp32_groups" not in optim:
        return module
    shapes = param_shapes(cfg.model)
    names = [n for n in module if n in shapes]
    wd = cfg.optim.wd_mask
    groups = [[n for n in names if decays(n, shapes[n], wd)],
              [n for n in names if not decays(n, shapes[n], wd)]]
    groups = [g for g in groups if g]
    masters = optim["fp32_groups"]
    if [len(g) for g in groups] != [len(g) for g in masters]:
        raise ValueError(f"{path}: optimizer groups {[len(g) for g in masters]} do not match "
                         f"the weight-decay groups {[len(g) for g in groups]} of the config")
    return {n: t for g, ts in zip(groups, masters, strict=True)
            for n, t in zip(g, ts, strict=True)}


def _is_bf16_optimizer(folder: Path) -> bool:
    """ZeRO 1 + bf16 checkpoints (BF16_Optimizer) carry no ``zero_stage`` entry, which is
    what ``zero_to_fp32`` requires."""
    files = sorted(folder.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    if not files:
        return False
    osd = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return "zero_stage" not in osd and "param_slice_mappings" in osd


def _bf16_optimizer_weights(cfg: ExperimentConfig, folder: Path) -> dict[str, torch.Tensor]:
    """Concatenate each parameter's fragments over the ranks' flat fp32 partitions (rank
    r holds elements [r*P, (r+1)*P) of each group's flat buffer, so a parameter's pieces
    follow each other in rank order)."""
    files = sorted(folder.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda p: int(p.name.split("_")[4]))
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(osd["single_partition_of_fp32_groups"],
                                 osd["param_slice_mappings"], strict=True):
            for name, addr in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, addr.start, addr.numel))
    shapes = param_shapes(cfg.model)
    return {n: torch.cat(ps).reshape(shapes[n]) for n, ps in pieces.items() if n in shapes}
