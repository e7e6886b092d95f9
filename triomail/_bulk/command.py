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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .settings import CHECKS, CHOICES, SendSettings, journal_target

__all__ = ["OPTIONS", "POSITIONALS", "Option", "Subcommands", "defaults", "register"]


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as :func:`register` uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


_EPILOG = """\
server:
  --server smtp://user@host:587    STARTTLS (required), then AUTH as user
  --server smtps://user@host:465   implicit TLS
  --server smtp+plain://host:25    plaintext, by explicit choice
  The password comes from --password-command CMD, the TRIOMAIL_PASSWORD environment
  variable, or a prompt; never from the command line. --sink DIR starts the embedded
  capture server instead and stores what it receives as .eml files in DIR.

settings:
  Each long option can also be set in a TOML config file (server = "...",
  connections = 20, ...: --config FILE, else ./triomail.toml, else
  $XDG_CONFIG_HOME/triomail/config.toml) or in the environment (TRIOMAIL_CONNECTIONS=20,
  TRIOMAIL_DRY_RUN=yes); the command line wins over the environment, which wins over
  the file. Without any server, mailmerge's mailmerge_server.conf in the current
  directory is used. From a terminal every real send asks first (--yes skips it);
  without a terminal, more than a handful of messages need --yes.

journal and --resume:
  Every message's state is kept in an SQLite journal (default: RECIPIENTS.journal.sqlite3
  next to the recipients file; in memory with --sink or --dry-run unless --journal is
  given). A second run on the same journal needs --resume: rows already accepted (or
  permanently refused by the server: --retry-refused sends those again) are not sent
  again; rows never attempted, transiently refused, or refused locally (over the
  server's SIZE, a UTF-8 address without SMTPUTF8: checked again) are; rows whose
  outcome is unknown (interrupted while in flight) are resent with the same
  Message-ID, or skipped with --at-most-once.

exit status:
  0    every message was accepted for every recipient
  1    some messages failed, were deferred, had an unknown outcome, or rows were bad
  2    could not run: bad arguments, template or file errors, unreachable server,
       authentication failure (one line on stderr, no traceback); or the render
       process failed mid-batch (what was handed out is recorded; use --resume)
  3    stopped by the policy brake: too many recipients refused for policy or
       reputation (5.7.x, 4.7.x; --max-policy-rejections); what was on the wire was
       finished, the rest is not sent: fix the cause, then use --resume
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
DELIVER = "deliverability"
SHARED = "shared journal (PostgreSQL)"
OPTIONS: tuple[Option, ...] = (
    Option(WHERE, ("--server",), {"metavar": "URL", "action": "append",
        "help": "smtp://, smtps:// or smtp+plain:// URL; repeat it to fail over between "
        "servers (?weight=N shares new connections, ?max_connections=N bounds them)"}),
    Option(WHERE, ("--config",), {"type": Path, "metavar": "FILE.toml", "help": "settings file"}),
    Option(WHERE, ("--sink",), {"type": Path, "metavar": "DIR",
        "help": "send to the embedded capture server (STARTTLS) and store .eml files in DIR"}),
    Option(WHERE, ("--ca-file",), {"type": Path, "metavar": "PEM",
        "help": "trust this CA for the server's certificate"}),
    Option(WHERE, ("--password-command",), {"metavar": "CMD",
        "help": "run CMD (no shell) and use the first line it prints as the password"}),
    Option(WHERE, ("--oauth-token-command",), {"metavar": "CMD",
        "help": "run CMD (no shell) and use the first line it prints as an OAuth 2.0 token "
        "(AUTH XOAUTH2); run again for connections opened after it is 5 minutes old"}),
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
    Option(SPEED, ("--render",), {"choices": CHOICES["render"],
        "help": "where messages are rendered: auto (in a second process when there is more "
        "than one CPU, with the first rows rendered here while it starts), process (every row "
        "in the second process), inline (in this one; always for --dry-run)"}),
    Option(SPEED, ("--retry-backoff",), {"metavar": "SECONDS",
        "help": "first retry delay, doubled each time"}),
    Option(SPEED, ("--retry-max-backoff",), {"metavar": "SECONDS",
        "help": "longest retry delay, also for an unreachable server"}),
    Option(SPEED, ("--pipelining",), {"choices": CHOICES["pipelining"], "help": "cross (the "
        "next envelope behind an end of data; within once a server refuses that), within (wait "
        "for each end-of-data reply) or off (one command at a time)"}),
    Option(RECORDS, ("--report",), {"type": Path, "metavar": "FILE.jsonl",
        "help": "one JSON line per message and recipient"}),
    Option(RECORDS, ("--journal",), {"type": journal_target, "metavar": "PATH_OR_URL",
        "help": "SQLite journal file, or postgresql://USER@HOST:PORT/DB?campaign=NAME to "
        "share the campaign with other workers (docs/scale-out.md)"}),
    Option(RECORDS, ("--resume",), _flag("continue the batch recorded in the journal")),
    Option(RECORDS, ("--at-most-once",), _flag("on --resume, skip messages whose outcome is "
        "unknown instead of resending them")),
    Option(RECORDS, ("--retry-refused",), _flag("on --resume, send again the messages a server "
        "refused for good (those refused locally, e.g. over SIZE, are checked again anyway)")),
    Option(RECORDS, ("--verbose", "-v"), _flag("print the SMTP conversation on stderr "
        "(AUTH redacted)")),
    Option(RECORDS, ("--progress-interval",), {"metavar": "SECONDS",
        "help": "seconds between progress lines when stderr is not a terminal"}),
    Option(DELIVER, ("--dkim-key",), {"action": "append", "type": Path, "metavar": "PEM",
        "help": "sign every message with this RSA or Ed25519 private key (repeatable: one "
        "signature per key); an encrypted key's passphrase comes from "
        "TRIOMAIL_DKIM_PASSPHRASE or a prompt"}),
    Option(DELIVER, ("--dkim-selector",), {"action": "append", "metavar": "SELECTOR",
        "help": "the selector of each --dkim-key, in the same order"}),
    Option(DELIVER, ("--dkim-domain",), {"metavar": "DOMAIN",
        "help": "the signing domain d= (default: the From address's domain)"}),
    Option(DELIVER, ("--bounce-address",), {"metavar": "ADDR",
        "help": "envelope sender (MAIL FROM) for bounces; a template expression is allowed, "
        "e.g. bounces+{{id}}@example.com (VERP). A template's Return-Path: line does the same"}),
    Option(DELIVER, ("--unsubscribe",), {"metavar": "URL",
        "help": "add List-Unsubscribe <URL> and List-Unsubscribe-Post (RFC 8058 one-click); "
        "an https URL, template expressions allowed"}),
    Option(DELIVER, ("--unsubscribe-mailto",), {"metavar": "ADDR",
        "help": "add a mailto: URI to List-Unsubscribe; template expressions allowed"}),
    Option(DELIVER, ("--strict",), _flag("treat lint warnings (no List-Unsubscribe, free-mail "
        "From, unaligned DKIM, no text part) as errors: exit 2 before sending")),
    Option(DELIVER, ("--exclude",), {"type": Path, "metavar": "FILE",
        "help": "never mail these addresses (one a line, or a CSV file with an email column; "
        "the domain compared case-insensitively): such rows are recorded as suppressed"}),
    Option(DELIVER, ("--suppress-to",), {"type": Path, "metavar": "FILE",
        "help": "append each recipient refused permanently for its address (5.1.x, 5.2.1), "
        "for the next campaign's --exclude"}),
    Option(DELIVER, ("--max-policy-rejections",), {"metavar": "PERCENT",
        "help": "stop sending (exit 3) once this share of the last 200 recipients was refused "
        "for policy or reputation (5.7.x, 4.7.x but rate limiting)"}),
    Option(DELIVER, ("--check-dns",), _flag("first check the From domain's SPF and DMARC "
        "records and each --dkim-key's published key (as triomail check-dns); problems are a "
        "lint warning")),
    Option(DELIVER, ("--dns-resolver",), {"metavar": "ADDRESS[:PORT]",
        "help": "the name server --check-dns asks (the system's)"}),
    # -- the shared journal (issue 15) --
    Option(SHARED, ("--campaign-rate",), {"metavar": "PER_SECOND",
        "help": "messages per second at most for the whole campaign, shared by all its "
        "workers through the database (give every worker the same); --rate still "
        "holds for each"}),
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
    p.set_defaults(func=_run, resume_row=None)
    p.parse_known_args = _mailmerge_resume(p.parse_known_args)  # type: ignore[method-assign]


def _mailmerge_resume(parse: Callable[..., Any]) -> Callable[..., Any]:
    """Read mailmerge's ``--resume N`` (start at message N) as ``--resume``, keeping N
    as ``resume_row``: a flag cannot take an optional number without swallowing the
    recipients file that may follow it, so the number is taken out first."""

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        items = list(sys.argv[1:] if args is None else args)
        row = None
        for i, item in enumerate(items[:-1]):
            if item == "--resume" and items[i + 1].isdigit():
                row = int(items.pop(i + 1))
                break
        parsed, rest = parse(items, namespace)
        if row is not None:
            parsed.resume_row = row
        return parsed, rest

    return parse_known_args


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
