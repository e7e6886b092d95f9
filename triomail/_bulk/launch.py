"""Open and check everything a batch needs, then send it (:mod:`.run`) or dry-run it.

Theory of operation
-------------------
Everything that can be checked without a server is checked first: the template
(:mod:`.template`), the recipients file (:mod:`.recipients`) and the journal
(:mod:`.journal`; by default next to the recipients file, in memory with ``--sink``
or ``--dry-run``). Then the servers and their secrets (:mod:`.servers`: a secret
command, ``TRIOMAIL_PASSWORD`` or a prompt, never the URL). From a terminal every real
send is confirmed once the servers answered (:func:`_confirmation`: the count, a sample
recipient, the servers), so that a mistyped password is said before the question.
Anything failing up to here, or in the first connections (:func:`.servers.preflight`),
exits 2 with one line (:class:`.settings.CannotRun`). The batch itself is one trio run
(:class:`.run.SendRun`).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sys
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import trio

from .._pool.pool import Server
from .brake import Brake
from .deliver import load_keys, signed, signer_of, template_headers
from .dry_run import dry_run
from .feed import Feed
from .journal import BaseJournal, JournalError, open_journal
from .lint import Lint, lint_sample
from .outcomes import Outcomes
from .planner import Policy
from .preflight import DNS_PROBLEMS, check_campaign
from .progress import Display, Progress
from .recipients import BadRow, RecipientsError, RecipientsReader, check_utf8, estimate_rows
from .render_process import RenderProcess, default_message_id
from .run import SendRun
from .servers import servers
from .settings import EXIT_CANNOT_RUN, CannotRun, SendSettings
from .suppression import SuppressionFile, load_exclusions
from .template.compile import CompiledTemplate, compile_template
from .template.rendered import RowError, TemplateError

__all__ = ["CONFIRM_ABOVE", "message_domain", "prepare_and_run"]

#: Without a terminal to confirm on, a send of more messages than this needs --yes.
CONFIRM_ABOVE = 5
#: Rows the confirmation's sample recipient is looked for in.
SAMPLE_ROWS = 100
SAMPLE_ID = "<sample@triomail.invalid>"


def prepare_and_run(settings: SendSettings, renderer: RenderProcess | None) -> int:
    """Open and check everything, then send (or dry-run) the batch; the exit status."""
    try:
        template = compile_template(
            settings.template, settings.attachments_dir, template_headers(settings)
        )
    except TemplateError as exc:
        raise CannotRun(str(exc)) from None
    keys = load_keys(settings, template.sender_domain())
    try:
        if settings.encoding is None:
            check_utf8(settings.recipients)
        reader = RecipientsReader.open(settings.recipients, settings.encoding)
    except RecipientsError as exc:
        raise CannotRun(str(exc)) from None
    estimate = estimate_rows(settings.recipients)
    journal, counts = _open_journal(settings, template.digest)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_closing(journal))
        earlier = counts.get("accepted", 0)
        if not settings.retry_refused:
            earlier += counts.get("permanent", 0)
        total = max(0, estimate - earlier) if settings.resume else estimate
        if settings.limit is not None:
            total = min(total, settings.limit)
        progress = Progress(total=total)
        display = Display(
            progress, sys.stderr, tty=sys.stderr.isatty(), interval=settings.progress_interval
        )
        suppress_to = (
            None if settings.suppress_to is None else SuppressionFile(settings.suppress_to)
        )
        if suppress_to is not None:
            stack.callback(suppress_to.close)
        outcomes = Outcomes(
            journal,
            progress,
            display,
            settings.recipients,
            settings.report,
            content=template.digest,
            suppress_to=suppress_to,
            brake=Brake(settings.max_policy_rejections / 100),
        )
        domain = message_domain(template)
        campaign = journal.campaign
        relay = urlsplit(settings.server[0]).hostname if settings.server else None
        lint = Lint(rows=estimate, relay=relay, strict=settings.strict)
        render = signed(template.render, signer_of(keys))
        policy = Policy(
            run=journal.run,
            at_most_once=settings.at_most_once,
            message_id=lambda key: default_message_id(key, campaign, domain),
            render=lint.watch(render) if settings.dry_run else render,
            lookup=journal.lookup,
            retry_refused=settings.retry_refused,
            excluded=frozenset() if settings.exclude is None else load_exclusions(settings.exclude),
        )
        if renderer is not None:
            # --render auto: it will be told where the rows rendered here end.
            renderer.begin(
                campaign,
                domain,
                template.digest,
                more=settings.render == "auto",
                keys=[key.line() for key in keys],
            )
        for warning in reader.warnings:
            print(f"triomail send: warning: {settings.recipients}: {warning}", file=sys.stderr)
        if settings.check_dns:
            from_domain = template.sender_domain()
            if not check_campaign(from_domain, keys, settings.dns_resolver, display.message):
                lint.warnings[DNS_PROBLEMS] = 0  # about the campaign, not its rows
        if settings.dry_run:
            status = dry_run(
                reader,
                policy,
                outcomes,
                limit=settings.limit,
                show=settings.show,
                out_dir=settings.sink,
            )
            return EXIT_CANNOT_RUN if lint.report(display.message, clean=True) else status
        sampled = lint_sample(reader, lint.watch(render), policy.message_id)
        if lint.report(display.message, of=f" of the first {sampled:,}"):
            raise CannotRun("lint found errors (above); nothing was sent")
        progress.lint = lint.verdict()
        found, confirm = _confirmation(settings, template, estimate, total)
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
        batch.confirm = confirm
        return _trio_run(batch, found)


def _open_journal(settings: SendSettings, digest: str) -> tuple[BaseJournal, dict[str, int]]:
    """The journal (next to the recipients file unless given; never a file for a dry
    run) and its counts by state."""
    path = settings.journal_path()
    try:
        return open_journal(
            path,
            resume=settings.resume and not settings.dry_run,
            source=str(settings.recipients.resolve()),
            content=digest,
            lease=settings.lease,
            rate=settings.campaign_rate,
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


def _confirmation(
    settings: SendSettings, template: CompiledTemplate, estimate: int, total: int
) -> tuple[list[Server] | None, Callable[[], None] | None]:
    """The servers (``None`` for --sink), and the question to ask once they answered.

    From a terminal every real send asks first: how many messages, a sample recipient
    and the servers (``--yes`` skips it). Without a terminal nobody can answer: a
    handful of messages (``CONFIRM_ABOVE``) go, as a script of a few test sends
    expects; more need ``--yes`` (or ``--resume`` of a batch confirmed before).
    """
    if settings.sink is not None:
        return None, None
    if not sys.stdin.isatty():
        many = min(estimate, settings.limit or estimate) > CONFIRM_ABOVE
        if many and not settings.yes and not settings.resume:
            raise CannotRun(
                f"about {estimate} messages to send and no terminal to confirm: pass --yes"
            )
        return servers(settings), None
    found = servers(settings)
    if settings.yes:
        return found, None
    where = ", ".join(f"{s.host}:{s.port}" for s in found)
    sample = _sample(settings, template)

    def confirm() -> None:
        answer = _ask(f"Send {total} message(s) (first to {sample}) through {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CannotRun("not confirmed; nothing was sent")

    return found, confirm


def _sample(settings: SendSettings, template: CompiledTemplate) -> str:
    """The recipients of the first row that renders (the confirmation shows them)."""
    reader = RecipientsReader.open(settings.recipients, settings.encoding)
    rows = iter(reader)
    try:
        for row in itertools.islice(rows, SAMPLE_ROWS):
            if isinstance(row, BadRow):
                continue
            try:
                return ", ".join(template.render(row.fields, message_id=SAMPLE_ID).recipients)
            except RowError:
                continue
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    return "no row renders"


def _trio_run(batch: SendRun, server: list[Server] | None) -> int:
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


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        return ""
