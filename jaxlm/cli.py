"""``jaxlm`` command line: ``jaxlm train`` and ``jaxlm generate``.

Thin: argument parsing only; the work is in :mod:`jaxlm.trainer` and
:mod:`jaxlm.generate`. User mistakes exit 2 with ``error: ...`` (``lmspec.cli.run``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lmspec.cli import add_config_args, config_from_args, run


def parse_steps(text: str, flag: str) -> list[int]:
    """``"0,3"`` -> ``[0, 3]``; a ValueError naming ``flag`` otherwise."""
    if not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            s = int(part)
        except ValueError:
            raise ValueError(
                f"{flag}={text!r}: expected comma-separated step numbers, e.g. 0,3"
            ) from None
        if s < 0:
            raise ValueError(f"{flag}={text!r}: steps must be >= 0")
        out.append(s)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Flax NNX Llama trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a config")
    add_config_args(tr)
    tr.add_argument("--init-weights", metavar="FILE",
                    help="HF-named fp32 safetensors to start from (strict)")
    tr.add_argument("--dump-grads", default="", metavar="STEPS",
                    help="write the full fp32 gradient of these steps, e.g. 0,3")
    tr.add_argument("--dump-params", default="", metavar="STEPS",
                    help="write the fp32 params after these steps' updates")
    tr.add_argument("--no-resume", action="store_true",
                    help="start from scratch even if out_dir holds checkpoints")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)
    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("checkpoint", help="a run's out_dir or one of its checkpoint folders")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 = greedy; otherwise sample from softmax(logits / T)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    return parser


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dump_grads = parse_steps(args.dump_grads, "--dump-grads")
    dump_params = parse_steps(args.dump_params, "--dump-params")
    from jaxlm.distributed import maybe_initialize

    maybe_initialize(cfg.distributed)
    from jaxlm.trainer import train

    train(cfg, init_weights=args.init_weights, dump_grads=dump_grads,
          dump_params=dump_params, resume=not args.no_resume, progress=not args.no_progress)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jaxlm.generate import generate_from_checkpoint

    text = generate_from_checkpoint(args.checkpoint, args.prompt,
                                    max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    raise SystemExit(run(_main, argv))


if __name__ == "__main__":
    main()
