"""``parity`` command line: ``parity run``, ``bench``, ``data``, ``sweep``, ``translate``,
``convert``, ``continue``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which sets
``func`` on its parser); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from lmspec.cli import call_subcommand, run

SUBCOMMANDS = ("parity.data_cmd", "parity.run_cmd", "parity.bench_cmd", "parity.sweep_cmd",
               "parity.translate_cmd", "parity.convert_cmd", "parity.continue_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parity",
        description="Run the JAX trainer and the DeepSpeed reference on one config and compare.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # subcommand not written yet
        module.add_parser(sub)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    return call_subcommand(build_parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    raise SystemExit(run(_main, argv))


if __name__ == "__main__":
    main()
