"""The pool against a server that refuses commands pipelined behind an end of data
(issue 17; the capture sink plays Haraka's policy): nothing is lost, nothing counts
as another attempt, and the server's later connections start in the mode it takes."""

from __future__ import annotations

from typing import Any

import pytest

import triomail
from triomail import Outcome, Server
from triomail._pool.options import PoolOptions
from triomail.testing import Fault, SMTPSink


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


HARAKA: dict[str, Any] = {"refuse_pipelined_after_data": True}


async def _send(n: int, sink_options: dict[str, Any], **pool_options: Any) -> None:
    """``n`` messages through a pool to a sink with ``sink_options``; every one must be
    accepted at its first attempt and stored once."""
    async with (
        SMTPSink(tls=False, hide_extensions=["CHUNKING"], **sink_options) as sink,
        triomail.open_pool(Server(sink.host, sink.port, tls="none"), **pool_options) as pool,
        pool.send_all(_message(i) for i in range(n)) as results,
    ):
        got = [result async for result in results]
    assert all(r.ok and r.attempts == 1 for r in got), [str(r) for r in got if not r.ok]
    assert len(sink.messages) == n


async def test_the_pool_remembers_the_fallback_for_the_next_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One connection at a time, ten messages each: only the first meets a 503."""
    with caplog.at_level("INFO", logger="triomail"):
        await _send(50, HARAKA, connections=1, max_messages_per_connection=10)
    assert _fallbacks(caplog) == 1


async def test_started_in_within_the_pool_meets_no_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``pipeline="within"``: nothing is ever written behind an end of data, so the
    server never refuses anything and no connection has to fall back."""
    with caplog.at_level("INFO", logger="triomail"):
        await _send(100, HARAKA, connections=3, pipeline="within")
    assert _fallbacks(caplog) == 0


@pytest.mark.parametrize("pipeline_depth", [1, 16])
async def test_started_off_the_pool_writes_one_command_at_a_time(pipeline_depth: int) -> None:
    """``pipeline="off"`` against a sink that closes the connection on any command
    pipelined behind MAIL, RCPT or an end of data; also one message at a time
    (``pipeline_depth=1``), where the pool uses ``send``."""
    faults = [Fault(command, forbid_pipelined=True) for command in ("MAIL", "RCPT", ".")]
    await _send(
        40, {"faults": faults}, connections=2, pipeline="off", pipeline_depth=pipeline_depth
    )


def test_an_unknown_mode_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="pipeline must be 'cross', 'within' or 'off'"):
        PoolOptions(pipeline="fast")  # type: ignore[arg-type]
