"""``torchlm`` command line: ``train`` (DeepSpeed ZeRO workers), ``ds-config``, ``export``.

    torchlm train CONFIG [k=v ...] [--init-weights FILE] [--dump-grads STEPS]
                  [--dump-params STEPS] [--no-resume]
    torchlm ds-config CONFIG [k=v ...]      (zero.profile=bench: the speed settings)
    torchlm export OUT_DIR --out DIR [--tag TAG] [--dtype fp32|bf16|fp16]
    torchlm export OUT_DIR --output FILE [--tag TAG]   (the weights alone)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lmspec.cli import add_config_args, config_from_args, run
from lmspec.config import ExperimentConfig
from lmspec.errors import UserError


def _parser() -> argparse.ArgumentParser:
    from lmspec.runs import add_train_args

    parser = argparse.ArgumentParser(
        prog="torchlm", description="PyTorch Llama trained under DeepSpeed ZeRO: train "
        "(DeepSpeed workers through torchrun), ds-config (the DeepSpeed JSON of a config, "
        "for your own launcher), export (a Hugging Face folder).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train with DeepSpeed ZeRO on zero.world_size local processes",
        description="Launch zero.world_size DeepSpeed workers through torchrun (gloo on "
        "CPU, NCCL on GPU); resumes from the latest checkpoint in train.out_dir.",
    )
    add_train_args(train)
    ds = sub.add_parser("ds-config", help="print the DeepSpeed config JSON of a config")
    add_config_args(ds)
    ex = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face model folder (or its weights)",
        description="--out DIR: a folder that transformers.LlamaForCausalLM.from_pretrained "
        "and AutoTokenizer.from_pretrained load offline (config.json, model.safetensors, "
        "sharded above --max-shard-size, generation_config.json, the run's tokenizer). "
        "--output FILE: the fp32 master weights alone, as one safetensors file.")
    ex.add_argument("out_dir", help="a torchlm train out_dir (holds config.yaml, checkpoints/)")
    ex.add_argument("--tag", help="checkpoint tag, e.g. step00000100 (default: latest)")
    ex.add_argument("--out", metavar="DIR",
                    help="Hugging Face folder to write (must not exist, or be empty)")
    ex.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="with --out: tensor type written (default fp32, the master weights)")
    ex.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="with --out: largest safetensors file before sharding (default 5GB)")
    ex.add_argument("--output", metavar="FILE",
                    help="write only the weights to FILE (default without --out: "
                    "OUT_DIR/export_<tag>.safetensors)")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "export":
        return _export(args)
    from lmspec.runs import check_run_owner, for_framework

    cfg = for_framework(config_from_args(args), "torch")
    if args.command == "ds-config":
        from torchlm.ds_config import build_ds_config, optimizer_spec

        conf = build_ds_config(cfg)
        print(json.dumps(conf, indent=2))
        print(f"# zero.profile={cfg.zero.profile}; the optimizer, lr_scheduler and model "
              "(attention path) are passed as objects to deepspeed.initialize:",
              json.dumps(optimizer_spec(cfg)), file=sys.stderr)
        return 0
    from lmspec.io import ensure_writable_dir
    from lmspec.runs import train_args

    targs = train_args(args, cfg)  # dump steps checked against train.steps before launch
    if args.init_weights:
        check_weights_file(cfg, args.init_weights)
    ensure_writable_dir(cfg.train.out_dir, "train.out_dir")
    check_run_owner(cfg.train.out_dir, "torch")
    from lmspec.wandb_log import require_wandb

    require_wandb(cfg)  # rank 0 logs to W&B: a missing package stops here, not in a worker
    if not args.no_resume:
        _check_resumable(cfg)
    # build the token cache once, with a progress bar, before the workers start
    from lmspec.data import Dataset

    ds = Dataset.from_config(cfg)
    if ds.num_val_windows == 0 and cfg.train.eval_every:
        print("note: no validation windows (data.val_fraction); val_loss is not logged",
              file=sys.stderr)
    from torchlm.launch import AgentDied, WorkerError, launch

    worker_args = [args.config, *args.overrides]
    if args.init_weights:
        worker_args += ["--init-weights", args.init_weights]
    for flag, steps in (("--dump-grads", targs.dump_grads), ("--dump-params", targs.dump_params)):
        if steps:
            worker_args += [flag, ",".join(map(str, steps))]
    if not targs.resume:
        worker_args.append("--no-resume")
    if not targs.progress:
        worker_args.append("--no-progress")
    from lmspec.nonfinite import EXIT_NON_FINITE, NonFiniteError

    try:
        return launch(cfg, worker_args)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except AgentDied as e:
        from lmspec.watchdog import EXIT_PEER_LOST

        print(f"error: {e}", file=sys.stderr)
        return EXIT_PEER_LOST


def _check_resumable(cfg: ExperimentConfig) -> None:
    """Before any worker starts: refuse a ``latest`` naming no checkpoint, a checkpoint
    whose files do not match their checksums, and, naming the keys, one written for
    another model shape or ZeRO layout (DeepSpeed could not load it)."""
    import os

    import yaml

    from lmspec.config import check_resumable
    from torchlm.runfolder import VERIFIED_ENV, latest_checkpoint, verify_checkpoint

    out = Path(cfg.train.out_dir)
    tag = latest_checkpoint(out)
    if tag is None:
        return
    verify_checkpoint(out, tag, say=lambda m: print(m, file=sys.stderr))
    os.environ[VERIFIED_ENV] = str(out / "checkpoints" / tag)  # the workers' environment
    if not (out / "config.yaml").is_file():
        return
    saved = yaml.safe_load((out / "config.yaml").read_text())
    check_resumable(saved, cfg, ("model", "zero.stage", "zero.world_size"), out)


def _export(args: argparse.Namespace) -> int:
    from lmspec.io import check_output_file
    from lmspec.weights import save_safetensors
    from torchlm.export import checkpoint_weights
    from torchlm.runfolder import latest_checkpoint

    tag = args.tag or latest_checkpoint(args.out_dir)
    if args.out and args.output:
        raise UserError("torchlm export: give --out DIR (a Hugging Face folder) or --output "
                        "FILE (the weights alone), not both")
    if args.out:
        from lmspec.config import load_config
        from lmspec.data import Dataset
        from lmspec.hf import parse_size, write_hf_folder

        max_shard = parse_size(args.max_shard_size)
        cfg = load_config(f"{args.out_dir}/config.yaml")
        weights = checkpoint_weights(args.out_dir, tag)
        tokenizer = Dataset.from_config(cfg, progress=False).tokenizer
        out = write_hf_folder(args.out, weights, cfg.model, tokenizer, dtype=args.dtype,
                              max_shard_bytes=max_shard,
                              extra={"lmspec_export.json": {"framework": "torchlm",
                                                            "run_dir": str(args.out_dir),
                                                            "tag": tag,
                                                            "tokenizer": tokenizer.spec}})
        print(f"wrote {out} ({tag}, {len(weights)} tensors, {args.dtype}, tokenizer "
              f"{tokenizer.spec})")
        return 0
    path = args.output or f"{args.out_dir}/export_{tag}.safetensors"
    check_output_file(path, "--output")
    weights = checkpoint_weights(args.out_dir, tag)
    save_safetensors(weights, path)
    print(f"wrote {path} ({len(weights)} tensors, fp32)")
    return 0


def check_weights_file(cfg: ExperimentConfig, path: str) -> None:
    """Names and shapes of a safetensors file (header only) against the model config; a
    UserError naming the file when it is missing, unreadable or of another model."""
    from types import SimpleNamespace

    from lmspec.weights import check_names, safetensors_shapes

    if Path(path).is_dir():  # a Hugging Face folder: config.json, names and shapes
        from lmspec.hf import load_init_weights

        load_init_weights(path, cfg.model)
        return
    shapes = {k: SimpleNamespace(shape=v) for k, v in safetensors_shapes(path).items()}
    check_names(cfg.model, shapes, f"--init-weights {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``torchlm``."""
    return run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
