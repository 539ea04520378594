"""Which DeepSpeed settings profile a harness command runs (see ``zero.profile``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lmspec.config import ExperimentConfig


def force_parity_profile(cfg: ExperimentConfig,
                         log: Callable[[str], None]) -> ExperimentConfig:
    """``cfg`` with ``zero.profile=parity``: a parity run is judged against DeepSpeed's
    bitwise-strict settings only, whatever the config says; ``log`` says so when the
    config asked for another profile."""
    if cfg.zero.profile == "parity":
        return cfg
    log(f"zero.profile={cfg.zero.profile} ignored: parity run always uses DeepSpeed's "
        "parity profile (bitwise-strict settings)")
    return dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, profile="parity"))
