"""The pool against a server that refuses commands pipelined behind an end of data
(issue 17; the capture sink plays Haraka's policy): nothing is lost, nothing counts
as another attempt, and the server's later connections start in the mode it takes."""

from __future__ import annotations

import pytest

import triomail
from triomail import Outcome, Server
from triomail.testing import SMTPSink


def _message(i: int) -> triomail.PreparedMessage:
    data = f"Message-ID: <m{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"r{i}@example.org"], tag=i)


def _fallbacks(caplog: pytest.LogCaptureFixture) -> int:
    return sum("behind an end of data" in r.getMessage() for r in caplog.records)


async def test_refused_transactions_are_sent_again_without_an_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 300
    with caplog.at_level("INFO", logger="triomail"):
        async with (
            SMTPSink(
                tls=False, hide_extensions=["CHUNKING"], refuse_pipelined_after_data=True
            ) as sink,
            triomail.open_pool(Server(sink.host, sink.port, tls="none"), connections=3) as pool,
            pool.send_all(_message(i) for i in range(n)) as results,
        ):
            got = [result async for result in results]
            assert pool.statistics().done[Outcome.ACCEPTED.value] == n
    assert sorted(r.tag for r in got) == list(range(n))  # type: ignore[type-var]
    assert all(r.ok and r.attempts == 1 for r in got)
    ids = [m.data.split(b"\r\n", 1)[0] for m in sink.messages]
    assert len(ids) == n and len(set(ids)) == n  # each once
    assert 1 <= _fallbacks(caplog) <= 3  # once per connection that met the refusal


async def test_the_pool_remembers_the_fallback_for_the_next_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One connection at a time, ten messages each: only the first meets a 503."""
    with caplog.at_level("INFO", logger="triomail"):
        async with (
            SMTPSink(
                tls=False, hide_extensions=["CHUNKING"], refuse_pipelined_after_data=True
            ) as sink,
            triomail.open_pool(
                Server(sink.host, sink.port, tls="none"),
                connections=1,
                max_messages_per_connection=10,
            ) as pool,
            pool.send_all(_message(i) for i in range(50)) as results,
        ):
            got = [result async for result in results]
    assert all(r.ok and r.attempts == 1 for r in got)
    assert len(sink.messages) == 50
    assert _fallbacks(caplog) == 1
