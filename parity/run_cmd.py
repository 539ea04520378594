"""``parity run CONFIG [k=v ...] --out DIR``: the full parity run (see :mod:`parity.run`).

Exit status 0 only when every check passes; the last line printed names report.html.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmspec.cli import add_config_args, config_from_args, names_arg, zero_stages_arg
from parity.limits import BF16_STEPS, FP32_LOSS_STEPS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity run`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "run",
        help="train both sides on the same weights and batches, compare, write reports",
        description="Initialise weights once, compare forward logits (JAX, torch, Hugging "
        "Face), run `jaxlm train` and `torchlm train` (per ZeRO stage and precision) from "
        "those weights, check losses, gradients, updates and batch fingerprints against "
        "the limits in parity/limits.py, and write report.json/.md/.html.",
    )
    add_config_args(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder (runs, weights, reports)")
    p.add_argument("--zero-stages", type=zero_stages_arg, default=(1, 2, 3), metavar="LIST",
                   help="DeepSpeed ZeRO stages to compare against (default 1,2,3)")
    p.add_argument("--precisions", type=names_arg, default=("fp32", "bf16"), metavar="LIST",
                   help="precisions to run (default fp32,bf16)")
    p.add_argument("--steps-fp32", type=int, default=FP32_LOSS_STEPS, metavar="N",
                   help=f"fp32 training steps (default {FP32_LOSS_STEPS}: the fp32 loss "
                   "check's window)")
    p.add_argument("--steps-bf16", type=int, default=BF16_STEPS, metavar="N",
                   help=f"bf16 training steps (default {BF16_STEPS}: the bf16 loss-curve "
                   "check's window)")
    p.add_argument("--jax-devices", type=int, default=None, metavar="N",
                   help="virtual CPU devices of the JAX trainer (default: zero.world_size; "
                   "ignored on GPU)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="trainers to run at a time, alongside the in-process comparisons "
                   "(default 2 on CPU, 1 on GPU; 1 gives throughput figures that compare)")
    p.add_argument("--run-timeout", type=float, default=1800.0, metavar="S",
                   help="kill a trainer after S seconds (default 1800)")
    p.add_argument("--no-forward", action="store_true",
                   help="skip the in-process forward comparison")
    p.add_argument("--reuse-runs", action="store_true",
                   help="train nothing: judge the runs an earlier `parity run` with the same "
                   "config and options left under DIR/runs (e.g. after a limit changed)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from parity.run import ParityOptions, run_parity

    cfg = config_from_args(args)
    opts = ParityOptions(out=args.out, zero_stages=args.zero_stages,
                         precisions=args.precisions, steps_fp32=args.steps_fp32,
                         steps_bf16=args.steps_bf16, jax_devices=args.jax_devices,
                         run_timeout_s=args.run_timeout, forward=not args.no_forward,
                         reuse_runs=args.reuse_runs, jobs=args.jobs)
    result = run_parity(cfg, opts, config_source=args.config)
    return finish(result)


def finish(result: dict) -> int:
    """Print the diagnosis headline (first, when there is one), the verdict (failing
    checks with their numbers) and, last, the report path."""
    from parity.report import all_passed, failing_checks, fmt

    headline = (result.get("diagnosis") or {}).get("headline")
    if headline:
        print(f"DIAGNOSIS {headline}", flush=True)
    checks = result.get("checks") or []
    bad = failing_checks(result)
    for c in bad:
        print(f"FAILED {c['name']}: {fmt(c['value'])} (limit {c.get('op', '<=')} "
              f"{fmt(c['limit'])}, noise {fmt(c.get('noise'))}, margin "
              f"{fmt(c.get('margin'))})", flush=True)
    for e in result.get("errors") or []:
        print(f"ERROR {e.splitlines()[0]}", flush=True)
    ok = all_passed(result)
    print(f"{'PASS' if ok else 'FAIL'}: {len(checks) - len(bad)}/{len(checks)} checks passed",
          flush=True)
    print(f"report: {result['paths']['html']}", flush=True)
    return 0 if ok else 1
