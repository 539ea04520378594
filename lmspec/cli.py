"""Pieces every command line shares: ``CONFIG [k=v ...]`` arguments and clean errors.

User mistakes (:class:`~lmspec.config.ConfigError`, other ``ValueError``/``TypeError``
raised for bad input, missing files) end the command with ``error: <message>`` on
stderr and exit status 2, with no traceback. Set ``LMSPEC_TRACEBACK=1`` to see one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence

from lmspec.config import ConfigError, ExperimentConfig, load_config
from lmspec.errors import UserError

EXIT_USAGE = 2


OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key=value ...]`` on ``parser``, with the overrides accepted anywhere on
    the command line (``CONFIG --out DIR k=v`` as well as ``CONFIG k=v --out DIR``).

    argparse gives the positional ``overrides`` only the words that come before the first
    option; the words it does not place elsewhere are picked up here, in command-line
    order, when they look like ``dotted.key=value``. Anything else stays unrecognised
    (argparse's usual error). Works for a parser used directly or as a subcommand."""
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides, e.g. train.steps=20 mesh.fsdp=2 (anywhere on the line)",
    )
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's
        ns, extras = parse_known(args, namespace)
        rest = []
        for word in extras:
            if OVERRIDE_RE.match(word):
                ns.overrides = [*(getattr(ns, "overrides", None) or []), word]
            else:
                rest.append(word)
        return ns, rest

    # an instance attribute: argparse calls it for a subcommand's parser too
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


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
