"""Pieces every command line shares: ``CONFIG [k=v ...]`` arguments and clean errors.

User mistakes (:class:`~lmspec.config.ConfigError`, other ``ValueError``/``TypeError``
raised for bad input, missing files) end the command with ``error: <message>`` on
stderr and exit status 2, with no traceback. Set ``LMSPEC_TRACEBACK=1`` to see one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lmspec.config import ConfigError, ExperimentConfig, load_config

EXIT_USAGE = 2


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides, e.g. train.steps=20 mesh.fsdp=2",
    )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


class UserError(Exception):
    """Bad input detected by a command; printed without a traceback."""


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and turn user errors into ``error: ...`` and exit status 2."""
    try:
        rc = main(argv)
        return int(rc or 0)
    except (ConfigError, UserError, FileNotFoundError, ValueError, TypeError) as e:
        if os.environ.get("LMSPEC_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
