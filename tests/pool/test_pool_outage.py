"""A server that goes away and comes back: the pool waits for it, says so, and uses it
again as soon as it answers.

The outage is counted in backoff windows, not in failed attempts of every worker, and
the windows stay short enough that a server back after 20 s is found within seconds.
"""

from __future__ import annotations

import logging

import pytest
import trio
from helpers.postfix import free_loopback_port

import triomail
from triomail import SendResult, Server
from triomail.testing import SMTPSink

OUTAGE = 20.0
SENDS = 30


def _message(i: int) -> triomail.PreparedMessage:
    data = f"Message-ID: <o{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"u{i}@example.org"])


async def test_sends_resume_within_seconds_of_a_20_s_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="triomail")
    port = free_loopback_port()
    server = Server("127.0.0.1", port, tls="none")
    finished: dict[int, tuple[float, SendResult]] = {}
    with trio.fail_after(OUTAGE + 30):
        async with triomail.open_pool(server) as pool:  # the default policy

            async def send(i: int) -> None:
                result = await pool.send(_message(i))
                finished[i] = (trio.current_time(), result)

            async with trio.open_nursery() as nursery:
                for i in range(SENDS):
                    nursery.start_soon(send, i)
                await trio.sleep(OUTAGE / 2)
                during = pool.statistics()
                await trio.sleep(OUTAGE / 2)
                async with SMTPSink(host="127.0.0.1", port=port, tls=False) as sink:
                    back = trio.current_time()
                    await sink.wait_for_messages(SENDS, timeout=15)
                    nursery.cancel_scope.deadline = back + 15
    assert finished.keys() == set(range(SENDS))
    assert all(result.ok for _, result in finished.values())
    late = max(when for when, _ in finished.values()) - back
    assert late < 5.0, f"the last send finished {late:.1f} s after the server came back"
    # While it was down: every send counted, in backoff, none "idle" below zero.
    assert during.backoff + during.queued + during.in_flight == SENDS, during
    assert during.backoff > 0 and during.connections_idle >= 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "cannot connect" in warnings[0].getMessage()
    # One failure per backoff window, not one per worker's attempt.
    assert len(warnings) < 15
    assert any("connected again" in r.getMessage() for r in caplog.records)
