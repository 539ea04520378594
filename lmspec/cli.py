"""Pieces every command line shares: ``CONFIG [k=v ...]`` arguments and the error policy.

The error policy of every command (``jaxlm``, ``torchlm``, ``parity``), in :func:`run`:

- a user mistake, :class:`~lmspec.errors.UserError` (``ConfigError`` is one), ends the
  command with one line ``error: <message>`` on stderr and exit status 2, no traceback;
  so does an operating-system error about a path (not found, exists, permission denied,
  is / is not a directory), which is the user's path or the machine's state;
- anything else is a bug in this project: its traceback, then one line saying so and
  how to report it, exit status 1. No blanket ``ValueError``/``TypeError`` catch: code
  that rejects input raises ``UserError``, so what is left is not the user's fault.

``LMSPEC_TRACEBACK=1`` prints the traceback of a user error too (exit status still 2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from lmspec.config import ExperimentConfig, load_config
from lmspec.errors import UserError

EXIT_USAGE = 2
EXIT_BUG = 1
# OS errors about a path: the user's path or the machine's state, not a bug
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)
BUG_LINE = ("error: {name} above is a bug in jaxlm-parity, not a mistake in your input; "
            "please report it with the command line and this traceback")


OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [key=value ...]`` on ``parser``, with the overrides accepted anywhere on
    the command line (``CONFIG --out DIR k=v`` as well as ``CONFIG k=v --out DIR``).

    argparse gives the positional ``overrides`` only the words that come before the first
    option; the words it does not place elsewhere are picked up here, in command-line
    order, when they look like ``dotted.key=value``. Anything else stays unrecognised
    (argparse's usual error). Works for a parser used directly or as a subcommand."""
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny.yaml")
    add_overrides_arg(parser)


def add_overrides_arg(parser: argparse.ArgumentParser,
                      help: str = "dotted overrides, e.g. train.steps=20 mesh.fsdp=2 "
                      "(anywhere on the line)") -> None:
    """The ``[key=value ...]`` positional of :func:`add_config_args`, accepted anywhere on
    the command line, for a parser whose other positionals come first."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=help)
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


def zero_stages_arg(text: str) -> tuple[int, ...]:
    """argparse type of ``--zero-stages``: comma-separated ZeRO stages, e.g. ``1,2,3``
    (the caller checks their range, naming the option)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated ZeRO stages, e.g. 1,2,3") from None


def names_arg(text: str) -> tuple[str, ...]:
    """argparse type of a comma-separated list of names (``--precisions fp32,bf16``)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def call_subcommand(build_parser: Callable[[], argparse.ArgumentParser],
                    argv: Sequence[str] | None) -> int:
    """Parse ``argv`` with ``build_parser()`` and call the chosen subcommand's ``func``
    (each subcommand's parser sets it with ``set_defaults(func=...)``)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None, *, raise_bugs: bool = False) -> int:
    """Run ``main`` under the error policy of the module docstring; returns the exit
    status (``main``'s, 2 for a user error, 1 for a bug, 130 for Ctrl-C).

    ``raise_bugs``: let a bug propagate instead (a torchrun worker, whose ``@record``
    wrapper writes the exception for the launcher to report as the root cause)."""
    try:
        rc = main(argv)
        return int(rc or 0)
    except UserError as e:
        return _user_error(str(e))
    except PATH_ERRORS as e:
        return _user_error(path_error_message(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the policy: anything else is our bug
        if raise_bugs:
            raise
        traceback.print_exc()
        print(BUG_LINE.format(name=type(e).__name__), file=sys.stderr, flush=True)
        return EXIT_BUG


def path_error_message(e: OSError) -> str:
    """``<path>: <what the OS said>`` for an OS error about a path."""
    where = e.filename if e.filename is not None else ""
    what = e.strerror or str(e)
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {what}" if where else what


def _user_error(message: str) -> int:
    if os.environ.get("LMSPEC_TRACEBACK"):
        traceback.print_exc()
    # one line: a message that spans lines is joined, so a script sees one error line
    one = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one}", file=sys.stderr, flush=True)
    return EXIT_USAGE
