"""One worker task: the only place where the pool waits on a server.

Theory of operation
-------------------
Each worker owns at most one connection at a time; a connection is never shared by two
transactions. It opens it lazily, reuses it for many messages, and closes it after
``max_messages_per_connection``, after ``idle_timeout`` seconds without work, or when the
server says 421. Every send runs inside the worker's own cancel scope
(``message_deadline``) and the connection's stage deadlines, so a slow or broken server
connection is cut off alone (R27, R48).

A worker pipelining on its connection (RFC 2920) takes each next job from the queue when
it is ready to write it, and reports each acceptance as soon as it is known.

Outcomes are values. A worker turns every failure of a server -- refusals, timeouts, lost
connections, even a TLS or AUTH failure -- into a :class:`SendResult` and gives it to the
ledger, which decides what comes next. Only bugs escape. A failure of a *reused*
connection before MAIL was accepted is retried at once on a fresh connection without
counting an attempt (R45); a 535 or a certificate failure fails every message for that
server at once (R10, R35); a connect failure fails over to another server if one is up,
else the worker keeps its jobs through the outage and sends them as soon as the server
answers (:mod:`.servers` counts the outage in backoff windows).

The module is longer than our usual 400 lines on purpose: a worker's turn (take, open,
send, settle, release) reads best as one sequence with each R-numbered rule where it
applies; what needs no I/O is kept out, in :mod:`.jobs` and :mod:`.wire`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Iterator, Sequence
from email.message import Message

import trio

from .._core import results as outcomes
from .._core.errors import (
    LocalProtocolError,
    SMTPAuthenticationError,
    SMTPCertificateError,
    SMTPDisconnected,
    SMTPError,
    SMTPResponseError,
)
from .._core.prepare import PreparedMessage, prepare
from .._core.results import Outcome, SendResult
from .dispatch import Dispatch
from .interfaces import Connection
from .jobs import Job, MessageLike
from .servers import Lease, ServerState, throttles
from .wire import WireRun

__all__ = ["DATA_RUN", "Worker", "as_prepared"]

#: Messages one pipelined run may carry over a connection without CHUNKING.
DATA_RUN = 256

_Ready = list[tuple[Job, PreparedMessage]]
_Refused = list[tuple[Job, LocalProtocolError]]


class Worker:
    """One worker task and what it holds: at most one connection (never shared)."""

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.ledger = dispatch.ledger
        self.options = dispatch.options
        self.lease = Lease()
        #: Jobs taken from the queue during the current attempt (beyond the first).
        self.streamed = 0
        #: Jobs this worker holds while their server is down (counted as in backoff).
        self.waiting = 0
        #: With ``on_wire``: the current pipelined run.
        self.wire: WireRun | None = None

    async def run(self) -> None:
        dispatch = self.dispatch
        try:
            while True:
                jobs = await self._next_jobs()
                if jobs is None:
                    return
                if not jobs:
                    continue
                dispatch.busy += 1
                try:
                    await self._attempt(jobs)
                finally:
                    self._done_waiting()
                    dispatch.busy -= 1
                    # With the jobs its pipelined runs took from the queue as they went.
                    self.ledger.put_down(len(jobs) + self.streamed)
                    self.streamed = 0
        finally:
            try:
                await self.lease.release()
            finally:
                dispatch.worker_ended()

    async def _next_jobs(self) -> list[Job] | None:
        """Wait for work: one job (a pipelined run takes the next ones from the queue
        only when it is ready to write them, so the workers share the queue fairly).

        Returns None when the pool closes, and an empty list after closing an idle
        connection or dropping a withdrawn job.
        """
        queue = self.dispatch.jobs_receive
        try:
            if self.lease.conn is None:
                if self.lease.token is None:
                    # R44: only a worker that may open a connection takes work, so a
                    # throttled server's jobs wait for the workers it still serves.
                    state = self.dispatch.servers.pick()
                    if state is not None:
                        await self.lease.reserve(state)
                first = await queue.receive()
            else:
                with trio.move_on_after(self.options.idle_timeout) as idle:
                    first = await queue.receive()
                if idle.cancelled_caught:
                    await self.lease.release()  # idle past idle_timeout: QUIT
                    return []
        except trio.EndOfChannel:
            return None
        return [first] if self.ledger.take(first) else []

    async def _open_for(self, jobs: list[Job]) -> bool:
        """Open a connection for ``jobs``, failing over between servers; False if none
        could be had (each job has that attempt recorded, or went back to the queue:
        after a 421 halved the slots, R44, idle connections may hold them all until
        their ``idle_timeout``, so a worker holding jobs never waits for one)."""
        servers, lease = self.dispatch.servers, self.lease
        while True:
            state = servers.pick()
            if state is None:
                # R10, R35: a configuration error; every message fails, none loops.
                reason = servers.fatal_reason()
                await self.dispatch.settle_each(
                    [(job, job.synthetic(Outcome.PERMANENT, reason)) for job in jobs],
                    final=True,
                )
                return False
            if not lease.try_reserve(state):
                if lease.token is None or lease.token.fatal is not None:
                    self.dispatch.requeue(jobs)
                    return False
                state = lease.token  # the slot in hand, on another server
            try:
                if await self._unless_stopped(self.lease.connect(state)):
                    self._done_waiting()
                    return True
                await self._not_sent(jobs, outcomes.STOPPED, final=True)
                return False
            except (SMTPAuthenticationError, SMTPCertificateError) as exc:
                if isinstance(exc, SMTPCertificateError) or exc.permanent:
                    state.mark_fatal(exc)
                    continue
                state.record_connect_failure(self.options.retry, exc)
                await self._not_sent(jobs, str(exc), final=False)
                return False
            except SMTPError as exc:
                if isinstance(exc, SMTPResponseError) and exc.reply.code == 421:
                    state.throttle()
                state.record_connect_failure(self.options.retry, exc)
                if servers.another_up():
                    continue  # failover: the same jobs, at once, elsewhere
                jobs = await self._wait_for(state, jobs, f"{state.server.label}: {exc}")
                if not jobs:
                    return False

    async def _wait_for(self, state: ServerState, jobs: list[Job], reason: str) -> list[Job]:
        """The server is down: those of ``jobs`` that have waited long enough fail (not
        sent, transient); the others stay with this worker, which tries again when the
        server's backoff window ends (the loop in :meth:`_open_for`), so they go out as
        soon as it answers. Returns those."""
        giving_up = self.ledger.wait_for_server(
            jobs, state.outage(), reason, first=not self.waiting
        )
        if giving_up:
            await self._not_sent(giving_up, reason, final=True)
            jobs = [job for job in jobs if job not in giving_up]
        if not jobs:
            self._done_waiting()
            return jobs
        if not self.waiting:
            self.dispatch.waiting += 1
        moved = len(jobs) - self.waiting
        self.ledger.in_flight -= moved
        self.ledger.backoff += moved
        self.waiting = len(jobs)
        return jobs

    def _done_waiting(self) -> None:
        """The jobs held through an outage are in flight again (or finished)."""
        if self.waiting:
            self.ledger.backoff -= self.waiting
            self.ledger.in_flight += self.waiting
            self.dispatch.waiting -= 1
            self.waiting = 0

    async def _unless_stopped(self, step: Awaitable[object]) -> bool:
        """Run ``step`` (a connect, a wait for the rate: nothing started on a server);
        False if ``Pool.stop_connecting`` cut it off (a stopping batch waits for neither)."""
        dispatch = self.dispatch
        with trio.CancelScope() as connecting:
            if dispatch.stopped_connecting:
                connecting.cancel()
            dispatch.connecting.add(connecting)
            try:
                await step
            finally:
                dispatch.connecting.discard(connecting)
        return not connecting.cancelled_caught

    async def _not_sent(self, jobs: list[Job], reason: str, *, final: bool) -> None:
        await self.dispatch.settle_each([(job, job.not_sent(reason)) for job in jobs], final=final)

    async def _attempt(self, jobs: list[Job]) -> None:
        """One attempt for each job, on the worker's connection (opened if needed).

        A reused connection that turns out dead before anything was started is replaced
        and the jobs go again without counting an attempt (R45).
        """
        dispatch, ledger, lease = self.dispatch, self.ledger, self.lease
        rate = dispatch.rate
        if rate is not None and not await self._unless_stopped(rate.acquire(len(jobs))):
            await self._not_sent(jobs, outcomes.STOPPED, final=True)
            return
        while jobs:
            if lease.conn is None:
                if not await self._open_for(jobs):
                    return
                # Some may have given up waiting for the server.
                jobs = [job for job in jobs if not job.final]
            conn, state = lease.conn, lease.state
            assert conn is not None and state is not None
            reused = conn.transactions > 0
            if reused and conn.is_stale():
                # R24, R45: it closed or spoke while idle; nothing was started.
                ledger.transparent_retries += 1
                await lease.release()
                continue
            ready: _Ready = []
            local: list[tuple[Job, SendResult]] = []
            for job in jobs:
                try:
                    ready.append((job, as_prepared(job.message, None, job.pending, conn)))
                except LocalProtocolError as exc:
                    local.append((job, job.refused(exc)))
            if local:
                await dispatch.settle_each(local, final=True)
            if not ready:
                return
            bucket = state.bucket
            if bucket is not None and not await self._unless_stopped(bucket.acquire(len(ready))):
                await self._not_sent([job for job, _ in ready], outcomes.STOPPED, final=True)
                return
            try:
                hook = self.options.on_wire
                if hook is not None and dispatch.batch_size == 1:  # else the run's gate
                    waiting = hook.wait([message for _, message in ready])
                    if waiting is not None:
                        await waiting
            except Exception as exc:  # not committed, so not written
                return await self._not_sent([job for job, _ in ready], str(exc), final=True)
            refused: _Refused = []
            results = await self._send(ready, refused)
            wire, self.wire = self.wire, None
            # Held back by the hook (its journal could not commit): not sent, not retried.
            held = set() if wire is None else wire.held
            # Every outcome is recorded before any is handed over (which may wait for
            # the consumer): a cancellation then finds each job with its result.
            finished: list[tuple[Job, SendResult]] = []
            for job, refusal in refused:
                dispatch.settle(job, job.refused(refusal), finished, final=True)
            if results is None:  # died before anything started: go again, uncounted
                await dispatch.deliver(finished)
                ledger.transparent_retries += 1
                await lease.release()
                continue
            lease.sent += len(results)
            jobs = []
            for index, ((job, message), result) in enumerate(zip(ready, results, strict=True)):
                if job.final:
                    continue  # accepted and delivered during the run
                if held and id(message) in held:
                    dispatch.settle(job, result, finished, final=True)
                    continue
                if (
                    (reused or index > 0)
                    and not result.mail_accepted
                    and result.outcome is Outcome.TRANSIENT
                    and (result.reply is None or result.reply.code == 421)
                    and not conn.is_usable
                ):
                    # R45: refused (421) or never started on a connection that is gone.
                    ledger.transparent_retries += 1
                    jobs.append(job)
                    continue
                if any(throttles(r.reply) for r in result.recipients) or throttles(result.reply):
                    state.throttle()
                elif result.ok:
                    state.record_success()
                dispatch.settle(job, result, finished)
            await dispatch.deliver(finished)
            limit = self.options.max_messages_per_connection
            if not conn.is_usable or (limit is not None and lease.sent >= limit):
                await lease.release()

    def _stream(self, ready: _Ready, refused: _Refused) -> Iterator[PreparedMessage]:
        """The messages for one pipelined run: those in hand, then any that queue up
        while it runs (pulled only when the pipeline is ready to write the next one).

        With BDAT a run writes up to ``pipeline_depth`` transactions before their
        replies (a lost connection leaves those unknown, R37). With DATA only one
        message at a time awaits its final reply, whatever the length of the run, so
        a run goes on while there is work (up to :data:`DATA_RUN`): each run ends with
        a round trip of its own.
        """
        conn = self.lease.conn
        assert conn is not None
        room = self.dispatch.batch_size
        if not conn.capabilities.chunking:
            room = max(room, DATA_RUN)
        limit = self.options.max_messages_per_connection
        if limit is not None:
            room = min(room, limit - self.lease.sent)
        wire = self.wire
        if wire is not None:  # each message committed before its content (gate)
            wire.hook.request([message for _, message in ready])
        yield from [message for _, message in ready]
        while len(ready) < room and (wire is None or wire.may_take(len(ready))):
            taken = self._take_next(refused)
            if taken is None:
                return
            ready.append(taken)
            if wire is not None:
                wire.hook.request([taken[1]])
            yield taken[1]

    def _take_next(self, refused: _Refused) -> tuple[Job, PreparedMessage] | None:
        """The next job from the queue, prepared for the connection (a job the client
        refuses goes to ``refused``); None if none is waiting."""
        conn = self.lease.conn
        assert conn is not None
        queue, ledger = self.dispatch.jobs_receive, self.ledger
        while True:
            try:
                job = queue.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return None
            if not ledger.take(job):
                continue
            self.streamed += 1
            message = job.message
            if job.pending is not None or not isinstance(message, PreparedMessage):
                try:
                    message = as_prepared(message, None, job.pending, conn)
                except LocalProtocolError as exc:
                    refused.append((job, exc))
                    continue
            return job, message

    async def _send(self, ready: _Ready, refused: _Refused) -> list[SendResult] | None:
        """Send on the worker's connection; None if it was dead before MAIL (R45)."""
        conn = self.lease.conn
        assert conn is not None
        if self.dispatch.batch_size == 1:
            assert len(ready) == 1
            return await self._send_one(conn, *ready[0])
        finished: dict[int, SendResult] = {}
        state, ledger = self.lease.state, self.ledger

        def on_result(index: int, result: SendResult) -> None:
            finished[index] = result
            job = ready[index][0]
            first_try = job.attempts == 0 and not job.settled
            # Delivered while the run goes on (the job is then final): the consumer (a
            # journal, a progress bar) learns of an acceptance at once, and nothing
            # piles up in here.
            accepted = first_try and result.ok and ledger.accept_at_once(job, result)
            if accepted and state is not None:
                state.record_success()
            if self.wire is not None:
                self.wire.on_result(result if accepted else None)

        try:
            hook = self.options.on_wire
            self.wire = None if hook is None else WireRun(hook)
            gate = None if self.wire is None else self.wire.gate
            return await conn.send_many(
                self._stream(ready, refused), on_result=on_result, gate=gate
            )
        except trio.Cancelled:
            # Which unfinished message was past its final dot is not known: report
            # them all as unknown rather than risk calling a delivered one transient.
            for i, (job, _) in enumerate(ready):
                if not job.final:
                    if i in finished:  # known, but not handed over yet
                        result = finished[i]
                    else:
                        result = job.synthetic(Outcome.UNKNOWN, "pool cancelled")
                    ledger.cut_short(job, result)
            for job, refusal in refused:
                ledger.cut_short(job, job.refused(refusal))
            self.wire = None
            raise

    async def _send_one(
        self, conn: Connection, job: Job, message: PreparedMessage
    ) -> list[SendResult] | None:
        deadline = self.options.message_deadline
        try:
            with trio.move_on_after(deadline or math.inf) as scope:
                if conn.pipeline == "off":  # send pipelines its envelope; this does not
                    result = (await conn.send_many([message]))[0]
                else:
                    result = await conn.send(message)
        except SMTPDisconnected as exc:
            if conn.transactions > 0:
                return None
            return [job.not_sent(str(exc))]
        except trio.Cancelled:
            self.ledger.cut_short(
                job, job.cut_off("pool cancelled", final_dot_out=conn.awaiting_final_reply)
            )
            raise
        if scope.cancelled_caught:
            reason = f"message_deadline of {deadline:g} s"
            return [job.cut_off(reason, final_dot_out=conn.awaiting_final_reply)]
        return [result]


def as_prepared(
    message: MessageLike | bytes | str,
    sender: str | None,
    recipients: Sequence[str] | None,
    conn: Connection | None = None,
) -> PreparedMessage:
    """``message`` prepared for ``conn`` (or any server), to the given recipients;
    :exc:`LocalProtocolError` if it names none (as ``prepare`` says)."""
    if isinstance(message, PreparedMessage):
        if recipients is None:
            return message
        if not recipients:
            raise LocalProtocolError("no recipients")
        return dataclasses.replace(message, recipients=tuple(recipients))
    if conn is not None and isinstance(message, Message):
        return conn.prepare(message, sender=sender, recipients=recipients)
    return prepare(message, sender=sender, recipients=recipients)
