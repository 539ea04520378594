"""``parity data CONFIG [k=v ...]``: build or reuse the token cache and describe it."""

from __future__ import annotations

import argparse
import time

from lmspec.cli import add_config_args, config_from_args
from lmspec.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity data`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "data",
        help="build (or reuse) the token cache of a config and print its summary",
        description="Tokenize the config's data source once into the cache (or find the "
        "earlier build) and print token count, vocabulary, windows per epoch and the "
        "fingerprint of step 0's global batch.",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=1, metavar="N",
                   help="print the global-batch fingerprints of steps 0..N-1 (default 1)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from lmspec.data import Dataset, fingerprint

    cfg = config_from_args(args)
    if args.steps < 1:
        raise UserError(f"--steps={args.steps} must be >= 1")
    t0 = time.perf_counter()
    ds = Dataset.from_config(cfg)
    elapsed = time.perf_counter() - t0
    m = ds.manifest
    print(f"source:            {cfg.data.source} ({m.get('source_kind', 'tokens')}, "
          f"{m.get('num_documents', '?')} documents, {m.get('skipped_files', 0)} files skipped)")
    print(f"tokenizer:         {ds.tokenizer.spec} (hash {ds.tokenizer.hash})")
    print(f"vocabulary:        {ds.vocab_size} (model.vocab_size={cfg.model.vocab_size})")
    print(f"tokens:            {ds.num_tokens} ({m['dtype']})")
    print(f"windows per epoch: train {ds.num_train_windows}, val {ds.num_val_windows} "
          f"(seq_len+1={cfg.data.seq_len + 1})")
    print(f"steps per epoch:   {ds.num_train_windows / cfg.train.global_batch_size:.1f} "
          f"(global_batch_size={cfg.train.global_batch_size})")
    print(f"cache:             {ds.path}")
    print(f"load time:         {elapsed:.2f} s")
    for step in range(args.steps):
        print(f"step {step} fingerprint: {fingerprint(ds.global_batch(step))}")
    return 0
