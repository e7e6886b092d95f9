"""``triomail send``'s command line: the options, their help, and the way in.

:func:`register` adds the ``send`` subcommand to ``triomail``'s parser; the options'
destinations are the fields of :class:`.settings.SendSettings` (``None`` when not
given, so that a config file can fill them). This module is imported for every
``triomail`` command, ``--help`` included, so it imports nothing heavy: the run itself
(:mod:`.main`, then trio, Jinja2, SQLite) is imported by :func:`_run` once ``send`` was
chosen, the one function-local import of the kind in this subpackage's entry path.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Protocol

from .settings import RENDER_MODES

__all__ = ["Subcommands", "register"]


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as :func:`register` uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


_EPILOG = """\
server:
  --server smtp://user@host:587    STARTTLS (required), then AUTH as user
  --server smtps://user@host:465   implicit TLS
  --server smtp+plain://host:25    plaintext, by explicit choice
  The password comes from the TRIOMAIL_PASSWORD environment variable, or a prompt;
  never from the command line. --config FILE.toml takes the same settings as the
  long options (server = "...", connections = 20, ...), command-line options win.
  --sink DIR starts the embedded capture server instead and stores what it receives
  as .eml files in DIR.

journal and --resume:
  Every message's state is kept in an SQLite journal (default: RECIPIENTS.journal.sqlite3
  next to the recipients file; in memory with --sink or --dry-run unless --journal is
  given). A second run on the same journal needs --resume: rows already accepted (or
  permanently refused) are not sent again, rows never attempted or transiently refused
  are, and rows whose outcome is unknown (interrupted while in flight) are resent with
  the same Message-ID, or skipped with --at-most-once.

exit status:
  0    every message was accepted for every recipient
  1    some messages failed, were deferred, had an unknown outcome, or rows were bad
  2    could not run: bad arguments, template or file errors, unreachable server,
       authentication failure (one line on stderr, no traceback); or the render
       process failed mid-batch (what was handed out is recorded; use --resume)
  130  interrupted (Ctrl-C or SIGTERM); the journal is consistent, use --resume
"""


def register(subparsers: Subcommands) -> None:
    """Add the ``send`` subcommand."""
    p = subparsers.add_parser(
        "send",
        help="send a templated message to every row of a recipients file",
        description="Render TEMPLATE (a mailmerge-compatible Jinja2 message) for every row of\n"
        "RECIPIENTS (CSV or JSON Lines) and send the messages through a connection pool,\n"
        "recording each outcome in a journal so that an interrupted batch can be resumed.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipients", type=Path, metavar="RECIPIENTS", help="CSV or JSON Lines file")
    p.add_argument("template", type=Path, metavar="TEMPLATE", help="message template")
    where = p.add_argument_group("where to send")
    where.add_argument("--server", metavar="URL", help="smtp://, smtps:// or smtp+plain:// URL")
    where.add_argument("--config", type=Path, metavar="FILE.toml", help="settings file")
    where.add_argument(
        "--sink",
        type=Path,
        metavar="DIR",
        help="send to the embedded capture server (STARTTLS) and store .eml files in DIR",
    )
    where.add_argument(
        "--ca-file", type=Path, metavar="PEM", help="trust this CA for the server's certificate"
    )
    where.add_argument(
        "--attachments-dir",
        type=Path,
        metavar="DIR",
        help="attachment paths from row data must lead under DIR (the template's directory)",
    )
    where.add_argument(
        "--encoding",
        metavar="NAME",
        help="the recipients file's encoding, e.g. cp1252 (UTF-8, checked before sending)",
    )
    safety = p.add_argument_group("safety")
    safety.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="render and check every message, print the first (and write all to --sink DIR "
        "if given), connect to nothing",
    )
    safety.add_argument("--limit", type=_positive_int, metavar="N", help="send at most N messages")
    safety.add_argument(
        "--yes", "-y", action="store_true", default=None, help="do not ask for confirmation"
    )
    safety.add_argument(
        "--show", type=_count, metavar="N", help="with --dry-run, print N messages (1)"
    )
    speed = p.add_argument_group("throughput")
    speed.add_argument(
        "--connections", type=_positive_int, metavar="N", help="concurrent connections (10)"
    )
    speed.add_argument(
        "--rate", type=_positive_float, metavar="PER_SECOND", help="messages per second at most"
    )
    speed.add_argument(
        "--max-per-connection",
        type=_positive_int,
        metavar="N",
        help="messages per connection before reconnecting (unlimited)",
    )
    speed.add_argument(
        "--retries", type=_count, metavar="N", help="retries of a transient failure (4)"
    )
    speed.add_argument(
        "--render",
        choices=RENDER_MODES,
        help="where messages are rendered: auto (the default: in a second process when there "
        "is more than one CPU, with the first rows rendered here while it starts), process "
        "(every row in the second process), inline (in this one; always for --dry-run)",
    )
    speed.add_argument(
        "--retry-backoff",
        type=_positive_float,
        metavar="SECONDS",
        help="first retry delay, doubled each time (1.0)",
    )
    speed.add_argument(
        "--retry-max-backoff",
        type=_positive_float,
        metavar="SECONDS",
        help="longest retry delay, also for an unreachable server (300)",
    )
    record = p.add_argument_group("records")
    record.add_argument(
        "--report", type=Path, metavar="FILE.jsonl", help="one JSON line per message and recipient"
    )
    record.add_argument("--journal", type=Path, metavar="PATH", help="SQLite journal file")
    record.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the batch recorded in the journal",
    )
    record.add_argument(
        "--at-most-once",
        action="store_true",
        default=None,
        help="on --resume, skip messages whose outcome is unknown instead of resending them",
    )
    record.add_argument(
        "--progress-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (5)",
    )
    p.set_defaults(func=_run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _run(args: argparse.Namespace) -> int:
    from .main import run  # the heavy part, once `send` was chosen (see the header)

    return run(args)
