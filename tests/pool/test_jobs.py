"""The job ledger, driven with plain calls: no trio, no sockets, a clock of our own.

Each test hands jobs over, records attempts as a worker would, and checks what the
ledger decides and that every job ends with exactly one result, delivered or
interrupted.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

import triomail
from triomail import Outcome, RecipientResult, RetryPolicy, SendResult
from triomail._core.reply import Reply
from triomail._pool import jobs
from triomail._pool.jobs import Job, Ledger, Retry

NO_JITTER = RetryPolicy(max_attempts=3, initial_backoff=2.0, multiplier=3.0, jitter=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Consumer:
    """A ``Destination`` that takes results while it has room."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.owed = 0
        self.got: list[SendResult] = []

    def expect(self) -> None:
        self.owed += 1

    def put_nowait(self, result: SendResult) -> bool:
        if len(self.got) >= self.room:
            return False
        self.got.append(result)
        self.owed -= 1
        return True

    async def put(self, result: SendResult) -> None:
        raise AssertionError("the ledger never waits")

    def withdraw(self) -> None:
        self.owed -= 1


class Book:
    """A ledger, its clock, its consumer, and how often it went idle."""

    def __init__(self, retry: RetryPolicy = NO_JITTER, room: int = 1000) -> None:
        self.clock = Clock()
        self.idle = 0
        self.ledger = Ledger(retry, self.clock, self.went_idle)
        self.consumer = Consumer(room)

    def went_idle(self) -> None:
        self.idle += 1

    def hand_over(self, *recipients: str, i: int = 1) -> Job:
        message = triomail.prepare(
            f"Message-ID: <m{i}@test>\r\n\r\nbody\r\n".encode(),
            sender="from@example.com",
            recipients=list(recipients) or ["a@example.org"],
            tag=i,
        )
        job = self.ledger.job(message, self.consumer)
        self.ledger.hand_over(job)
        assert self.ledger.take(job)
        return job

    def finish(self, job: Job, verdict: SendResult | Retry) -> SendResult:
        """Hand a final result over, as the dispatch does."""
        assert isinstance(verdict, SendResult)
        assert self.consumer.put_nowait(verdict)
        self.ledger.delivered(job, verdict.outcome)
        return verdict

    def results(self) -> list[SendResult]:
        return [*self.consumer.got, *self.ledger.interrupted]


def attempt(
    job: Job, *outcomes: tuple[str, Outcome, int | None], error: str | None = None
) -> SendResult:
    """One transaction's result for ``job``: (recipient, outcome, reply code)."""
    assert job.prepared is not None
    return SendResult(
        job.prepared.sender,
        tuple(
            RecipientResult(name, outcome, Reply(code, (f"{code} x",)) if code else None)
            for name, outcome, code in outcomes
        ),
        None,
        job.prepared.message_id,
        error,
        tag=job.prepared.tag,
        mail_accepted=True,
    )


ACCEPTED = Outcome.ACCEPTED
TRANSIENT = Outcome.TRANSIENT
PERMANENT = Outcome.PERMANENT
UNKNOWN = Outcome.UNKNOWN


def test_hand_over_holds_the_job_and_counts_it() -> None:
    book = Book()
    job = book.ledger.job(triomail.prepare(b"\r\n", sender="f@x", recipients=["a@y"]), None)
    assert job.first_attempt == 100.0
    book.ledger.hand_over(job)
    assert list(book.ledger.held) == [job]
    assert (book.ledger.queued, book.ledger.in_flight) == (1, 0)
    assert book.ledger.take(job)
    assert (book.ledger.queued, book.ledger.in_flight) == (0, 1)
    assert job.taken


def test_a_job_withdrawn_while_queued_is_dropped_by_the_worker_that_takes_it() -> None:
    book = Book()
    job = book.ledger.job(triomail.prepare(b"\r\n", sender="f@x", recipients=["a@y"]), None)
    book.ledger.hand_over(job)
    book.ledger.withdraw(job)  # its Pool.send caller was cancelled
    assert list(book.ledger.held) == [] and book.ledger.interrupted == []
    assert book.ledger.take(job) is False
    assert (book.ledger.queued, book.ledger.in_flight) == (0, 0)


def test_an_attempt_that_settles_every_recipient_is_final_at_once() -> None:
    book = Book()
    job = book.hand_over("a@x", "b@x")
    result = attempt(job, ("a@x", ACCEPTED, 250), ("b@x", PERMANENT, 550))
    verdict = book.ledger.record(job, result)
    assert verdict is result  # the hot path builds nothing
    book.finish(job, verdict)
    assert job.final and not book.ledger.held and book.idle == 1
    assert book.ledger.done == {"accepted": 0, "transient": 0, "permanent": 1, "unknown": 0}


def test_accept_at_once_delivers_if_the_consumer_has_room() -> None:
    book = Book(room=1)
    first, second = book.hand_over(i=1), book.hand_over(i=2)
    ok1 = attempt(first, ("a@example.org", ACCEPTED, 250))
    ok2 = attempt(second, ("a@example.org", ACCEPTED, 250))
    assert book.ledger.accept_at_once(first, ok1)
    assert not book.ledger.accept_at_once(second, ok2)  # no room: the worker keeps it
    assert first.final and first.attempts == 1 and not second.final
    assert book.ledger.done["accepted"] == 1 and book.idle == 0


def test_transient_recipients_retry_after_the_policy_delay_and_the_result_merges() -> None:
    book = Book()
    job = book.hand_over("a@x", "b@x", "c@x")
    first = attempt(job, ("a@x", ACCEPTED, 250), ("b@x", TRANSIENT, 451), ("c@x", TRANSIENT, 450))
    assert book.ledger.record(job, first) == Retry(NO_JITTER.initial_backoff)
    assert job.pending == ("b@x", "c@x") and book.ledger.retries == 1
    second = attempt(job, ("b@x", TRANSIENT, 451), ("c@x", PERMANENT, 550))
    assert book.ledger.record(job, second) == Retry(2.0 * 3.0)
    assert job.pending == ("b@x",)
    third = attempt(job, ("b@x", ACCEPTED, 250))
    final = book.finish(job, book.ledger.record(job, third))
    assert [(r.recipient, r.outcome) for r in final.recipients] == [
        ("a@x", ACCEPTED),
        ("b@x", ACCEPTED),
        ("c@x", PERMANENT),
    ]
    assert final.attempts == 3 and not final.earlier_unknown
    assert book.ledger.done["permanent"] == 1


def test_max_attempts_ends_with_the_last_transient_replies() -> None:
    book = Book()
    job = book.hand_over()
    for _ in range(NO_JITTER.max_attempts - 1):
        verdict = book.ledger.record(job, attempt(job, ("a@example.org", TRANSIENT, 421)))
        assert isinstance(verdict, Retry)
    last = attempt(job, ("a@example.org", TRANSIENT, 452), error="busy")
    final = book.finish(job, book.ledger.record(job, last))
    assert final.outcome is TRANSIENT and final.attempts == 3 and final.error == "busy"
    assert final.recipients[0].code == 452


def test_give_up_after_counts_from_the_first_attempt_on_the_clock() -> None:
    book = Book(RetryPolicy(max_attempts=99, give_up_after=60.0, jitter=0.0))
    job = book.hand_over()
    assert isinstance(
        book.ledger.record(job, attempt(job, ("a@example.org", TRANSIENT, 421))), Retry
    )
    book.clock.now += 60.0
    verdict = book.ledger.record(job, attempt(job, ("a@example.org", TRANSIENT, 421)))
    assert isinstance(verdict, SendResult) and verdict.attempts == 2


def test_too_many_recipients_after_progress_retries_now_uncounted() -> None:
    """R42: 452 to some RCPTs after others were accepted: the rest go at once."""
    book = Book()
    job = book.hand_over("a@x", "b@x")
    verdict = book.ledger.record(job, attempt(job, ("a@x", ACCEPTED, 250), ("b@x", TRANSIENT, 452)))
    assert verdict == Retry(0.0)
    assert job.attempts == 0 and job.pending == ("b@x",) and book.ledger.retries == 0


def test_unknown_is_resent_at_least_once_and_flagged_as_possible_duplicate() -> None:
    book = Book()
    job = book.hand_over()
    assert isinstance(
        book.ledger.record(job, attempt(job, ("a@example.org", UNKNOWN, None))), Retry
    )
    final = book.finish(
        job, book.ledger.record(job, attempt(job, ("a@example.org", ACCEPTED, 250)))
    )
    assert final.ok and final.earlier_unknown and "possible duplicate" in (final.error or "")
    assert book.ledger.unknown_seen == 1


def test_unknown_is_final_at_most_once() -> None:
    book = Book(RetryPolicy(unknown="at-most-once"))
    job = book.hand_over()
    verdict = book.ledger.record(job, attempt(job, ("a@example.org", UNKNOWN, None)))
    assert isinstance(verdict, SendResult) and verdict.outcome is UNKNOWN


def test_final_records_no_retry() -> None:
    book = Book()
    job = book.hand_over()
    verdict = book.ledger.record(job, attempt(job, ("a@example.org", TRANSIENT, 421)), final=True)
    assert isinstance(verdict, SendResult) and verdict.outcome is TRANSIENT


def test_interrupt_sends_the_result_to_interrupted_and_withdraws_it() -> None:
    book = Book()
    job = book.hand_over()
    cut = attempt(job, ("a@example.org", UNKNOWN, None), error="pool cancelled")
    book.ledger.cut_short(job, cut)
    [result] = book.ledger.interrupted
    assert result.outcome is UNKNOWN and result.attempts == 1
    assert book.consumer.owed == 0 and not book.consumer.got and book.idle == 1
    book.ledger.interrupt(job, cut)  # a second word changes nothing
    assert len(book.ledger.interrupted) == 1


def test_abandon_a_job_never_sent_and_one_waiting_for_a_retry() -> None:
    book = Book()
    never = book.hand_over("a@x", i=1)
    waiting = book.hand_over("a@x", "b@x", i=2)
    book.ledger.record(waiting, attempt(waiting, ("a@x", ACCEPTED, 250), ("b@x", UNKNOWN, None)))
    book.ledger.abandon_all()
    first, second = book.ledger.interrupted
    assert first.tag == 1 and first.attempts == 0 and first.outcome is TRANSIENT
    assert first.error == "not sent: cancelled before it was sent"
    assert second.tag == 2 and second.attempts == 1 and second.earlier_unknown
    assert [(r.recipient, r.outcome) for r in second.recipients] == [
        ("a@x", ACCEPTED),
        ("b@x", UNKNOWN),
    ]
    assert (second.error or "").startswith("not sent again: cancelled before the retry")
    assert never.final and waiting.final and not book.ledger.held


def test_withdraw_owes_no_result() -> None:
    book = Book()
    job = book.hand_over()
    book.ledger.withdraw(job)
    assert job.final and not book.results() and book.consumer.owed == 0 and book.idle == 1


@pytest.mark.parametrize("seed", range(20))
def test_exactly_one_result_per_job_whatever_happens(seed: int) -> None:
    """Random attempts, interruptions and an abandon at the end: every job handed over
    ends with exactly one result, delivered or interrupted, and the counts add up."""
    rng = random.Random(seed)
    book = Book(RetryPolicy(max_attempts=3, jitter=0.0))
    jobs = [book.hand_over("a@x", "b@x", i=i) for i in range(30)]
    outcomes = [ACCEPTED, TRANSIENT, PERMANENT, UNKNOWN]
    for _ in range(4):
        for job in jobs:
            if job.final or rng.random() < 0.3:
                continue  # still waiting
            names = job.pending or ("a@x", "b@x")
            result = attempt(job, *((n, rng.choice(outcomes), None) for n in names))
            if rng.random() < 0.1:
                book.ledger.cut_short(job, result)
                continue
            verdict = book.ledger.record(job, result)
            if isinstance(verdict, SendResult):
                book.finish(job, verdict)
    book.ledger.abandon_all()
    tags = sorted(r.tag for r in book.results())
    assert tags == list(range(30))
    assert not book.ledger.held and book.consumer.owed == 0 and book.idle == 1
    assert sum(book.ledger.done.values()) == len(book.consumer.got)


def test_the_ledger_neither_imports_trio_nor_awaits() -> None:
    tree = ast.parse(Path(jobs.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "trio" for name in imported)
    assert not any(isinstance(node, ast.Await) for node in ast.walk(tree))
