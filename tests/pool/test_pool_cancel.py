"""Cancellation never loses a result, and a cancelled ``send`` cleans up after itself.

Cancelling the pool at any point of a ``send_all``: every message the server stored is
in the results or in ``pool.interrupted``, exactly once, including the results that
waited in the channel's buffer when the consumer was cancelled. Cancelling a caller of
``pool.send`` (a web request that went away) withdraws its message if no worker took it
yet, and lets it finish otherwise; neither touches ``pool.interrupted``.
"""

from __future__ import annotations

import random
from collections import Counter
from contextlib import nullcontext

import trio
from helpers.mail import message_id

import triomail
from triomail import Outcome, SendResult, Server
from triomail.testing import Fault, SMTPSink

RUNS = 200
CONNECTIONS = 4


def _message(run: int, i: int) -> triomail.PreparedMessage:
    data = f"Message-ID: <r{run}-m{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(
        data, sender="s@example.com", recipients=[f"u{i}@example.org"], tag=f"<r{run}-m{i}@test>"
    )


async def _batch(
    server: Server, run: int, size: int, cancel_after: float
) -> tuple[list[object], list[SendResult]]:
    """One ``send_all`` of ``size`` messages, the pool cancelled after ``cancel_after``
    seconds: the tags delivered, and ``pool.interrupted``."""
    delivered: list[object] = []
    pools: list[triomail.Pool] = []
    with trio.move_on_after(cancel_after):
        async with triomail.open_pool(server, connections=CONNECTIONS) as pool:
            pools.append(pool)
            async with pool.send_all(_message(run, i) for i in range(size)) as results:
                async for result in results:
                    delivered.append(result.tag)
    return delivered, pools[0].interrupted


async def test_a_randomly_cancelled_send_all_loses_no_result() -> None:
    rng = random.Random(12)
    runs: dict[int, Counter[object]] = {}
    async with SMTPSink(tls=False, max_stored=None, idle_timeout=None) as sink:
        server = Server(sink.host, sink.port, tls="none")
        with trio.fail_after(120):
            start = trio.current_time()
            await _batch(server, -1, 300, 60.0)  # how long a whole batch takes here
            whole = trio.current_time() - start
            for run in range(RUNS):
                size = rng.randrange(150, 450)
                delivered, interrupted = await _batch(
                    server, run, size, rng.uniform(0, whole * size / 300)
                )
                tags = Counter(delivered + [r.tag for r in interrupted])
                assert set(tags.values()) <= {1}, (run, tags.most_common(3))
                runs[run] = tags
            await trio.sleep(0.2)  # the sink stores what was in flight at the cancel
    stored = [message_id(m.data) for m in sink.messages]
    missing = []
    for mid in stored:
        run = int(mid[2 : mid.index("-m")])
        if run >= 0 and runs[run][mid] != 1:
            missing.append(mid)
    assert missing == [], f"{len(missing)} stored messages have no result: {missing[:5]}"
    assert len(stored) == len(set(stored))
    assert sum(len(t) for t in runs.values()) > RUNS * 50  # the cancels came late enough


async def test_a_cancelled_send_withdraws_or_finishes_and_never_fills_interrupted() -> None:
    """1,000 requests through 4 connections, a quarter of them cancelled at a random
    moment: queued ones are withdrawn (not sent), taken ones finish (counted)."""
    rng = random.Random(4)
    outcomes: list[SendResult] = []
    cancelled = 0
    slow = [Fault(".", delay=0.004)]  # each connection takes about 250 messages a second
    async with SMTPSink(tls=False, idle_timeout=None, faults=slow) as sink:
        server = Server(sink.host, sink.port, tls="none")
        with trio.fail_after(60):
            async with triomail.open_pool(server, connections=CONNECTIONS) as pool:

                async def request(i: int, cancel: bool) -> None:
                    nonlocal cancelled
                    scope = trio.move_on_after(rng.uniform(0, 0.5)) if cancel else nullcontext()
                    with scope:
                        outcomes.append(await pool.send(_message(0, i)))
                    if cancel and scope.cancelled_caught:  # type: ignore[union-attr]
                        cancelled += 1

                async with trio.open_nursery() as nursery:
                    for i in range(1000):
                        nursery.start_soon(request, i, rng.random() < 0.25)
                        if i % 50 == 0:
                            await trio.sleep(0.02)
            stats = pool.statistics()
        await trio.sleep(0.1)
    stored = len(sink.messages)
    assert cancelled > 50, cancelled
    assert pool.interrupted == []
    assert all(r.ok for r in outcomes)
    # Every message sent was counted, whether its caller was there for the result or not;
    # the withdrawn ones were never sent.
    assert stats.done[Outcome.ACCEPTED.value] == stored
    assert len(outcomes) <= stored <= len(outcomes) + cancelled
    assert (stats.queued, stats.in_flight) == (0, 0)
