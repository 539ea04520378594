"""``parity convert ds-to-jax DS_RUN JAX_RUN [k=v ...]`` and ``parity convert jax-to-ds
JAX_RUN DS_RUN [k=v ...]``: a run's whole train state into the other trainer's run folder
(:mod:`parity.convert`)."""

from __future__ import annotations

import argparse
import sys

from lmspec.cli import add_overrides_arg

DIRECTIONS = {
    "ds-to-jax": ("a torchlm (DeepSpeed) run -> a jaxlm run folder",
                  "a DeepSpeed run folder (torchlm train's train.out_dir)",
                  "the jaxlm run folder to create (must not exist, or be empty)",
                  "mesh.fsdp=4, mesh.tensor=2, train.scan_layers=false, train.steps=200"),
    "jax-to-ds": ("a jaxlm run -> a torchlm (DeepSpeed) run folder",
                  "a JAX run folder (jaxlm train's train.out_dir)",
                  "the DeepSpeed run folder to create (must not exist, or be empty)",
                  "zero.stage=3, zero.world_size=4, train.steps=200"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity convert`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "convert",
        help="move a run's train state from DeepSpeed to JAX or back",
        description="Convert a run's whole train state (fp32 master weights, AdamW "
        "moments, Adam step, LR-schedule position, next data step, config and metrics "
        "records) into a run folder of the other trainer, which `jaxlm train` / `torchlm "
        "train` continues from with no extra flag. From any ZeRO stage 0-3 and world size "
        "to any JAX mesh, and back. Every tensor's name, shape and dtype is checked; "
        "nothing is written at the destination until the conversion has succeeded.",
    )
    sub = p.add_subparsers(dest="direction", required=True)
    for name, (summary, src, dst, example) in DIRECTIONS.items():
        d = sub.add_parser(name, help=summary,
                           description=f"SRC: {src}. DST: {dst}. Overrides change the "
                           f"converted run's config, e.g. {example}; model, optim, data, "
                           "train.global_batch_size and train.seed stay the source's.")
        d.add_argument("src", metavar="SRC", help=src)
        d.add_argument("dst", metavar="DST", help=dst)
        add_overrides_arg(d, help=f"the converted run's config changes, e.g. {example}")
        d.add_argument("--step", type=int, default=None, metavar="N",
                       help="convert the checkpoint taken after N steps (default: the "
                       "newest)")
        d.set_defaults(func=_convert)
    return p


def say(msg: str) -> None:
    """One progress line per phase (stdout, like the other parity commands)."""
    print(f"[parity convert] {msg}", flush=True)


def _convert(args: argparse.Namespace) -> int:
    from parity.convert import ds_to_jax, jax_to_ds
    from torchlm.launch import AgentDied, WorkerError

    convert = ds_to_jax if args.direction == "ds-to-jax" else jax_to_ds
    try:
        convert(args.src, args.dst, args.overrides, step=args.step, say=say)
    except (WorkerError, AgentDied) as e:
        print(f"error: the DeepSpeed conversion workers failed ({e}); nothing was written "
              f"at {args.dst}", file=sys.stderr)
        return 1
    return 0
