"""``parity continue RUN_DIR --steps N [--out DIR] [--floor-stage K] [k=v ...]``:
continuation parity (:mod:`parity.continuation`). Exit status 0 when every check passes,
1 when one fails, 2 for a user error (no checkpoint, not a run folder, N < 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmspec.cli import add_overrides_arg, names_arg
from parity.limits import BF16_STEPS, FP32_LOSS_STEPS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity continue`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "continue",
        help="continue a run's checkpoint in both trainers (one converted) and compare",
        description="Read the newest checkpoint of a DeepSpeed (torchlm) or jaxlm run "
        "folder (next step S), continue it N steps in its own trainer from a copy of that "
        "checkpoint and N steps in the other trainer from the converted state (parity "
        "convert), plus a second DeepSpeed ZeRO stage for the noise floor, in fp32 (and "
        "bf16 for a bf16 run), and judge them like `parity run`: in fp32 the step-S "
        "gradient and AdamW update against float64, in bf16 the step-S loss and gradient "
        "against DeepSpeed bf16's distance from float64; the loss curves against "
        "DeepSpeed's stage-to-stage noise; batch fingerprints and learning rates of every "
        "continued step. RUN_DIR is never written.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                   help="a torchlm or jaxlm run folder with a checkpoint (fp32 or bf16)")
    p.add_argument("--steps", type=int, default=10, metavar="N",
                   help="steps to continue (default 10; the loss curve is judged over at "
                   f"most the loss checks' windows: {FP32_LOSS_STEPS} steps in fp32, "
                   f"{BF16_STEPS} in bf16)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default reports/continue-<config name>)")
    p.add_argument("--floor-stage", type=int, default=None, metavar="K",
                   help="the second DeepSpeed ZeRO stage of the noise floor (default: 2 "
                   "for a ZeRO-1 run, else 1)")
    p.add_argument("--precisions", type=names_arg, default=None, metavar="LIST",
                   help="precisions to continue in, e.g. fp32,bf16 (default: fp32, and bf16 "
                   "too for a run that trained in bf16; fp32 checks the converted state "
                   "exactly, bf16 judges the run as it trained)")
    p.add_argument("--run-timeout", type=float, default=1800.0, metavar="S",
                   help="kill a trainer after S seconds (default 1800)")
    add_overrides_arg(p, help="every continued run's config changes, e.g. train.log_every=1")
    p.set_defaults(func=_continue)
    return p


def _continue(args: argparse.Namespace) -> int:
    from lmspec.config import load_config
    from parity.continuation import ContinueOptions, continue_parity
    from parity.run_cmd import finish

    out = args.out
    if out is None:
        cfg_path = args.run_dir / "config.yaml"
        name = load_config(cfg_path).name if cfg_path.is_file() else args.run_dir.name
        out = Path("reports") / f"continue-{name}"
    opts = ContinueOptions(out=out, steps=args.steps, floor_stage=args.floor_stage,
                           precisions=args.precisions, overrides=tuple(args.overrides),
                           run_timeout_s=args.run_timeout)
    return finish(continue_parity(args.run_dir, opts))
