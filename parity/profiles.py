"""Which DeepSpeed settings profile a harness command runs (see ``zero.profile``), and
the loggers it leaves off (``log.wandb``)."""

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


def without_wandb(cfg: ExperimentConfig, log: Callable[[str], None]) -> ExperimentConfig:
    """``cfg`` with ``log.wandb=off``: the harness's many short trainer runs (and its
    timings) are not W&B runs; its report is the record. ``log`` says so when the config
    asked for W&B."""
    if cfg.log.wandb == "off":
        return cfg
    log(f"log.wandb={cfg.log.wandb} ignored: the harness's trainer runs are not logged to "
        "W&B (the report and each run's metrics.jsonl are)")
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, wandb="off"))
