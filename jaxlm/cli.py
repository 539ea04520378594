"""``jaxlm`` command line: ``jaxlm train``, ``jaxlm generate`` and ``jaxlm export``.

Thin: argument parsing only; the work is in :mod:`jaxlm.trainer` and
:mod:`jaxlm.generate`. User mistakes exit 2 with ``error: ...`` (``lmspec.cli.run``);
a run stopped on a non-finite loss or grad norm exits 3 (:mod:`lmspec.nonfinite`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmspec.cli import call_subcommand, config_from_args, run
from lmspec.runs import add_train_args, train_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Flax NNX Llama trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a config")
    add_train_args(tr)
    tr.set_defaults(func=_train)
    gen = sub.add_parser(
        "generate", help="sample text from a checkpoint",
        description="Continue --prompt with up to --max-new-tokens tokens from a jaxlm "
        "checkpoint: greedy (--temperature 0, the default) or sampled.")
    gen.add_argument("checkpoint", help="a run's out_dir or one of its checkpoint folders")
    gen.add_argument("--prompt", required=True,
                     help="text to continue (must encode to at least one token)")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="tokens to add, >= 0 (default 64); prompt + N must fit "
                     "model.max_position_embeddings")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="a finite number >= 0: 0 = greedy (the default); otherwise "
                     "sample from softmax(logits / T)")
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="sampling seed (default 0; unused when greedy)")
    gen.set_defaults(func=_generate)
    ex = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face model folder",
        description="Write a jaxlm checkpoint as a folder that "
        "transformers.LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained "
        "load offline: config.json, model.safetensors (sharded above --max-shard-size), "
        "generation_config.json and the run's tokenizer.")
    ex.add_argument("run_dir", help="a run's out_dir (or one of its checkpoint folders)")
    ex.add_argument("--out", required=True, metavar="DIR",
                    help="folder to write (must not exist, or be empty)")
    ex.add_argument("--step", type=int, default=None, metavar="N",
                    help="checkpoint step to export (default: the newest complete one)")
    ex.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="tensor type of the weights written (default fp32, the master "
                    "weights; bf16 rounds to nearest even)")
    ex.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="largest safetensors file before sharding with an index "
                    "(default 5GB, as save_pretrained)")
    ex.set_defaults(func=_export)
    return parser


def _train(args: argparse.Namespace) -> int:
    from lmspec.runs import for_framework

    cfg = for_framework(config_from_args(args), "jax")
    flags = train_args(args, cfg)
    import jax

    from jaxlm.distributed import maybe_initialize

    maybe_initialize(cfg.distributed)
    from jaxlm.trainer import train
    from lmspec.nonfinite import EXIT_NON_FINITE, NonFiniteError

    try:
        train(cfg, init_weights=flags.init_weights, dump_grads=flags.dump_grads,
              dump_params=flags.dump_params, resume=flags.resume, progress=flags.progress)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except jax.errors.JaxRuntimeError as e:
        from jaxlm.distributed import explain_collective_failure

        explain_collective_failure(e)  # a dead peer ends this process with its name
        raise
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jaxlm.generate import check_sampling, generate_from_checkpoint

    # before the checkpoint is loaded: a bad flag fails at once
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    text = generate_from_checkpoint(args.checkpoint, args.prompt,
                                    max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxlm.generate import load_params
    from jaxlm.weights import params_to_hf
    from lmspec.data import Dataset
    from lmspec.hf import parse_size, write_hf_folder

    max_shard = parse_size(args.max_shard_size)
    src = Path(args.run_dir)
    if args.step is not None:
        src = src / "checkpoints" / str(args.step) if (src / "checkpoints").is_dir() else src
    cfg, params, step = load_params(src)
    import numpy as np

    weights = {k: np.asarray(v, dtype=np.float32)
               for k, v in params_to_hf(params, cfg.model, cfg.train.scan_layers).items()}
    tokenizer = Dataset.from_config(cfg, progress=False).tokenizer
    out = write_hf_folder(args.out, weights, cfg.model, tokenizer, dtype=args.dtype,
                          max_shard_bytes=max_shard,
                          extra={"lmspec_export.json": {"framework": "jaxlm",
                                                        "run_dir": str(Path(args.run_dir)),
                                                        "step": step,
                                                        "tokenizer": tokenizer.spec}})
    print(f"wrote {out} (step {step}, {len(weights)} tensors, {args.dtype}, tokenizer "
          f"{tokenizer.spec})")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    return call_subcommand(build_parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    raise SystemExit(run(_main, argv))


if __name__ == "__main__":
    main()
