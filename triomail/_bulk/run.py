"""The batch as one trio run: the pool, the results, progress ticks, signals, a clean end.

Theory of operation
-------------------
:meth:`SendRun.run` starts the embedded capture server for ``--sink`` (through
:mod:`triomail.testing`), opens and closes one connection to each server first
(:func:`.servers.preflight`: refused credentials, or every server unreachable, exit 2 before
anything is claimed), asks the terminal's confirmation if launch set one, then opens
the pool on :meth:`.feed.Feed.messages` and records every result as it comes back
(:mod:`.outcomes`).

Signals: the first SIGINT/SIGTERM (or the policy brake, :mod:`.brake`) stops reading
rows; transactions on the wire are finished, messages waiting for a retry are not sent
again (recorded as transient, or unknown if an earlier attempt may have delivered them),
claimed messages never handed to the pool go back to pending. A second signal cancels
at once; messages cut off are recorded as transient or unknown, messages the pool held
without sending them as transient. Either way nothing handed to the pool is left
in-flight: the pool reports each such message in ``Pool.interrupted``, and ``--resume
--at-most-once`` skips only those that may have been delivered.

The capture server (:mod:`triomail.testing`) is imported only for ``--sink``, inside
:meth:`SendRun.run`: its import costs every other run tens of milliseconds of start-up.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import trio

from .._pool.pool import Pool, RetryPolicy, Server, open_pool
from .feed import Feed
from .journal import BaseJournal, JournalError
from .outcomes import Outcomes
from .servers import preflight
from .settings import (
    EXIT_BRAKE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    STDOUT,
    CannotRun,
    SendSettings,
)
from .wire import Wire

__all__ = ["SendRun"]

#: The capture server of --sink: connections it takes at least, and its largest message.
SINK_MIN_CONNECTIONS = 64
SINK_MAX_MESSAGE = 50 * 1024 * 1024
#: How often a stopping run looks whether the pool has finished what is on the wire.
DRAIN_POLL = 0.05
#: Seconds between progress ticks on a terminal (otherwise at most one).
TICK_TTY = 0.2
TICK_MAX = 1.0


class SendRun:
    """One batch: the feed into the pool, the results into the outcomes."""

    def __init__(
        self,
        settings: SendSettings,
        journal: BaseJournal,
        counts: dict[str, int],
        digest: str,
        feed: Feed,
        outcomes: Outcomes,
    ) -> None:
        self.settings = settings
        self.journal = journal
        #: The journal's counts by state when it was opened (``--resume``).
        self.counts = counts
        #: The template's digest (to tell a resumed run that it changed).
        self.digest = digest
        self.feed = feed
        self.outcomes = outcomes
        self.aborted = False
        #: Asked (in a thread) once the servers answered, before the first message:
        #: raises CannotRun if the user says no (launch sets it at a terminal).
        self.confirm: Callable[[], None] | None = None

    async def run(self, server: list[Server] | None) -> int:
        """Send the batch to ``server`` (failing over between several), or to a capture
        server (--sink); the exit status."""
        with _signal_receiver() as signals:
            if self.settings.sink is None:
                assert server is not None
                return await self._run(server, signals)
            from ..testing import SMTPSink  # only for --sink (see the header)

            sink = SMTPSink(
                out_dir=self.settings.sink,
                tls=True,
                store=False,
                max_connections=max(SINK_MIN_CONNECTIONS, 2 * self.settings.connections),
                max_message_size=SINK_MAX_MESSAGE,
            )
            async with sink:
                self._note(
                    f"capture server on {sink.host}:{sink.port} (STARTTLS), "
                    f"storing messages in {self.settings.sink}/"
                )
                target = Server(
                    sink.host, sink.port, tls="starttls", ssl_context=sink.client_ssl_context()
                )
                return await self._run([target], signals)

    def _note(self, text: str) -> None:
        self.outcomes.display.message(text)

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
        refused = "sent again (--retry-refused)" if self.settings.retry_refused else "not resent"
        self._note(
            f"resume: {c['accepted']} accepted earlier (not resent), {c['permanent']} refused "
            f"earlier ({refused}), {c['refused']} refused locally earlier (checked again), "
            f"{c['transient'] + c['pending']} to retry, {unknown} with an unknown outcome: {policy}"
        )
        previous = self.journal.previous_content
        if previous and previous != self.digest:
            self._note(
                "resume: the template changed since the last run; messages not accepted yet "
                "are sent with the new version"
            )

    def _stopped(self, why: str, then: str) -> None:
        """Say why the run stopped early, that the journal is consistent, what to do."""
        consistent, left = self._left()
        pending = f"; {left} message(s) pending or in flight" if left else ""
        self._note(f"{why}: {consistent}{pending}; {then}")

    def _left(self) -> tuple[str, int]:
        """Where the journal is (it is consistent), and how many messages it holds unsettled."""
        try:
            counts = self.journal.counts()
        except JournalError:
            return f"the journal {self.journal.where} is consistent", 0
        where = self.journal.where
        return f"the journal {where} is consistent", counts["pending"] + counts["in-flight"]

    async def _run(self, server: list[Server], signals: AsyncIterator[int]) -> int:
        outcomes = self.outcomes
        self._resume_note()
        report_mode = "a" if self.settings.resume else "w"
        to_stdout = self.settings.report == STDOUT
        with contextlib.ExitStack() as stack:
            if to_stdout:
                outcomes.report = sys.stdout  # --report -: the JSON lines are the output
            elif self.settings.report is not None:
                try:
                    outcomes.report = stack.enter_context(
                        self.settings.report.open(report_mode, encoding="utf-8")
                    )
                except OSError as exc:
                    raise CannotRun(f"--report {self.settings.report}: {exc.strerror}") from None
            try:
                await self._send(server, signals)
            finally:
                self._finish()
        outcomes.display.finish()
        for line in outcomes.failure_lines():
            outcomes.display.message(line)
        self._shared_note()
        # With --report - the summary goes to stderr, so stdout is JSON lines only.
        print(outcomes.progress.summary(), file=sys.stderr if to_stdout else sys.stdout, flush=True)
        error = self.feed.render_error or self.journal.failure
        if error is not None:
            consistent, left = self._left()
            raise CannotRun(
                f"{error}; the messages handed out were sent and recorded, "
                f"{consistent}"
                + (f" ({left} pending or in flight)" if left else "")
                + "; continue with --resume"
            )
        brake = outcomes.brake
        if brake is not None and brake.tripped:
            self._stopped(
                f"stopped by the policy brake: {brake.why()}",
                "fix the cause (authentication, reputation, content), then --resume",
            )
            return EXIT_BRAKE
        if self.aborted or self.feed.stopping:
            self._stopped("interrupted", "continue with --resume")
            return EXIT_INTERRUPTED
        if self.feed.limited and (left := self.feed.rows_left()):
            self._note(
                f"--limit {self.settings.limit}: stopped after line {self.feed.last_line}; "
                f"about {left} more row(s) were not sent (send them with --resume)"
            )
        p = outcomes.progress
        if p.failed or p.deferred or p.unknown or p.skipped or p.earlier_failed:
            return EXIT_FAILED
        return EXIT_OK

    async def _send(self, server: list[Server], signals: AsyncIterator[int]) -> None:
        s = self.settings
        settle = self.outcomes.settle
        retry = RetryPolicy(
            max_attempts=s.retries + 1,
            initial_backoff=s.retry_backoff,
            max_backoff=max(s.retry_max_backoff, s.retry_backoff),
            unknown="at-most-once" if s.at_most_once else "at-least-once",
        )
        pool_ref: list[Pool] = []
        wire = Wire(self.journal, settle)
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as scope:
                outer.start_soon(self._watch_signals, signals, scope, pool_ref)
                outer.start_soon(self._journal_background)
                await preflight(server)
                if self.confirm is not None:
                    await trio.to_thread.run_sync(self.confirm, abandon_on_cancel=True)
                outer.start_soon(self._tick, pool_ref)
                try:
                    async with (
                        open_pool(
                            server,
                            connections=s.connections,
                            max_messages_per_connection=s.max_per_connection,
                            rate=s.rate,
                            retry=retry,
                            pipeline=s.pipelining,
                            on_wire=wire,
                        ) as pool,
                        pool.send_all(self.feed.messages()) as results,
                    ):
                        pool_ref.append(pool)
                        try:
                            async for result in results:
                                if wire.fresh(result):
                                    settle(result)
                                    wire.logged()
                        finally:
                            # Results already delivered but not yet read (on an abort).
                            while True:
                                try:
                                    result = results.receive_nowait()
                                except (trio.WouldBlock, trio.EndOfChannel):
                                    break
                                if wire.fresh(result):
                                    settle(result)
                finally:
                    # Complete once open_pool has ended: cut off on the wire, or held
                    # by the pool and not sent (queued, waiting for a retry's backoff).
                    for result in pool_ref[0].interrupted if pool_ref else ():
                        if wire.fresh(result):  # not settled already by the hook
                            settle(result, note="cut off by an abort")
            outer.cancel_scope.cancel()

    async def _journal_background(self) -> None:
        """The journal's own work (a shared journal's commits and leases)."""
        try:
            await self.journal.background()
        except JournalError as exc:
            raise CannotRun(str(exc)) from None

    def _shared_note(self) -> None:
        """A shared journal: what other workers did is in their summaries."""
        if not self.journal.shared:
            return
        self._note(
            f"shared journal: this worker (run {self.journal.run}) left "
            f"{self.feed.elsewhere:,} row(s) to other workers; `triomail status "
            f"{self.journal.where}` shows the whole campaign"
        )
        stale = getattr(self.journal, "stale", 0)
        if stale:
            self._note(
                f"{stale:,} message(s) were taken over by another worker while this one "
                "still had them (its lease expired): possible duplicates"
            )

    async def _watch_signals(
        self,
        signals: AsyncIterator[int],
        scope: trio.CancelScope,
        pool_ref: list[Pool],
    ) -> None:
        """First signal: stop reading rows, finish what is on the wire. Second: abort."""
        outstanding = self.outcomes.outstanding
        await self._first_stop(signals)
        self.feed.stopping = True
        if not pool_ref:
            scope.cancel()  # nothing was sent yet
            return
        # What is on the wire finishes; nothing waits for a new connection (a server
        # gone quiet would hold the stop for its greeting timeout): not sent, --resume.
        pool_ref[0].stop_connecting()
        brake = self.outcomes.brake
        why = "policy brake" if brake is not None and brake.tripped else "interrupted"
        self._note(
            f"{why}: finishing the {len(outstanding)} message(s) in flight; "
            "press Ctrl-C again to abort"
        )

        async def drain() -> None:
            # Retries waiting for their backoff are not waited for: cancelling the pool
            # reports them in pool.interrupted (not sent again).
            while True:
                await trio.sleep(DRAIN_POLL)
                stats = pool_ref[0].statistics()
                if stats.in_flight == 0 and stats.queued == 0 and outstanding:
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

    async def _first_stop(self, signals: AsyncIterator[int]) -> None:
        """Return at the first signal, or when the policy brake trips (:mod:`.brake`)."""
        tripped = trio.Event()
        brake = self.outcomes.brake
        if brake is not None:
            brake.on_trip = tripped.set
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            await tripped.wait()
            nursery.cancel_scope.cancel()

    async def _tick(self, pool_ref: list[Pool]) -> None:
        outcomes = self.outcomes
        display = outcomes.display
        period = TICK_TTY if display.tty else min(TICK_MAX, self.settings.progress_interval)
        while True:
            await trio.sleep(period)
            if pool_ref:
                # Retries scheduled by the pool, minus those already behind a result.
                scheduled = pool_ref[0].statistics().retries
                outcomes.progress.retrying = max(0, scheduled - outcomes.retries_done)
            display.tick()
            # The report on disk is at most one tick behind (kill -9 loses no more).
            outcomes.flush_report()

    def _finish(self) -> None:
        """Leave the journal consistent whatever happened."""
        self.feed.close()
        self.journal.flush()
        self.outcomes.flush_report()


@contextlib.contextmanager
def _signal_receiver() -> Iterator[AsyncIterator[int]]:
    """SIGINT and SIGTERM as a channel; nothing when not in the main thread (tests)."""
    if threading.current_thread() is threading.main_thread():
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
            yield receiver
        return

    async def never() -> AsyncIterator[int]:
        await trio.sleep_forever()
        yield 0  # pragma: no cover

    yield never()
