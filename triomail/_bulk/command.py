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
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .settings import CHECKS, RENDER_MODES, SendSettings, journal_target

__all__ = ["OPTIONS", "POSITIONALS", "Option", "Subcommands", "defaults", "register"]


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


@dataclass(frozen=True, slots=True)
class Option:
    """One option of ``triomail send``: its group, flags and argparse keywords.

    Written once here; :func:`register` adds it to the parser and
    :mod:`.reference` writes docs/cli-reference.md from it. The destination is a
    field of :class:`.settings.SendSettings` (its default is the option's default).
    """

    group: str
    flags: tuple[str, ...]
    kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return str(self.kwargs.get("dest", self.flags[0].lstrip("-").replace("-", "_")))


def _flag(help_text: str) -> dict[str, Any]:
    """A yes/no option: given or not (``None``, so that a config file can decide)."""
    return {"action": "store_true", "default": None, "help": help_text}


WHERE, SAFETY, SPEED, RECORDS = "where to send", "safety", "throughput", "records"
SHARED = "shared journal (PostgreSQL)"
OPTIONS: tuple[Option, ...] = (
    Option(WHERE, ("--server",), {"metavar": "URL",
        "help": "smtp://, smtps:// or smtp+plain:// URL"}),
    Option(WHERE, ("--config",), {"type": Path, "metavar": "FILE.toml", "help": "settings file"}),
    Option(WHERE, ("--sink",), {"type": Path, "metavar": "DIR",
        "help": "send to the embedded capture server (STARTTLS) and store .eml files in DIR"}),
    Option(WHERE, ("--ca-file",), {"type": Path, "metavar": "PEM",
        "help": "trust this CA for the server's certificate"}),
    Option(WHERE, ("--attachments-dir",), {"type": Path, "metavar": "DIR",
        "help": "attachment paths from row data must lead under DIR (the template's directory)"}),
    Option(WHERE, ("--encoding",), {"metavar": "NAME",
        "help": "the recipients file's encoding, e.g. cp1252 (UTF-8, checked before sending)"}),
    Option(SAFETY, ("--dry-run",), _flag("render and check every message, print the first (and "
        "write all to --sink DIR if given), connect to nothing")),
    Option(SAFETY, ("--no-dry-run",), {"dest": "dry_run", "action": "store_false",
        "default": None, "help": "send for real (the default; accepted as mailmerge spells it)"}),
    Option(SAFETY, ("--limit",), {"metavar": "N",
        "help": "send at most N messages"}),
    Option(SAFETY, ("--no-limit",), {"dest": "limit", "action": "store_const", "const": 0,
        "help": "send every message (the default; accepted as mailmerge spells it)"}),
    Option(SAFETY, ("--yes", "-y"), _flag("do not ask for confirmation")),
    Option(SAFETY, ("--show",), {"metavar": "N",
        "help": "with --dry-run, print N messages"}),
    Option(SPEED, ("--connections",), {"metavar": "N",
        "help": "concurrent connections"}),
    Option(SPEED, ("--rate",), {"metavar": "PER_SECOND",
        "help": "messages per second at most"}),
    Option(SPEED, ("--max-per-connection",), {"metavar": "N",
        "help": "messages per connection before reconnecting (unlimited)"}),
    Option(SPEED, ("--retries",), {"metavar": "N",
        "help": "retries of a transient failure"}),
    Option(SPEED, ("--render",), {"choices": RENDER_MODES,
        "help": "where messages are rendered: auto (in a second process when there is more "
        "than one CPU, with the first rows rendered here while it starts), process (every row "
        "in the second process), inline (in this one; always for --dry-run)"}),
    Option(SPEED, ("--retry-backoff",), {"metavar": "SECONDS",
        "help": "first retry delay, doubled each time"}),
    Option(SPEED, ("--retry-max-backoff",), {"metavar": "SECONDS",
        "help": "longest retry delay, also for an unreachable server"}),
    Option(RECORDS, ("--report",), {"type": Path, "metavar": "FILE.jsonl",
        "help": "one JSON line per message and recipient"}),
    Option(RECORDS, ("--journal",), {"type": journal_target, "metavar": "PATH_OR_URL",
        "help": "SQLite journal file, or postgresql://USER@HOST:PORT/DB?campaign=NAME to "
        "share the campaign with other workers (docs/scale-out.md)"}),
    Option(RECORDS, ("--resume",), _flag("continue the batch recorded in the journal")),
    Option(RECORDS, ("--at-most-once",), _flag("on --resume, skip messages whose outcome is "
        "unknown instead of resending them")),
    Option(RECORDS, ("--progress-interval",), {"metavar": "SECONDS",
        "help": "seconds between progress lines when stderr is not a terminal"}),
    # -- the shared journal (issue 15) --
    Option(SHARED, ("--lease",), {"metavar": "SECONDS",
        "help": "a worker's hold on the rows it sends, renewed while they are on the wire; "
        "rows of a worker silent this long are taken over by the others"}),
)  # fmt: skip
#: The positional arguments, in order.
POSITIONALS: tuple[Option, ...] = (
    Option("", ("recipients",), {"type": Path, "metavar": "RECIPIENTS",
        "help": "CSV or JSON Lines file"}),
    Option("", ("template",), {"type": Path, "metavar": "TEMPLATE", "help": "message template"}),
)  # fmt: skip
DESCRIPTION = (
    "Render TEMPLATE (a mailmerge-compatible Jinja2 message) for every row of\n"
    "RECIPIENTS (CSV or JSON Lines) and send the messages through a connection pool,\n"
    "recording each outcome in a journal so that an interrupted batch can be resumed."
)


def register(subparsers: Subcommands) -> None:
    """Add the ``send`` subcommand."""
    p = subparsers.add_parser(
        "send",
        help="send a templated message to every row of a recipients file",
        description=DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option in POSITIONALS:
        p.add_argument(*option.flags, **option.kwargs)
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = p.add_argument_group(option.group)
        kwargs = option.kwargs
        check = CHECKS.get(option.dest)
        if check is not None and kwargs.get("action") is None:
            kwargs = {**kwargs, "type": check}  # the same checks as for a --config file
        default = defaults().get(option.dest)
        if "help" in kwargs and default not in (None, False, 0) and "(" not in kwargs["help"]:
            kwargs = {**kwargs, "help": f"{kwargs['help']} ({default})"}
        group.add_argument(*option.flags, **kwargs)
    p.set_defaults(func=_run)


def defaults() -> dict[str, Any]:
    """Each setting's default, from :class:`.settings.SendSettings`."""
    return {
        f.name: f.default
        for f in dataclasses.fields(SendSettings)
        if f.default is not dataclasses.MISSING
    }


def _run(args: argparse.Namespace) -> int:
    from .main import run  # the heavy part, once `send` was chosen (see the header)

    return run(args)
