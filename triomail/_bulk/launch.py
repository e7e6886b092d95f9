"""Open and check everything a batch needs, then send it (:mod:`.run`) or dry-run it.

Theory of operation
-------------------
Everything that can be checked without a server is checked first: the template
(:mod:`.template`), the recipients file (:mod:`.recipients`) and the journal
(:mod:`.journal`; by default next to the recipients file, in memory with ``--sink``
or ``--dry-run``). Then the password is read (``TRIOMAIL_PASSWORD`` or a prompt, never
the URL), and a first send to more than ``CONFIRM_ABOVE`` recipients asks for
confirmation. Anything failing up to here, or in the first connection
(:func:`.run.preflight`), exits 2 with one line (:class:`.settings.CannotRun`). The
batch itself is one trio run (:class:`.run.SendRun`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import trio

from .._client.options import default_ssl_context
from .._pool.pool import Server
from .dry_run import dry_run
from .feed import Feed
from .journal import BaseJournal, JournalError, open_journal
from .outcomes import Outcomes
from .planner import Policy
from .progress import Display, Progress
from .recipients import RecipientsError, RecipientsReader, check_utf8, estimate_rows
from .render_process import RenderProcess, default_message_id
from .run import SendRun
from .settings import CannotRun, SendSettings
from .template.compile import CompiledTemplate, compile_template
from .template.rendered import TemplateError

__all__ = ["CONFIRM_ABOVE", "message_domain", "prepare_and_run"]

#: A first real send to more recipients than this asks for confirmation.
CONFIRM_ABOVE = 5


def prepare_and_run(settings: SendSettings, renderer: RenderProcess | None) -> int:
    """Open and check everything, then send (or dry-run) the batch; the exit status."""
    try:
        template = compile_template(settings.template, settings.attachments_dir)
    except TemplateError as exc:
        raise CannotRun(str(exc)) from None
    try:
        if settings.encoding is None:
            check_utf8(settings.recipients)
        reader = RecipientsReader.open(settings.recipients, settings.encoding)
    except RecipientsError as exc:
        raise CannotRun(str(exc)) from None
    estimate = estimate_rows(settings.recipients)
    journal, counts = _open_journal(settings, template.digest)
    with _closing(journal):
        earlier = counts.get("accepted", 0) + counts.get("permanent", 0)
        total = max(0, estimate - earlier) if settings.resume else estimate
        if settings.limit is not None:
            total = min(total, settings.limit)
        progress = Progress(total=total)
        display = Display(
            progress, sys.stderr, tty=sys.stderr.isatty(), interval=settings.progress_interval
        )
        outcomes = Outcomes(journal, progress, display, settings.recipients, settings.report)
        domain = message_domain(template)
        campaign = journal.campaign
        policy = Policy(
            run=journal.run,
            at_most_once=settings.at_most_once,
            message_id=lambda key: default_message_id(key, campaign, domain),
            render=template.render,
            lookup=journal.lookup,
        )
        if renderer is not None:
            # --render auto: it will be told where the rows rendered here end.
            renderer.begin(campaign, domain, template.digest, more=settings.render == "auto")
        for warning in reader.warnings:
            print(f"triomail send: warning: {settings.recipients}: {warning}", file=sys.stderr)
        if settings.dry_run:
            return dry_run(
                reader,
                policy,
                outcomes,
                limit=settings.limit,
                show=settings.show,
                out_dir=settings.sink,
            )
        server = _confirmed_server(settings, estimate, total)
        feed = Feed(
            reader,
            journal,
            policy,
            outcomes,
            content=template.digest,
            limit=settings.limit,
            renderer=renderer,
            catch_up=settings.render == "auto",
            reread=lambda: RecipientsReader.open(settings.recipients, settings.encoding),
        )
        batch = SendRun(settings, journal, counts, template.digest, feed, outcomes)
        return _trio_run(batch, server)


def _open_journal(settings: SendSettings, digest: str) -> tuple[BaseJournal, dict[str, int]]:
    """The journal (next to the recipients file unless given; never a file for a dry
    run) and its counts by state."""
    path = settings.journal
    if path is None and settings.sink is None and not settings.dry_run:
        path = settings.recipients.with_name(settings.recipients.name + ".journal.sqlite3")
    if settings.dry_run:
        path = None  # a dry run never touches a real journal
    try:
        return open_journal(
            path,
            resume=settings.resume and not settings.dry_run,
            source=str(settings.recipients.resolve()),
            content=digest,
            lease=settings.lease,
        )
    except JournalError as exc:
        raise CannotRun(str(exc)) from None


@contextlib.contextmanager
def _closing(journal: BaseJournal) -> Iterator[BaseJournal]:
    """Close the journal at the end; a failure to is one line (exit 2), not a traceback."""
    try:
        yield journal
    finally:
        try:
            journal.close()
        except JournalError as exc:
            raise CannotRun(str(exc)) from None


def _confirmed_server(settings: SendSettings, estimate: int, total: int) -> Server | None:
    """The server (``None`` for --sink), once a first large send was confirmed."""
    needs_confirmation = (
        settings.sink is None
        and not settings.yes
        and not settings.resume
        and min(estimate, settings.limit or estimate) > CONFIRM_ABOVE
    )
    if needs_confirmation and not sys.stdin.isatty():
        raise CannotRun(f"about {estimate} messages to send and no terminal to confirm: pass --yes")
    server = None
    if settings.sink is None:
        server = _server(settings)
    if needs_confirmation:
        where = f"{server.host}:{server.port}" if server is not None else "?"
        answer = _ask(f"Send about {total} messages through {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CannotRun("not confirmed; nothing was sent")
    return server


def _trio_run(batch: SendRun, server: Server | None) -> int:
    try:
        return trio.run(batch.run, server)
    except JournalError as exc:
        raise CannotRun(str(exc)) from None
    except BaseExceptionGroup as group:
        cannot, rest = group.split((CannotRun, JournalError))
        if cannot is not None:
            first = cannot.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise CannotRun(str(first)) from None
        if rest is not None:
            raise rest from None
        raise


def message_domain(template: CompiledTemplate) -> str:
    """The domain of the Message-IDs: the sender's, else this host's name if it has one."""
    domain = template.sender_domain()
    if domain:
        return domain
    host = socket.gethostname()  # no DNS lookup, unlike getfqdn()
    return host if "." in host and host.isascii() else "triomail.invalid"


def _server(settings: SendSettings) -> Server:
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
    context = default_ssl_context()
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise CannotRun(f"--ca-file {ca_file}: {exc}") from None
    return context


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        return ""
