"""``triomail send RECIPIENTS TEMPLATE``: the bulk mailer.

Theory of operation
-------------------
Everything that can be checked without a server is checked first: options, the
template (:mod:`._template`), the recipients file (:mod:`._recipients`) and the
journal (:mod:`._journal`). Then the password is read (``TRIOMAIL_PASSWORD`` or a
prompt), one connection is opened and closed to prove the server is reachable and
accepts the credentials (anything failing up to here exits 2 with one line), and a
first send to more than five recipients asks for confirmation.

The batch itself is one trio run: :meth:`_Batch.messages` is an async generator that
the pool consumes lazily. It reads rows in chunks, renders them to bytes, asks the
journal what is known about them (``--resume``), marks the chunk in-flight in one
committed transaction, and only then yields the messages one by one. The results
loop records every outcome in the journal (batched commits), the JSONL report and
the progress counters.

With ``--render process`` or ``auto`` (more than one CPU, not a dry run), a render
process (:mod:`.render_process`) is started before anything else; it reads and renders
the rows and streams them over a pipe, and :meth:`_Batch.messages` takes its chunks
from there instead (``auto``: the first rows are read and rendered here while it
starts, then it is told where to go on from). The decisions per row stay here, with
the journal.

Signals: the first SIGINT/SIGTERM stops reading rows; transactions on the wire are
finished, messages waiting for a retry are not sent again (recorded as transient, or
unknown if an earlier attempt may have delivered them), claimed messages never handed
to the pool go back to pending. A second signal cancels at once; messages cut off are
recorded as transient or unknown, messages the pool held without sending them as
transient. Either way nothing handed to the pool is left in-flight: the pool reports
each such message in ``Pool.interrupted``, and ``--resume --at-most-once`` skips only
those that may have been delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import getpass
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .._core.results import Outcome
from .render_process import default_message_id

if TYPE_CHECKING:
    import ssl

    import trio

    from .._core.prepare import PreparedMessage
    from .._core.results import SendResult
    from .._pool.pool import Pool, Server
    from .journal import Journal, Record
    from .progress import Display, Progress
    from .recipients import BadRow, RecipientsReader, Row
    from .render_process import RenderProcess
    from .template import CompiledTemplate, Rendered

__all__ = ["register", "run"]

_log = logging.getLogger("triomail.send")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2
EXIT_INTERRUPTED = 130

_ACCEPTED = Outcome.ACCEPTED
_TRANSIENT = Outcome.TRANSIENT
_PERMANENT = Outcome.PERMANENT
_UNKNOWN = Outcome.UNKNOWN

#: A first real send to more recipients than this asks for confirmation.
CONFIRM_ABOVE = 5
#: Bad rows printed on stderr before the rest are only counted (all are in --report).
MAX_PRINTED_ERRORS = 50
#: --render: where messages are rendered.
RENDER_MODES = ("auto", "process", "inline")
#: --render auto: chunks rendered here while the render process catches up after its
#: start (a slow template, rendered here as fast as there, would never let it catch up).
CATCH_UP_CHUNKS = 4

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


class CannotRun(Exception):
    """Exit 2 with this one-line message."""


# ------------------------------------------------------------------------ options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(func=run)


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


@dataclass
class Settings:
    """The merged settings of one run (defaults < config file < command line)."""

    recipients: Path
    template: Path
    server: str | None = None
    sink: Path | None = None
    ca_file: Path | None = None
    dry_run: bool = False
    limit: int | None = None
    yes: bool = False
    show: int = 1
    connections: int = 10
    rate: float | None = None
    max_per_connection: int | None = None
    retries: int = 4
    retry_backoff: float = 1.0
    retry_max_backoff: float = 300.0
    report: Path | None = None
    journal: Path | None = None
    resume: bool = False
    at_most_once: bool = False
    progress_interval: float = 5.0
    render: str = "auto"

    def render_in_process(self) -> bool:
        """Render in a second process? (--render, the CPU count; never for a dry run)."""
        if self.dry_run or self.render == "inline":
            return False
        if os.name != "posix":  # the pipe is read with trio's wait_readable on its fd
            if self.render == "process":
                raise CannotRun("--render process needs a POSIX system; use --render inline")
            return False
        return self.render == "process" or (os.cpu_count() or 1) > 1


_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "server": (str,),
    "sink": (str,),
    "ca_file": (str,),
    "dry_run": (bool,),
    "limit": (int,),
    "yes": (bool,),
    "show": (int,),
    "connections": (int,),
    "rate": (int, float),
    "max_per_connection": (int,),
    "retries": (int,),
    "retry_backoff": (int, float),
    "retry_max_backoff": (int, float),
    "report": (str,),
    "journal": (str,),
    "resume": (bool,),
    "at_most_once": (bool,),
    "progress_interval": (int, float),
    "render": (str,),
}
_PATHS = {"sink", "ca_file", "report", "journal"}


def _load_config(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CannotRun(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CannotRun(f"config {path}: {exc}") from None
    section = data.get("send", data)
    if not isinstance(section, dict):
        raise CannotRun(f"config {path}: [send] must be a table")
    out: dict[str, Any] = {}
    for raw_key, value in section.items():
        key = raw_key.replace("-", "_")
        if key == "send" and section is data:
            continue
        if key == "password":
            raise CannotRun(
                f"config {path}: passwords are not read from files; set TRIOMAIL_PASSWORD"
            )
        types = _CONFIG_TYPES.get(key)
        if types is None:
            raise CannotRun(f"config {path}: unknown setting {raw_key!r}")
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise CannotRun(f"config {path}: {raw_key} has the wrong type")
        if key in _PATHS:
            value = (path.parent / Path(str(value)).expanduser()).resolve()
        if key == "render" and value not in RENDER_MODES:
            raise CannotRun(f"config {path}: render must be one of {', '.join(RENDER_MODES)}")
        out[key] = value
    return out


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings(recipients=args.recipients, template=args.template)
    if args.config is not None:
        for key, value in _load_config(args.config).items():
            setattr(settings, key, value)
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(settings, f.name, value)
    if settings.sink is not None and settings.server is not None and not settings.dry_run:
        raise CannotRun("give --server or --sink, not both")
    if settings.server is None and settings.sink is None and not settings.dry_run:
        raise CannotRun("no server: give --server URL, --config FILE.toml or --sink DIR")
    if settings.at_most_once and not settings.resume:
        raise CannotRun("--at-most-once only applies with --resume")
    if settings.resume and settings.journal is None and settings.sink is not None:
        raise CannotRun("--resume with --sink needs --journal (the default journal is in memory)")
    return settings


# ------------------------------------------------------------------------ entry point


#: The cyclic garbage collector's thresholds during a run. A batch allocates objects by
#: the million and frees them by reference counting; with the default threshold (700)
#: the collector ran ~230 times per 10,000 messages (about 5% of the CPU), scanning the
#: imported modules' objects again and again. Restored when the run ends.
GC_THRESHOLDS = (20_000, 50, 100)


def run(args: argparse.Namespace) -> int:
    """Run ``triomail send``; return the exit status."""
    import gc

    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        settings = settings_from(args)
        return _main(settings)
    except CannotRun as exc:
        print(f"triomail send: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("triomail send: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        gc.set_threshold(*thresholds)


def _main(settings: Settings) -> int:
    with contextlib.ExitStack() as stack:
        renderer = None
        if settings.render_in_process():
            from .render_process import RenderProcess

            # First of all, so that its start-up overlaps ours.
            try:
                renderer = RenderProcess.start(settings.template, settings.recipients)
            except OSError as exc:
                raise CannotRun(f"cannot start the render process: {exc}") from None
            stack.callback(renderer.close)
        return _prepare_and_run(settings, renderer)


def _prepare_and_run(settings: Settings, renderer: RenderProcess | None) -> int:
    from .journal import Journal, JournalError
    from .recipients import RecipientsError, RecipientsReader, estimate_rows
    from .template import TemplateError, compile_template

    try:
        template = compile_template(settings.template)
    except TemplateError as exc:
        raise CannotRun(str(exc)) from None
    try:
        reader = RecipientsReader.open(settings.recipients)
    except RecipientsError as exc:
        raise CannotRun(str(exc)) from None
    estimate = estimate_rows(settings.recipients)

    journal_path = settings.journal
    if journal_path is None and settings.sink is None and not settings.dry_run:
        journal_path = settings.recipients.with_name(settings.recipients.name + ".journal.sqlite3")
    if settings.dry_run:
        journal_path = None  # a dry run never touches a real journal
    try:
        journal, counts = Journal.open(
            journal_path,
            resume=settings.resume and not settings.dry_run,
            source=str(settings.recipients.resolve()),
            content=template.digest,
        )
    except JournalError as exc:
        raise CannotRun(str(exc)) from None

    with contextlib.closing(journal):
        batch = _Batch(settings, template, reader, journal, counts, estimate)
        if renderer is not None:
            # --render auto: it will be told where the rows rendered here end.
            more = settings.render == "auto"
            renderer.begin(journal.campaign, batch.domain, template.digest, more=more)
            batch.renderer = renderer
        for warning in reader.warnings:
            print(f"triomail send: warning: {settings.recipients}: {warning}", file=sys.stderr)
        if settings.dry_run:
            return batch.dry_run()
        needs_confirmation = (
            settings.sink is None
            and not settings.yes
            and not settings.resume
            and min(estimate, settings.limit or estimate) > CONFIRM_ABOVE
        )
        if needs_confirmation and not sys.stdin.isatty():
            raise CannotRun(
                f"about {estimate} messages to send and no terminal to confirm: pass --yes"
            )
        server = None
        if settings.sink is None:
            server = _server(settings)
        if needs_confirmation:
            assert batch.progress is not None
            where = f"{server.host}:{server.port}" if server is not None else "?"
            answer = _ask(f"Send about {batch.progress.total} messages through {where}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CannotRun("not confirmed; nothing was sent")
        return _trio_run(batch, server)


def _trio_run(batch: _Batch, server: Server | None) -> int:
    import trio

    try:
        return trio.run(batch.run, server)
    except BaseExceptionGroup as group:
        cannot, rest = group.split(CannotRun)
        if cannot is not None:
            first = cannot.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        if rest is not None:
            raise rest from None
        raise


def _server(settings: Settings) -> Server:
    from urllib.parse import urlsplit

    from .._pool.pool import Server

    assert settings.server is not None
    url = settings.server
    parts = urlsplit(url)
    if parts.password is not None:
        raise CannotRun("do not put the password in the URL; set TRIOMAIL_PASSWORD instead")
    try:
        server = Server.from_url(url, ssl_context=_ssl_context(settings.ca_file))
        _ = server.port
    except ValueError as exc:
        raise CannotRun(f"--server {url}: {exc}") from None
    if server.username:
        password = os.environ.get("TRIOMAIL_PASSWORD")
        if password is None:
            if not sys.stdin.isatty():
                raise CannotRun("no password: set TRIOMAIL_PASSWORD (no terminal to prompt on)")
            password = getpass.getpass(f"password for {server.username} on {server.host}: ")
        server = dataclasses.replace(server, password=password)
    return server


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    from .._client.options import default_ssl_context

    context = default_ssl_context()
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise CannotRun(f"--ca-file {ca_file}: {exc}") from None
    return context


# ------------------------------------------------------------------------- the batch


@dataclass(slots=True)
class _Tag:
    """What the CLI keeps about a message while the pool has it (``SendResult.tag``)."""

    key: str
    line: int
    message_id: str
    done: tuple[str, ...]
    started: float = 0.0
    #: The state an earlier run left the message in (``--resume``), if any.
    previous: str | None = None


#: One JSON object as one line (``json.dumps`` would build an encoder per call).
_json_line = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


def _message_domain(template: CompiledTemplate) -> str:
    domain = template.sender_domain()
    if domain:
        return domain
    host = socket.gethostname()  # no DNS lookup, unlike getfqdn()
    return host if "." in host and host.isascii() else "triomail.invalid"


@dataclass
class _Batch:
    settings: Settings
    template: CompiledTemplate
    reader: RecipientsReader
    journal: Journal
    counts: dict[str, int]
    estimate: int
    stopping: bool = False
    aborted: bool = False
    handed: int = 0
    outstanding: dict[str, _Tag] = field(default_factory=dict)
    #: Claimed in the journal, not handed to the pool yet (released at the end).
    unhanded: deque[str] = field(default_factory=deque)
    errors_printed: int = 0
    #: Retries that the results seen so far took (attempts beyond the first).
    retries_done: int = 0
    report: IO[str] | None = None
    #: Report lines not written yet (:meth:`_flush_report`).
    report_lines: list[str] = field(default_factory=list)
    display: Display | None = None
    progress: Progress | None = None
    domain: str = ""
    #: The render process, if rows are rendered in one (--render).
    renderer: RenderProcess | None = None
    #: Why the render process stopped before the end of the file, if it did.
    render_error: str | None = None

    def __post_init__(self) -> None:
        from .progress import Display, Progress

        earlier = self.counts.get("accepted", 0) + self.counts.get("permanent", 0)
        total = max(0, self.estimate - earlier) if self.settings.resume else self.estimate
        if self.settings.limit is not None:
            total = min(total, self.settings.limit)
        self.progress = Progress(total=total)
        self.display = Display(
            self.progress,
            sys.stderr,
            tty=sys.stderr.isatty(),
            interval=self.settings.progress_interval,
        )
        self.domain = _message_domain(self.template)

    # -- rows ---------------------------------------------------------------------

    def _bad_row(self, line: int, error: str) -> None:
        assert self.progress is not None and self.display is not None
        self.progress.skipped += 1
        if self.errors_printed < MAX_PRINTED_ERRORS:
            self.display.message(f"{self.settings.recipients}:{line}: skipped: {error}")
        elif self.errors_printed == MAX_PRINTED_ERRORS:
            self.display.message("(more bad rows: only counted; see --report)")
        self.errors_printed += 1
        self._write({"type": "bad_row", "line": line, "error": error, "time": _iso(time.time())})

    def _message_id(self, key: str) -> str:
        return default_message_id(key, self.journal.campaign, self.domain)

    def _chunks(self, size: int) -> Iterator[list[Row | BadRow]]:
        rows = iter(self.reader)
        while True:
            chunk = list(itertools.islice(rows, size))
            if not chunk:
                return
            yield chunk

    def _plan_chunk(
        self,
        chunk: list[Row | BadRow],
        budget: int | None,
        pre: list[Rendered | str | None] | None = None,
    ) -> list[tuple[Row, Rendered, Record | None]]:
        """Decide, per row, what to do; render the ones to send.

        ``pre`` holds, for each item of ``chunk``, what the render process made of it
        (a message rendered with the default Message-ID, or the error): used unless the
        journal holds another Message-ID for that row.
        """
        from .recipients import BadRow
        from .template import RowError

        assert self.progress is not None
        rows = [r for r in chunk if not isinstance(r, BadRow)]
        known = self.journal.lookup([r.key for r in rows])
        planned: list[tuple[Row, Rendered, Record | None]] = []
        seen: dict[str, int] = {}
        skipped_unknown = []
        for index, item in enumerate(chunk):
            if isinstance(item, BadRow):
                self._bad_row(item.line, item.error)
                continue
            if budget is not None and len(planned) >= budget:
                break
            record = known.get(item.key)
            if item.key in seen or (record is not None and record.run == self.journal.run):
                first = seen.get(item.key) or (record.line if record else 0)
                self._bad_row(item.line, f"duplicate of line {first} (same content), not sent")
                continue
            seen[item.key] = item.line
            if record is not None:
                if record.state in ("accepted", "permanent"):
                    self.progress.earlier += 1
                    if record.state == "permanent":
                        self.progress.earlier_failed += 1
                    continue
                if record.state in ("in-flight", "unknown") and self.settings.at_most_once:
                    skipped_unknown.append((item.key, item.line, record.content, record.message_id))
                    self.progress.unknown += 1
                    self._write(
                        {
                            "type": "message",
                            "line": item.line,
                            "key": item.key,
                            "message_id": record.message_id,
                            "outcome": "unknown",
                            "skipped": "at-most-once",
                            "time": _iso(time.time()),
                        }
                    )
                    continue
            done = pre[index] if pre is not None else None
            if done is not None and (
                record is None or record.message_id == self._message_id(item.key)
            ):
                if isinstance(done, str):
                    self._bad_row(item.line, done)
                    continue
                planned.append((item, done, record))
                continue
            message_id = record.message_id if record is not None else self._message_id(item.key)
            try:
                rendered = self.template.render(item.fields, message_id=message_id)
            except RowError as exc:
                self._bad_row(item.line, str(exc))
                continue
            planned.append((item, rendered, record))
        if skipped_unknown:
            self.journal.mark(skipped_unknown, "unknown")
        return planned

    @staticmethod
    def _from_records(
        records: list[tuple[Any, ...]], after: int = 0
    ) -> tuple[list[Row | BadRow], list[Rendered | str | None]]:
        """The render process's records as rows, and what it made of each.

        Records of lines up to ``after`` (rows already read and rendered here) are
        left out.
        """
        from .recipients import BadRow, Row
        from .template import Rendered

        chunk: list[Row | BadRow] = []
        pre: list[Rendered | str | None] = []
        if after and records and records[0][1] <= after:
            records = [r for r in records if r[1] > after]
        for r in records:
            kind = r[0]
            if kind == 1:
                chunk.append(Row(r[1], r[3], r[2]))
                pre.append(Rendered(r[4], r[5], r[6], r[7], r[8], r[9]))
            elif kind == 0:
                chunk.append(BadRow(r[1], r[2]))
                pre.append(None)
            else:
                chunk.append(Row(r[1], r[3], r[2]))
                pre.append(r[4])
        return chunk, pre

    def _prepared(self, row: Row, rendered: Rendered, record: Record | None) -> PreparedMessage:
        prepared_message, canonical, prepare, eight_bit_of = _PREPARE or _prepare_types()
        if record is None:
            done: tuple[str, ...] = ()
            recipients = rendered.recipients
            previous = None
        else:
            done = record.done
            recipients = tuple(r for r in rendered.recipients if r not in done)
            previous = record.state
        tag = _Tag(row.key, row.line, rendered.message_id, done, previous=previous)
        data = rendered.data
        eight_bit = rendered.eight_bit
        if eight_bit is None:
            eight_bit = eight_bit_of(data)
        if eight_bit is not None:
            # The renderer writes canonical CRLF text with short lines; skip re-checking it.
            message: PreparedMessage = prepared_message(
                sender=rendered.sender,
                recipients=recipients,
                canonical=canonical(data, eight_bit),
                needs_smtputf8=rendered.smtputf8,
                message_id=rendered.message_id,
                tag=tag,
            )
        else:
            message = prepare(data, sender=rendered.sender, recipients=recipients, tag=tag)
        return message

    async def messages(self) -> AsyncIterator[PreparedMessage]:
        """The pool's input: rows rendered, claimed in the journal, then yielded.

        With a render process, the rows it renders are read from its pipe. With
        ``--render auto``, rows are read and rendered here while it starts; once its
        first batch is there, it is told to skip the rows read here so far, and rows
        are read here 16 at a time until one of its batches goes beyond them (its
        batches of rows read here are dropped), or for at most CATCH_UP_CHUNKS chunks
        (then its rows are taken, and waited for if need be).
        """
        import trio

        from .._core.errors import LocalProtocolError
        from .render_process import NOT_READY, RenderProcessError

        assert self.progress is not None
        limit = self.settings.limit
        content = self.template.digest
        size = 16  # small at first so the first messages leave at once
        chunks = self._chunks(256)
        pending: list[Row | BadRow] = []
        renderer = self.renderer
        report = self.report is not None
        # Reading the render process's batches (no longer rows of our own)? With
        # --render process, from the first row; with auto, once its first batch is ready.
        switched = self.settings.render == "process"
        last_line = 0  # the last line read here
        # Chunks read here since the render process was told to skip the rows read
        # here (None: not yet); after a few, its rows are taken even if it is behind.
        skipped: int | None = None
        while not self.stopping:
            budget = None if limit is None else limit - self.handed
            if budget is not None and budget <= 0:
                return
            pre: list[Rendered | str | None] | None = None
            chunk: list[Row | BadRow] = []
            if renderer is not None:
                records: list[tuple[Any, ...]] | None = None
                try:
                    if switched:
                        records = await renderer.receive()
                    else:
                        polled = renderer.poll()
                        if skipped is None and polled is not NOT_READY:
                            # It has started: let it jump to the rows not read here yet.
                            renderer.skip_through(last_line)
                            skipped = 0
                        while (
                            isinstance(polled, list)
                            and polled[-1][1] <= last_line
                            and (skipped or 0) < CATCH_UP_CHUNKS
                        ):
                            # Rows already read and rendered here: keep rendering here
                            # while it catches up (no waiting), for a few chunks.
                            polled = renderer.poll()
                        if skipped is not None:
                            skipped += 1
                        if polled is None or isinstance(polled, list):
                            _log.debug("render process: taking its rows after line %d", last_line)
                            switched = True
                            pending = []
                            records = polled
                except RenderProcessError as exc:
                    self.render_error = str(exc)
                    return
                if switched:
                    if records is None:
                        return
                    chunk, pre = self._from_records(records, last_line)
                    if not chunk:
                        continue
            if not switched:
                if not pending:
                    pending = next(chunks, [])
                    if not pending:
                        return
                # Small chunks while the render process catches up: it is asked again
                # after each.
                step = size if skipped is None else 16
                chunk, pending = pending[:step], pending[step:]
                last_line = chunk[-1].line
            messages = []
            for row, rendered, record in self._plan_chunk(chunk, budget, pre):
                try:
                    messages.append(self._prepared(row, rendered, record))
                except LocalProtocolError as exc:
                    self._bad_row(row.line, str(exc))
            sendable = []
            for m in messages:
                if m.recipients:
                    sendable.append(m)
                else:  # every recipient had a final outcome in an earlier run
                    self.progress.earlier += 1
            tags: list[_Tag] = [m.tag for m in sendable]  # type: ignore[misc]
            if tags:
                self.journal.claim((t.key, t.line, content, t.message_id) for t in tags)
            unhanded = self.unhanded
            unhanded.extend(t.key for t in tags)
            for index, message in enumerate(sendable):
                if self.stopping:
                    return
                tag = tags[index]
                if report:
                    tag.started = time.time()
                self.outstanding[tag.key] = tag
                unhanded.popleft()
                self.handed += 1
                self.progress.started += 1
                yield message
            await trio.lowlevel.checkpoint()
            size = min(256, size * 2)

    # -- results ------------------------------------------------------------------

    def _write(self, obj: dict[str, Any]) -> None:
        if self.report is not None:
            lines = self.report_lines
            lines.append(_json_line(obj))
            if len(lines) >= 256:
                self._flush_report()

    def _flush_report(self) -> None:
        """Write the buffered report lines (in batches: one write per 256 lines)."""
        lines = self.report_lines
        if lines and self.report is not None:
            lines.append("")
            self.report.write("\n".join(lines))
            lines.clear()

    def _settle(self, result: SendResult, *, note: str | None = None) -> None:
        tag = result.tag
        if type(tag) is not _Tag:
            return
        self.outstanding.pop(tag.key, None)
        attempts = result.attempts
        if attempts > 1:
            self.retries_done += attempts - 1
        recipients = result.recipients
        reply = result.reply
        p = self.progress
        assert p is not None
        if len(recipients) == 1 and recipients[0].outcome is _ACCEPTED:
            # The common case, kept short: one recipient, accepted.
            p.accepted += 1
            counts = p.recipients
            counts["accepted"] = counts.get("accepted", 0) + 1
            if reply is not None:
                lines = reply.lines
                line = lines[0] if len(lines) == 1 else "\n".join(lines)
                self.journal.record_outcome(
                    tag.key, "accepted", attempts, reply.code, reply.enhanced_code, line, None
                )
            else:
                self.journal.record_outcome(tag.key, "accepted", attempts, None, None, None, None)
            if self.report is not None:
                self._report(result, tag, _ACCEPTED, False, note)
            return
        outcome = result.outcome
        downgraded = outcome is _TRANSIENT and _possible_duplicate(result)
        if downgraded:
            # An earlier attempt lost the reply to its final dot, a later one failed
            # before it: the message may have been delivered. --resume must treat it
            # as unknown (resend at least once, or skip with --at-most-once).
            outcome = _UNKNOWN
        done: tuple[str, ...] | None = None
        if outcome is not _ACCEPTED and outcome is not _PERMANENT:
            # Only a message sent again needs to know who already has a final outcome.
            final = (_ACCEPTED, _PERMANENT)
            settled = [r.recipient for r in recipients if r.outcome in final]
            done = tuple(dict.fromkeys([*tag.done, *settled])) or None
        code = enhanced = text = None
        if reply is not None:
            code = reply.code
            enhanced = reply.enhanced_code
            text = "\n".join(reply.lines)
        elif result.error:
            text = result.error
        self.journal.record_outcome(tag.key, outcome.value, attempts, code, enhanced, text, done)
        if outcome is _ACCEPTED:
            p.accepted += 1
        elif outcome is _PERMANENT:
            p.failed += 1
        elif outcome is _TRANSIENT:
            p.deferred += 1
        else:
            p.unknown += 1
        counts = p.recipients
        for r in recipients:
            value = "unknown" if downgraded and r.outcome is _TRANSIENT else r.outcome.value
            counts[value] = counts.get(value, 0) + 1
        if self.report is not None:
            self._report(result, tag, outcome, downgraded, note)

    def _report(
        self, result: SendResult, tag: _Tag, outcome: Outcome, downgraded: bool, note: str | None
    ) -> None:
        """The JSONL report's lines for one message and its recipients."""
        finished = time.time()
        reply = result.reply
        code = enhanced = text = None
        if reply is not None:
            code = reply.code
            enhanced = reply.enhanced_code
            text = reply.text
        started = _iso(tag.started or finished)
        ended = _iso(finished)
        message: dict[str, Any] = {
            "type": "message",
            "line": tag.line,
            "key": tag.key,
            "message_id": tag.message_id,
            "outcome": outcome.value,
            "attempts": result.attempts,
            "code": code,
            "enhanced_code": enhanced,
            "text": text,
            "error": result.error,
            "sender": result.sender,
            "recipients": [r.recipient for r in result.recipients],
            "started": started,
            "finished": ended,
        }
        if tag.previous is not None:
            message["previous"] = "unknown" if tag.previous == "in-flight" else tag.previous
        if note:
            message["note"] = note
        self._write(message)
        for r in result.recipients:
            r_reply = r.reply
            if r_reply is reply:  # the same reply decided the message (its text is known)
                r_code, r_enhanced, r_text = code, enhanced, text
            elif r_reply is not None:
                r_code, r_enhanced, r_text = r_reply.code, r_reply.enhanced_code, r_reply.text
            else:
                r_code = r_enhanced = r_text = None
            r_outcome = r.outcome
            self._write(
                {
                    "type": "recipient",
                    "line": tag.line,
                    "message_id": tag.message_id,
                    "recipient": r.recipient,
                    "outcome": "unknown"
                    if downgraded and r_outcome is _TRANSIENT
                    else r_outcome.value,
                    "code": r_code,
                    "enhanced_code": r_enhanced,
                    "text": r_text,
                    "attempts": result.attempts,
                    "started": started,
                    "finished": ended,
                }
            )

    # -- dry run ------------------------------------------------------------------

    def dry_run(self) -> int:
        assert self.progress is not None and self.display is not None
        out_dir = self.settings.sink
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        shown = 0
        count = 0
        limit = self.settings.limit
        for chunk in self._chunks(256):
            budget = None if limit is None else limit - count
            if budget is not None and budget <= 0:
                break
            for row, rendered, _ in self._plan_chunk(chunk, budget):
                count += 1
                self.progress.accepted += 1
                if shown < self.settings.show:
                    shown += 1
                    rcpts = ", ".join(rendered.recipients)
                    sys.stdout.write(f">>> message {count} (line {row.line}) to {rcpts}\n")
                    sys.stdout.write(rendered.data.decode("utf-8", "replace").replace("\r\n", "\n"))
                    sys.stdout.write("\n")
                if out_dir is not None:
                    (out_dir / f"{count:06d}.eml").write_bytes(rendered.data)
        sys.stdout.flush()
        where = f"; written to {out_dir}" if out_dir is not None else ""
        self.display.message(
            f"dry run: {count} message(s) rendered and checked, {self.progress.skipped} bad "
            f"row(s); nothing was sent{where}"
        )
        return EXIT_OK if self.progress.skipped == 0 else EXIT_FAILED

    # -- the run ------------------------------------------------------------------

    async def run(self, server: Server | None) -> int:

        with _signal_receiver() as signals:
            if self.settings.sink is None:
                assert server is not None
                return await self._run(server, signals)
            from .._pool.pool import Server
            from ..testing import SMTPSink

            sink = SMTPSink(
                out_dir=self.settings.sink,
                tls=True,
                store=False,
                max_connections=max(64, 2 * self.settings.connections),
                max_message_size=50 * 1024 * 1024,
            )
            async with sink:
                self._note(
                    f"capture server on {sink.host}:{sink.port} (STARTTLS), "
                    f"storing messages in {self.settings.sink}/"
                )
                target = Server(
                    sink.host, sink.port, tls="starttls", ssl_context=sink.client_ssl_context()
                )
                return await self._run(target, signals)

    def _note(self, text: str) -> None:
        assert self.display is not None
        self.display.message(text)

    def _resume_note(self) -> None:
        if not self.settings.resume:
            return
        c = self.counts
        unknown = c["in-flight"] + c["unknown"]
        policy = (
            "skipped (--at-most-once)"
            if self.settings.at_most_once
            else "resent with the same Message-ID (duplicates possible)"
        )
        self._note(
            f"resume: {c['accepted']} accepted and {c['permanent']} refused earlier (not resent), "
            f"{c['transient'] + c['pending']} to retry, {unknown} with an unknown outcome: {policy}"
        )
        previous = self.journal.previous_content
        if previous and previous != self.template.digest:
            self._note(
                "resume: the template changed since the last run; messages not accepted yet "
                "are sent with the new version"
            )

    async def _run(self, server: Server, signals: AsyncIterator[int]) -> int:
        assert self.progress is not None and self.display is not None
        self._resume_note()
        report_mode = "a" if self.settings.resume else "w"
        with contextlib.ExitStack() as stack:
            if self.settings.report is not None:
                try:
                    self.report = stack.enter_context(
                        self.settings.report.open(report_mode, encoding="utf-8")
                    )
                except OSError as exc:
                    raise CannotRun(f"--report {self.settings.report}: {exc.strerror}") from None
            try:
                await self._send(server, signals)
            finally:
                self._finish()
        self.display.finish()
        print(self.progress.summary(), flush=True)
        if self.render_error is not None:
            counts = self.journal.counts()
            left = counts["pending"] + counts["in-flight"]
            raise CannotRun(
                f"{self.render_error}; the messages handed out were sent and recorded, "
                f"the journal {self.journal.path or '(in memory)'} is consistent"
                + (f" ({left} pending or in flight)" if left else "")
                + "; continue with --resume"
            )
        if self.aborted or self.stopping:
            counts = self.journal.counts()
            left = counts["pending"] + counts["in-flight"]
            self.display.message(
                f"interrupted: the journal {self.journal.path or '(in memory)'} is consistent"
                + (f"; {left} message(s) pending or in flight" if left else "")
                + "; continue with --resume"
            )
            return EXIT_INTERRUPTED
        p = self.progress
        if p.failed or p.deferred or p.unknown or p.skipped or p.earlier_failed:
            return EXIT_FAILED
        return EXIT_OK

    async def _send(self, server: Server, signals: AsyncIterator[int]) -> None:
        import trio

        from .._pool.pool import RetryPolicy, open_pool

        s = self.settings
        retry = RetryPolicy(
            max_attempts=s.retries + 1,
            initial_backoff=s.retry_backoff,
            max_backoff=max(s.retry_max_backoff, s.retry_backoff),
            unknown="at-most-once" if s.at_most_once else "at-least-once",
        )
        pool_ref: list[Pool] = []
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as scope:
                outer.start_soon(self._watch_signals, signals, scope, pool_ref)
                await _preflight(server)
                outer.start_soon(self._tick, pool_ref)
                try:
                    async with (
                        open_pool(
                            server,
                            connections=s.connections,
                            max_messages_per_connection=s.max_per_connection,
                            rate=s.rate,
                            retry=retry,
                        ) as pool,
                        pool.send_all(self.messages()) as results,
                    ):
                        pool_ref.append(pool)
                        try:
                            async for result in results:
                                self._settle(result)
                        finally:
                            # Results already delivered but not yet read (on an abort).
                            while True:
                                try:
                                    self._settle(results.receive_nowait())
                                except (trio.WouldBlock, trio.EndOfChannel):
                                    break
                finally:
                    # Complete once open_pool has ended: cut off on the wire, or held
                    # by the pool and not sent (queued, waiting for a retry's backoff).
                    for result in pool_ref[0].interrupted if pool_ref else ():
                        self._settle(result, note="cut off by an abort")
            outer.cancel_scope.cancel()

    async def _watch_signals(
        self,
        signals: AsyncIterator[int],
        scope: trio.CancelScope,
        pool_ref: list[Pool],
    ) -> None:
        """First signal: stop reading rows, finish what is on the wire. Second: abort."""
        import trio

        async for _ in signals:
            self.stopping = True
            break
        if not pool_ref:
            scope.cancel()  # nothing was sent yet
            return
        # What is on the wire finishes; nothing waits for a new connection (a server
        # gone quiet would hold the stop for its greeting timeout): not sent, --resume.
        pool_ref[0].stop_connecting()
        self._note(
            f"interrupted: finishing the {len(self.outstanding)} message(s) in flight; "
            "press Ctrl-C again to abort"
        )

        async def drain() -> None:
            # Retries waiting for their backoff are not waited for: cancelling the pool
            # reports them in pool.interrupted (not sent again).
            while True:
                await trio.sleep(0.05)
                stats = pool_ref[0].statistics()
                if stats.in_flight == 0 and stats.queued == 0 and self.outstanding:
                    scope.cancel()
                    return

        async def second() -> None:
            async for _ in signals:
                self.aborted = True
                self._note("aborting: cutting off the messages in flight")
                scope.cancel()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            nursery.start_soon(second)

    async def _tick(self, pool_ref: list[Pool]) -> None:
        import trio

        assert self.display is not None and self.progress is not None
        period = 0.2 if self.display.tty else min(1.0, self.settings.progress_interval)
        while True:
            await trio.sleep(period)
            if pool_ref:
                # Retries scheduled by the pool, minus those already behind a result.
                scheduled = pool_ref[0].statistics().retries
                self.progress.retrying = max(0, scheduled - self.retries_done)
            self.display.tick()
            if self.report is not None:
                # The report on disk is at most one tick behind (kill -9 loses no more).
                self._flush_report()
                self.report.flush()

    def _finish(self) -> None:
        """Leave the journal consistent whatever happened."""
        if self.renderer is not None:
            self.renderer.close_pipe()
        if self.unhanded:
            self.journal.release(list(self.unhanded))
            self.unhanded.clear()
        self.journal.flush()
        if self.report is not None:
            self._flush_report()
            self.report.flush()


_PREPARE: tuple[Any, Any, Any, Any] | None = None


def _prepare_types() -> tuple[Any, Any, Any, Any]:
    """What :meth:`_Batch._prepared` needs, imported once (not at module import)."""
    global _PREPARE
    from .._core.data import Canonical
    from .._core.prepare import PreparedMessage, prepare
    from .template import canonical_eight_bit

    _PREPARE = (PreparedMessage, Canonical, prepare, canonical_eight_bit)
    return _PREPARE


@contextlib.contextmanager
def _signal_receiver() -> Iterator[AsyncIterator[int]]:
    """SIGINT and SIGTERM as a channel; nothing when not in the main thread (tests)."""
    import threading

    import trio

    if threading.current_thread() is threading.main_thread():
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
            yield receiver
        return

    async def never() -> AsyncIterator[int]:
        await trio.sleep_forever()
        yield 0  # pragma: no cover

    yield never()


def _possible_duplicate(result: SendResult) -> bool:
    """The pool says an earlier attempt of this message had an unknown outcome (R38)."""
    return result.earlier_unknown


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        return ""


async def _preflight(server: Server) -> None:
    """Open and close one connection: unreachable or refused credentials exit 2."""
    import trio

    from .._core.errors import SMTPAuthenticationError, SMTPError

    where = f"{server.host}:{server.port or '(default port)'}"
    try:
        with trio.fail_after(server.timeouts.connect + 30):
            conn = await server.open()
    except SMTPAuthenticationError as exc:
        raise CannotRun(f"authentication failed at {where}: {exc}") from None
    except SMTPError as exc:
        raise CannotRun(f"cannot use the server {where}: {exc}") from None
    except trio.TooSlowError:
        raise CannotRun(f"cannot use the server {where}: no answer") from None
    except OSError as exc:
        raise CannotRun(f"cannot connect to {where}: {exc}") from None
    await conn.aclose()
