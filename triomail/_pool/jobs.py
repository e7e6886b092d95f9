"""The job ledger: what became of every message handed to the pool, as plain bookkeeping.

Theory of operation
-------------------
A :class:`Job` is one message and its history (attempts, recipients settled, recipients
still due). The :class:`Ledger` holds every job handed over and not finished yet, and
keeps the promise the pool makes: every message ends with exactly one result, either
handed to its consumer or, when the pool is cancelled first, kept in
:attr:`Ledger.interrupted` (R48).

The ledger decides and never waits: no trio, no awaits, its clock injected. The workers
do the I/O and bring it each attempt's :class:`SendResult`; :meth:`Ledger.record` says
what comes next, the final result or a :class:`Retry`:

- every recipient accepted or refused for good at the first try: finished (the hot path);
- some recipients transient, or unknown under ``at-least-once`` (R37, R38): only they go
  again (R41) after the policy's backoff (R43), until ``max_attempts`` or
  ``give_up_after``; the final result merges what each attempt settled;
- 452/552 "too many recipients" after others were accepted: the rest go again at once,
  not counted as an attempt (R42, RFC 5321 §4.5.3.1.10).

A job ends by one of three verbs: :meth:`Ledger.delivered` (its consumer took the
result), :meth:`Ledger.interrupt` (the pool's cancellation kept it from the consumer) or
:meth:`Ledger.withdraw` (no result owed: never really handed over, or its ``Pool.send``
caller was cancelled before a worker took it). The counts behind
``Pool.statistics()`` are kept here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Protocol

from .._core import results as outcomes
from .._core.errors import LocalProtocolError
from .._core.prepare import PreparedMessage, prepare
from .._core.results import Outcome, RecipientResult, SendResult
from .options import RetryPolicy

__all__ = ["Destination", "Job", "Ledger", "MessageLike", "Retry"]

MessageLike = Message | PreparedMessage

_FINAL = (Outcome.ACCEPTED, Outcome.PERMANENT)
_ACCEPTED = Outcome.ACCEPTED.value


class Destination(Protocol):
    """Where a job's final result goes (the results of one ``send_all`` or ``send``)."""

    def expect(self) -> None:
        """One more result is owed."""

    def put_nowait(self, result: SendResult) -> bool:
        """Hand over ``result`` if the consumer has room now; False otherwise."""

    async def put(self, result: SendResult) -> None:
        """Hand over ``result``, waiting for room."""

    def withdraw(self) -> None:
        """One owed result will not come (it went elsewhere, or was never owed)."""


@dataclass(eq=False, slots=True)  # hashed by identity: a key of Ledger.held
class Job:
    """One message and what has become of it so far."""

    message: MessageLike
    done: Destination | None
    first_attempt: float
    attempts: int = 0
    #: Recipients still to deliver; None means all of the message's recipients.
    pending: tuple[str, ...] | None = None
    settled: list[RecipientResult] = field(default_factory=list)
    unknown_seen: bool = False
    #: The final result has been delivered (or recorded in ``Ledger.interrupted``).
    final: bool = False
    #: A worker has taken it (it is, or was, on the wire): too late to withdraw it.
    taken: bool = False
    last: SendResult | None = None
    #: Why the client refused to send a message that names no recipient at all: the
    #: caller of ``Pool.send`` gets it raised, as ``conn.send`` would raise it.
    refusal: LocalProtocolError | None = None

    @property
    def prepared(self) -> PreparedMessage | None:
        return self.message if isinstance(self.message, PreparedMessage) else None

    def due(self) -> tuple[str, ...]:
        """The recipients this job still has to deliver to (none if it cannot be
        prepared: it fails locally before any recipient is named)."""
        if self.pending is not None:
            return self.pending
        if isinstance(self.message, PreparedMessage):
            return self.message.recipients
        try:
            return prepare(self.message).recipients
        except LocalProtocolError:
            return ()

    def order(self, result: SendResult) -> list[str]:
        """The message's recipients in their order, for a merged result."""
        if isinstance(self.message, PreparedMessage):
            return list(self.message.recipients)
        return [r.recipient for r in self.settled] + [r.recipient for r in result.recipients]

    # The results the pool makes up for this job (see :mod:`.outcomes`).

    def synthetic(self, outcome: Outcome, reason: str) -> SendResult:
        """``outcome`` for every recipient due, with no reply."""
        return outcomes.synthetic(self.prepared, self.due(), outcome, reason)

    def not_sent(self, reason: str) -> SendResult:
        return outcomes.not_sent(self.prepared, self.due(), reason)

    def refused(self, refusal: LocalProtocolError) -> SendResult:
        """Refused locally: permanent, even for a message that names no recipient."""
        due = self.due()
        if not due:
            self.refusal = refusal
        return outcomes.refused_locally(self.prepared, due, str(refusal))

    def cut_off(self, reason: str, *, final_dot_out: bool) -> SendResult:
        return outcomes.cut_off(self.prepared, self.due(), reason, final_dot_out=final_dot_out)

    def merged(self, result: SendResult, due: list[RecipientResult]) -> SendResult:
        return outcomes.merged(
            result,
            self.settled,
            due,
            order=self.order(result),
            attempts=self.attempts,
            earlier_unknown=self.unknown_seen,
        )

    def abandoned(self) -> SendResult:
        return outcomes.abandoned(
            self.prepared,
            self.due(),
            self.last,
            self.settled,
            order=self.order(self.last) if self.last is not None else [],
            attempts=self.attempts,
            earlier_unknown=self.unknown_seen,
        )


@dataclass(frozen=True, slots=True)
class Retry:
    """The job goes again after ``delay`` seconds (0: at once)."""

    delay: float


class Ledger:
    """Every job handed over and not finished, and the pool's counts."""

    def __init__(
        self, retry: RetryPolicy, clock: Callable[[], float], idle: Callable[[], None]
    ) -> None:
        self.retry = retry
        self._clock = clock
        #: Called when the last job held finishes.
        self._idle = idle
        #: Jobs handed over and not finished yet, in order (a dict as an ordered set).
        self.held: dict[Job, None] = {}
        #: Final results that a cancellation of the pool kept from their consumer.
        self.interrupted: list[SendResult] = []
        #: Jobs waiting for a worker (in the queue, or about to enter it).
        self.queued = 0
        #: Jobs a worker has taken and not finished with.
        self.in_flight = 0
        #: Jobs waiting for a retry's backoff or for their server to answer again.
        self.backoff = 0
        #: Finished jobs per final outcome (the value of :class:`Outcome`).
        self.done = {o.value: 0 for o in Outcome}
        self.retries = 0
        self.transparent_retries = 0
        self.unknown_seen = 0

    def job(self, message: MessageLike, done: Destination | None) -> Job:
        """A new job for ``message``, stamped now (``give_up_after`` counts from here)."""
        return Job(message, done, self._clock())

    # ---------------------------------------------------------------- hand over

    def hand_over(self, job: Job) -> None:
        """``job`` is the pool's now: it owes one result."""
        if job.done is not None:
            job.done.expect()
        self.held[job] = None
        self.queued += 1

    def take(self, job: Job) -> bool:
        """A worker took ``job`` from the queue; False if it was withdrawn while it
        waited there (the worker drops it)."""
        self.queued -= 1
        if job.final:
            return False
        job.taken = True
        self.in_flight += 1
        return True

    def put_down(self, count: int) -> None:
        """A worker is through with ``count`` jobs (each finished, or waiting again)."""
        self.in_flight -= count

    def wait_for_server(
        self, jobs: list[Job], down_for: float, reason: str, *, first: bool
    ) -> list[Job]:
        """A worker could not connect for ``jobs`` (``reason``); the server has been
        down ``down_for`` seconds. At the ``first`` failure each job is charged an
        attempt (not sent, transient; the last of ``max_attempts`` is kept for the
        final result); then it waits for the server, uncharged: a wait is not an
        attempt. Return those that give up: the server has been down ``max_backoff``
        seconds, or ``give_up_after`` has passed. The caller records their end."""
        policy, now = self.retry, self._clock()
        giving_up = []
        for job in jobs:
            if down_for >= policy.max_backoff or (
                policy.give_up_after is not None and now - job.first_attempt >= policy.give_up_after
            ):
                giving_up.append(job)
            elif first and job.attempts + 1 < policy.max_attempts:
                job.attempts += 1
                job.last = job.not_sent(reason)
                self.retries += 1
        return giving_up

    # ----------------------------------------------------------------- attempts

    def record(self, job: Job, result: SendResult, *, final: bool = False) -> SendResult | Retry:
        """Record one attempt; return the job's final result, or when to retry the
        recipients still due. ``final``: no retry whatever the outcome."""
        job.attempts += 1
        job.last = result
        if (
            job.attempts == 1
            and not job.settled
            and all(r.outcome in _FINAL for r in result.recipients)
        ):
            return result  # the common case: done at the first try
        retry_unknown = self.retry.unknown == "at-least-once"
        again: list[str] = []
        for r in result.recipients:
            if r.outcome is Outcome.UNKNOWN:
                job.unknown_seen = True
                self.unknown_seen += 1
            if r.outcome is Outcome.TRANSIENT or (r.outcome is Outcome.UNKNOWN and retry_unknown):
                again.append(r.recipient)
            else:
                job.settled.append(r)
        progress = any(r.outcome is Outcome.ACCEPTED for r in result.recipients)
        if again and progress and not final and all(_too_many(result, name) for name in again):
            job.attempts -= 1  # R42: a follow-up transaction, not a failed attempt
            job.pending = tuple(again)
            return Retry(0.0)
        policy = self.retry
        give_up = (
            final
            or job.attempts >= policy.max_attempts
            or (
                policy.give_up_after is not None
                and self._clock() - job.first_attempt >= policy.give_up_after
            )
        )
        if again and not give_up:
            job.pending = tuple(again)
            self.retries += 1
            return Retry(policy.delay(job.attempts))
        by_name = {r.recipient: r for r in result.recipients}
        return job.merged(result, [by_name[name] for name in again])

    def accept_at_once(self, job: Job, result: SendResult) -> bool:
        """Finish a job accepted at its first attempt, if its consumer has room now
        (a pipelined run reports each acceptance as it comes)."""
        done = job.done
        if done is not None and not done.put_nowait(result):
            return False
        job.attempts = 1
        job.last = result
        self.done[_ACCEPTED] += 1
        self._end(job)
        return True

    # -------------------------------------------------------------------- endings

    def delivered(self, job: Job, outcome: Outcome) -> None:
        """The consumer has the job's final result."""
        self.done[outcome.value] += 1
        self._end(job)

    def interrupt(self, job: Job, result: SendResult) -> None:
        """The pool's cancellation keeps ``job`` from its consumer: its final ``result``
        goes to :attr:`interrupted` instead."""
        if job.final:
            return  # already recorded (the last worker ended first)
        self.interrupted.append(result)
        if job.done is not None:
            job.done.withdraw()
        self._end(job)

    def cut_short(self, job: Job, result: SendResult) -> None:
        """A cancellation cut the job's attempt short: ``result`` is its last, and the
        job's final result goes to :attr:`interrupted`."""
        if job.final:
            return
        final = self.record(job, result, final=True)
        assert isinstance(final, SendResult)
        self.interrupt(job, final)

    def abandon(self, job: Job) -> None:
        """The job was only waiting (queued, or for a retry) when the pool was cancelled."""
        if not job.final:
            self.interrupt(job, job.abandoned())

    def abandon_all(self) -> None:
        """No worker is left: every job still held was only waiting."""
        for job in list(self.held):
            self.abandon(job)

    def withdraw(self, job: Job) -> None:
        """No result is owed for the job: its hand-over failed, or the caller of
        ``Pool.send`` was cancelled before a worker took it (if it is still queued, the
        worker that takes it drops it)."""
        self._end(job)
        if job.done is not None:
            job.done.withdraw()

    def _end(self, job: Job) -> None:
        job.final = True
        del self.held[job]
        if not self.held:
            self._idle()


def _too_many(result: SendResult, recipient: str) -> bool:
    for r in result.recipients:
        if r.recipient == recipient:
            return r.reply is not None and r.reply.code in (452, 552)
    return False
