"""Cancelling the pool: every message it was handed ends with exactly one result.

A message handed to ``send_all`` is either delivered on the results channel or, when
the pool is cancelled first, reported in ``pool.interrupted``: cut off on the wire
(unknown after the final dot), queued or waiting for a free slot (transient, "not
sent"), or waiting for a retry's backoff (its last attempt's outcome, with the
``earlier_unknown`` flag if an earlier attempt may have delivered it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import trio
from helpers.mail import message_id
from helpers.scripted import (
    abort,
    ehlo_reply,
    expect,
    expect_data,
    expect_line,
    reply,
    scripted_server,
    send_lines,
)

import triomail
from triomail import Outcome, RetryPolicy, SendResult, Server
from triomail.testing import Fault, SMTPSink


def _message(i: int) -> triomail.PreparedMessage:
    data = f"Message-ID: <m{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"r{i}@example.org"], tag=i)


async def test_cancelling_the_pool_reports_queued_and_backed_off_messages() -> None:
    """One connection, DATA only (so the order of transactions is known): m0 is
    accepted, m1 is refused 451 and m2 loses the reply to its final dot (the sink has
    it): both wait for a 60 s backoff. m3-m5 are accepted on a new connection, m6's
    RCPT reply never comes, and the rest are queued or not yet taken from the feed
    when the pool is cancelled."""
    n = 40
    faults = [
        Fault("RCPT", code=451, text="4.3.0 try later", recipient="r1@example.org"),
        Fault(".", drop="before_reply", message=3),
        Fault("RCPT", delay=30.0, recipient="r6@example.org"),
    ]
    policy = RetryPolicy(max_attempts=5, initial_backoff=60.0, jitter=0.0)
    handed: list[int] = []

    def feed() -> Iterator[triomail.PreparedMessage]:
        for i in range(n):
            handed.append(i)
            yield _message(i)

    delivered: list[SendResult] = []
    five_stored = trio.Event()  # m0, m2, m3, m4, m5

    def on_message(message: object) -> None:
        if len(sink.messages) >= 5:
            five_stored.set()

    sink = SMTPSink(tls=False, hide_extensions=["CHUNKING"], faults=faults, on_message=on_message)
    async with sink:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                pool_scope = trio.CancelScope()
                pools: list[triomail.Pool] = []

                async def run_pool() -> None:
                    with pool_scope:
                        async with (
                            triomail.open_pool(
                                Server(sink.host, sink.port, tls="none"),
                                connections=1,
                                retry=policy,
                            ) as pool,
                            pool.send_all(feed()) as results,
                        ):
                            pools.append(pool)
                            async for result in results:
                                delivered.append(result)

                nursery.start_soon(run_pool)
                await five_stored.wait()
                await trio.sleep(0.3)  # m6 waits for its RCPT reply
                pool_scope.cancel()
    pool = pools[0]
    interrupted = {r.tag: r for r in pool.interrupted}
    by_tag = {r.tag: r for r in delivered}
    # Every message handed over has exactly one result, delivered or interrupted.
    tags = Counter([r.tag for r in delivered] + [r.tag for r in pool.interrupted])
    assert set(tags.values()) == {1}, tags
    assert sorted(tags) == handed  # type: ignore[type-var]
    assert len(handed) > 7 + 16  # some were queued when the pool was cancelled

    stored = Counter(message_id(m.data) for m in sink.messages)
    assert set(stored.values()) == {1}
    assert {f"<m{i}@test>" for i in (0, 2, 3, 4, 5)} <= set(stored)
    for i in (0, 3, 4, 5):
        assert by_tag[i].ok
    # m1: refused 451, waiting for its retry: transient, with the server's reply.
    m1 = interrupted[1]
    assert m1.outcome is Outcome.TRANSIENT and not m1.earlier_unknown
    assert m1.attempts == 1 and m1.recipients[0].code == 451
    assert "not sent again" in (m1.error or "")
    # m2: its reply was lost (the sink has it), waiting for a resend: still unknown.
    m2 = interrupted[2]
    assert m2.outcome is Outcome.UNKNOWN and m2.earlier_unknown and m2.attempts == 1
    # m6 is cut off on the wire, with the envelopes pipelined behind it: unknown.
    cut = {tag for tag, r in interrupted.items() if r.error == "pool cancelled"}
    assert 6 in cut and len(cut) <= 16  # pipeline_depth
    assert all(interrupted[tag].outcome is Outcome.UNKNOWN for tag in cut)
    # The rest never reached the server: transient, not sent, no attempt.
    never = [r for tag, r in interrupted.items() if tag not in {1, 2} | cut]
    assert len(never) >= 10  # the queue and the message the feeder was handing over
    for r in never:
        assert r.outcome is Outcome.TRANSIENT and r.attempts == 0, r
        assert not r.earlier_unknown and not r.mail_accepted
        assert "not sent" in (r.error or "")
        assert r.message_id not in stored
    # Honest: whatever the sink holds is accepted or flagged as possibly delivered.
    for r in [*delivered, *pool.interrupted]:
        if r.message_id in stored:
            assert r.ok or r.outcome is Outcome.UNKNOWN or r.earlier_unknown, r


async def test_a_message_possibly_delivered_stays_flagged_when_its_retry_is_abandoned() -> None:
    """Attempt 1 loses the connection after the final dot (unknown); attempt 2 cannot
    connect (transient); the pool is cancelled during the next backoff. The result is
    transient with ``earlier_unknown``: the first copy may have been delivered."""
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.2, multiplier=100.0, jitter=0.0)
    script = [
        send_lines("220 scripted ESMTP"),
        expect(b"EHLO "),
        ehlo_reply("8BITMIME"),
        expect_line(b"MAIL FROM:<s@example.com>\r\n"),
        reply(250, "ok"),
        expect_line(b"RCPT TO:<r1@example.org>\r\n"),
        reply(250, "ok"),
        expect_line(b"DATA\r\n"),
        reply(354, "go"),
        expect_data(),
        abort(),  # later connections are closed at once: attempt 2 fails to connect
    ]
    async with scripted_server(script) as srv:
        with trio.move_on_after(1.5) as scope:  # retry 2 waits 20 s
            async with triomail.open_pool(
                Server(srv.host, srv.port, tls="none"), connections=1, retry=policy
            ) as pool:
                await pool.send(_message(1))
    assert scope.cancelled_caught
    assert srv.connections >= 2
    assert pool.statistics().retries == 2
    [result] = pool.interrupted
    assert result.tag == 1 and result.attempts == 2
    assert result.outcome is Outcome.TRANSIENT and result.earlier_unknown
    assert "possible duplicate" in (result.error or "")
