"""The ``triomail`` command line: a thin argparse dispatcher.

Each subcommand has a module exposing ``register(subparsers)``, which adds the
subcommand's parser and sets ``func`` to a callable taking the parsed arguments and
returning the exit status. Keep heavy imports inside ``func`` so ``triomail --help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ._bulk import checkdns
from ._bulk import command as bulk_command
from ._bulk import init as bulk_init
from ._bulk import status as bulk_status
from ._sink import cli as sink_cli
from ._web import cli as web_cli

__all__ = ["build_parser", "main"]

# Subcommands, in the order `triomail --help` lists them: `triomail sink` (the capture
# server), `triomail send` (the bulk mailer), `triomail view` (the web view of a
# folder), `triomail init` (a sample campaign to start from), `triomail status` (a
# journal's campaign, per state and worker) and `triomail check-dns` (a sending domain's
# SPF, DMARC and DKIM records). Each register takes what `add_subparsers()` returns; the
# tuple's type is inferred, so that no private name of argparse is spelt here.
REGISTRARS = (
    sink_cli.register,
    bulk_command.register,
    web_cli.register,
    bulk_init.register,
    bulk_status.register,
    checkdns.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="triomail", description="A Trio-native SMTP client, connection pool and bulk mailer."
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triomail")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata costs start-up)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show program's version number and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        sys.stdout.write(f"{parser.prog} {_version()}\n")
        parser.exit()
