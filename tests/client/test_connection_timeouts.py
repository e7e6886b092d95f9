"""Deadlines and cancellation on virtual time (issue 2): R26, R27 (and R37, R46).

Every test runs on ``trio.testing.MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock``) over in-memory streams, so the RFC 5321 minutes take no real time and
the instants asserted below are exact.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from helpers.connection_script import EHLO, prelude, session
from helpers.scripted import (
    Step,
    bounded_stream_pair,
    dribble,
    expect_data,
    expect_eof,
    expect_line,
    never_read,
    reply,
    scripted_stream,
)

import triomail
from triomail import Outcome

MSG = b"Subject: test\r\n\r\nHello.\r\n"
MAIL = b"MAIL FROM:<s@x.test>\r\n"
RCPT = b"RCPT TO:<r@y.test>\r\n"


def to_data() -> list[Step]:
    return [
        expect_line(MAIL),
        reply(250, "ok"),
        expect_line(RCPT),
        reply(250, "ok"),
        expect_line("DATA"),
        reply(354, "go"),
    ]


async def send(conn: triomail.SMTPConnection, message: bytes = MSG) -> triomail.SendResult:
    return await conn.send(message, sender="s@x.test", recipients=["r@y.test"])


# ------------------------------------------------------------------------------ R26


async def test_R26_dribbling_reply_fails_at_the_deadline_not_reset_by_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R26: a reply dribbled one byte every 10 s: the NOOP fails 60 s after it was sent
    although a byte arrived 10 s earlier (an idle timer would wait until 110 s)."""
    script = [
        *prelude(),
        expect_line("NOOP"),
        dribble(b"250 2.", every=10),  # bytes at 0, 10, ..., 50 s
        expect_eof(timeout=100, allow_quit=False),
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream, timeouts=triomail.Timeouts(noop=60))
        start = trio.current_time()
        with pytest.raises(triomail.SMTPTimeoutError) as info:
            await conn.noop()
        assert trio.current_time() - start == pytest.approx(60)
        assert info.value.stage == "NOOP"
        assert not conn.is_usable
    assert srv.transcript.data() == EHLO + b"NOOP\r\n"


async def test_R26_slow_loris_mail_reply_fails_at_the_rfc_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R26: with the RFC default MAIL deadline (5 min), a MAIL reply dribbled over 280 s
    and never finished ends the transaction at exactly 300 s: transient, closed (R27)."""
    assert triomail.Timeouts().mail == 300
    script = [
        *prelude(),
        expect_line(MAIL),
        dribble(b"250 2.1.0 sender ok, but sl", every=10),  # 27 bytes, the last at 260 s
        expect_eof(timeout=100, allow_quit=False),
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        start = trio.current_time()
        result = await send(conn)
        assert trio.current_time() - start == pytest.approx(300)
    assert result.outcome is Outcome.TRANSIENT
    assert "MAIL" in (result.error or "") and "Timeout" in (result.error or "")
    assert srv.transcript.data() == EHLO + MAIL


async def test_R26_R37_no_reply_to_the_final_dot_is_unknown_after_ten_minutes(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """R26/R37: the final dot is never answered: after 10 virtual minutes the outcome is
    *unknown* (it may have been delivered), with a warning in the log."""
    assert triomail.Timeouts().data_done == 600
    script = [*prelude(), *to_data(), expect_data(), expect_eof(timeout=700, allow_quit=False)]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        start = trio.current_time()
        result = await send(conn)
        assert trio.current_time() - start == pytest.approx(600)
        assert conn.awaiting_final_reply and not conn.is_usable
    assert result.recipients[0].outcome is Outcome.UNKNOWN
    assert srv.transcript.bodies == [MSG + b".\r\n"]
    assert any(
        r.levelno == logging.WARNING and "may have been delivered" in r.getMessage()
        for r in caplog.records
    )


async def test_R26_R46_never_reading_server_times_the_data_write_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R26/R46: a server that stops reading after 354: the body write gives up after the
    data-block deadline (3 min) and the recipient is transient (the dot never went)."""
    assert triomail.Timeouts().data_block == 180
    body = b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 1000  # 100 KB > 4 KB window
    script = [*prelude(), *to_data(), never_read()]
    async with scripted_stream(script, pair=bounded_stream_pair) as (stream, _):
        conn = await session(stream)
        start = trio.current_time()
        result = await send(conn, body)
        elapsed = trio.current_time() - start
        assert not conn.is_usable and not conn.awaiting_final_reply
    assert 180 <= elapsed <= 181  # the deadline, plus a short look for a last reply
    assert result.recipients[0].outcome is Outcome.TRANSIENT
    assert "data block" in (result.error or "")


async def test_R26_R46_each_data_chunk_has_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R46: the write deadline is per chunk: a 600 KB body read at 64 KB per 25 s takes
    ~250 s in all, but no chunk takes 180 s, so it goes through."""
    body = b"Subject: big\r\n\r\n" + (b"w" * 98 + b"\r\n") * 6000

    def pair() -> Any:
        return bounded_stream_pair(65536, server_max_read=65536, server_read_delay=25)

    script = [*prelude(), *to_data(), expect_data(timeout=1000), reply(250, "ok")]
    async with scripted_stream(script, pair=pair) as (stream, srv):
        conn = await session(stream)
        start = trio.current_time()
        result = await send(conn, body)
        assert trio.current_time() - start > 200
        await conn.abort()  # a QUIT would wait for this slow reader
    assert result.ok, result.error
    assert srv.transcript.bodies == [body + b".\r\n"]


# ------------------------------------------------------------------------------ R27


async def test_R27_cancel_during_rcpt_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R27: the caller's cancel scope fires while RCPT waits for its reply: the stream is
    closed at once (the server sees EOF), the connection is not usable, and the next
    send raises SMTPDisconnected without writing anything."""
    script = [*prelude(), expect_line(MAIL), reply(250, "ok"), expect_line(RCPT)]
    script.append(expect_eof(timeout=100, allow_quit=False))
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        with trio.move_on_after(5) as scope:
            await send(conn)
        assert scope.cancelled_caught
        assert not conn.is_usable
        with trio.fail_after(0.001):  # the server saw EOF at the moment of the cancel
            await srv.finished.wait()
        with pytest.raises(triomail.SMTPDisconnected):
            await send(conn)
        await conn.aclose()
    assert srv.transcript.data() == EHLO + MAIL + RCPT


async def test_R27_cancel_waiting_for_the_final_reply_marks_the_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R27/R37: cancelled after the final dot: closed, and ``awaiting_final_reply`` says
    the message may have been delivered (the pool classes it unknown)."""
    script = [*prelude(), *to_data(), expect_data(), expect_eof(timeout=100, allow_quit=False)]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        with trio.move_on_after(5):
            await send(conn)
        assert conn.awaiting_final_reply and not conn.is_usable
        with trio.fail_after(0.001):
            await srv.finished.wait()
    assert srv.transcript.bodies == [MSG + b".\r\n"]


async def test_R27_cancel_during_the_greeting_closes_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R27: start_session cancelled while waiting for the greeting: the stream is closed,
    nothing was written."""
    async with scripted_stream([expect_eof(timeout=100, allow_quit=False)]) as (stream, srv):
        with trio.move_on_after(5) as scope:
            await session(stream)
        assert scope.cancelled_caught
        with trio.fail_after(0.001):
            await srv.finished.wait()
    assert srv.transcript.data() == b""
