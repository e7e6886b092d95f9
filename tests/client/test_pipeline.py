"""send_many / send_pipelined: PIPELINING across transactions and BDAT windows.

Three kinds of server:

- the scripted server (``scripted.py``), for byte-exact transcripts: what each
  ``send_all`` carried (a recording stream wraps the client's end), and replies given in
  any mix;
- :class:`RuleServer`, a tiny in-process SMTP server whose replies depend on the
  addresses (``r452@...`` gets 452, ``m550@...`` as sender gets 550 to MAIL, ...), to
  check that ``send_many`` reports exactly what ``send`` reports, message by message;
- Postfix ``smtpd`` (the ``postfix`` fixtures and a private instance with access rules),
  the reference server for PIPELINING and CHUNKING.
"""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from helpers.postfix import POSTFIX, PostfixInstance, as_sent, start_postfix
from helpers.scripted import (
    ScriptedServer,
    Step,
    abort,
    bounded_stream_pair,
    close,
    ehlo_reply,
    expect_data,
    expect_eof,
    expect_line,
    read_bytes,
    scripted_server,
    scripted_stream,
    send_lines,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import triomail
from triomail import Outcome, PreparedMessage, SendResult, SMTPConnection
from triomail._client import batch as batch_module
from triomail._client.chunking import WINDOW_MESSAGES
from triomail._client.pipeline import RCPT_GROUP
from triomail._core.data import dot_stuff
from triomail.testing import Fault, SMTPSink

# -- helpers ------------------------------------------------------------------------------

SENDER = "a@example.com"
MAIL = b"MAIL FROM:<a@example.com>\r\n"


def rcpt(addr: str) -> bytes:
    return b"RCPT TO:<%s>\r\n" % addr.encode()


def prep(
    body: bytes | str, *recipients: str, sender: str = SENDER, tag: object = None
) -> PreparedMessage:
    return triomail.prepare(body, sender=sender, recipients=list(recipients), tag=tag)


def body(n: int) -> bytes:
    return b"Subject: m%d\r\n\r\nbody %d\r\n" % (n, n)


class Recorder(trio.abc.Stream):
    """Wraps the client's stream and records every ``send_all`` payload exactly."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def scripted(
    script: Sequence[Step],
    *,
    caps: Sequence[str] = ("PIPELINING",),
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] | None = None,
) -> AsyncIterator[tuple[SMTPConnection, Recorder, ScriptedServer]]:
    """A session against ``script`` (after greeting and EHLO); yields the connection,
    the recorder of its writes (EHLO excluded) and the scripted server."""
    full = [
        send_lines("220 scripted ESMTP"),
        expect_line("EHLO client.test"),
        ehlo_reply(*caps),
        *script,
    ]
    pair = pair or trio.testing.memory_stream_pair
    async with scripted_stream(full, pair=pair) as (stream, srv):
        rec = Recorder(stream)
        conn = await triomail.start_session(
            rec, host="scripted.test", tls="none", local_hostname="client.test"
        )
        rec.writes.clear()
        try:
            yield conn, rec, srv
        finally:
            await conn.aclose()


@asynccontextmanager
async def session(
    script: Sequence[Step], *, caps: Sequence[str] = ("PIPELINING",), transport: str = "memory"
) -> AsyncIterator[tuple[SMTPConnection, ScriptedServer]]:
    """Like :func:`scripted`, over memory streams or over TCP on 127.0.0.1 (where the
    pipeline drives the socket itself)."""
    if transport == "memory":
        async with scripted(script, caps=caps) as (conn, _rec, srv):
            yield conn, srv
        return
    full = [
        send_lines("220 scripted ESMTP"),
        expect_line("EHLO client.test"),
        ehlo_reply(*caps),
        *script,
    ]
    async with scripted_server(full) as srv:
        conn = await triomail.open_connection(
            srv.host, srv.port, tls="none", local_hostname="client.test"
        )
        try:
            yield conn, srv
        finally:
            await conn.aclose()


def summary(result: SendResult) -> list[tuple[str, str, int | None]]:
    return [(r.recipient, r.outcome.value, r.code) for r in result.recipients]


def quit_steps() -> list[Step]:
    return [expect_line("QUIT"), send_lines("221 bye")]


# -- DATA: byte-exact groups ----------------------------------------------------------------


async def test_data_groups_carry_the_previous_body() -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 2.1.0 ok", "250 2.1.5 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        send_lines("250 2.0.0 queued 0", "250 2.1.0 ok", "250 2.1.5 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b2@example.com")),
        expect_line("DATA"),
        send_lines("250 2.0.0 queued 1", "250 2.1.0 ok", "250 2.1.5 ok", "354 go"),
        expect_data(), send_lines("250 2.0.0 queued 2"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, srv):
        results = await conn.send_many(m)
        writes = list(rec.writes)
    assert writes == [
        MAIL + rcpt("b0@example.com") + b"DATA\r\n",
        body(0) + b".\r\n" + MAIL + rcpt("b1@example.com") + b"DATA\r\n",
        body(1) + b".\r\n" + MAIL + rcpt("b2@example.com") + b"DATA\r\n",
        body(2) + b".\r\n",
    ]
    assert [r.ok for r in results] == [True, True, True]
    assert [r.reply.text for r in results if r.reply] == ["queued 0", "queued 1", "queued 2"]
    assert all(r.mail_accepted and r.error is None for r in results)
    assert srv.transcript.bodies == [body(0) + b".\r\n", body(1) + b".\r\n", body(2) + b".\r\n"]
    assert conn.messages_sent == 3 and conn.transactions == 3


async def test_dot_stuffing_and_bare_line_endings_in_pipelined_body() -> None:
    raw = b".starts with a dot\nbare LF\rbare CR\r\n.\r\n..two\r\nend"
    wire = b"..starts with a dot\r\nbare LF\r\nbare CR\r\n..\r\n...two\r\nend\r\n.\r\n"
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, srv):
        [result] = await conn.send_many([prep(raw, "b@example.com")])
        assert rec.writes[1] == wire
    assert result.ok
    assert srv.transcript.bodies == [wire]


async def test_mail_refused_needs_no_rset_and_does_not_leak() -> None:
    m = [prep(body(0), "b@example.com"), prep(body(1), "c@example.com")]
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("550 5.7.1 sender refused", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL"),
        expect_line(MAIL), expect_line(rcpt("c@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, _srv):
        first, second = await conn.send_many(m)
        assert rec.writes[1] == MAIL + rcpt("c@example.com") + b"DATA\r\n"
    assert summary(first) == [("b@example.com", "permanent", 550)]
    assert first.reply is not None and first.reply.code == 550 and not first.mail_accepted
    assert second.ok


async def test_data_refused_puts_rset_in_front_of_the_next_group() -> None:
    m = [prep(body(0), "x@example.com", "y@example.com"), prep(body(1), "c@example.com")]
    script = [
        expect_line(MAIL), expect_line(rcpt("x@example.com")), expect_line(rcpt("y@example.com")),
        expect_line("DATA"),
        send_lines("250 ok", "550 5.1.1 no x", "450 4.2.1 busy y", "554 5.5.1 no valid recipients"),
        expect_line("RSET"), expect_line(MAIL), expect_line(rcpt("c@example.com")),
        expect_line("DATA"),
        send_lines("250 2.0.0 reset", "250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, _srv):
        first, second = await conn.send_many(m)
        assert rec.writes[1] == b"RSET\r\n" + MAIL + rcpt("c@example.com") + b"DATA\r\n"
    assert summary(first) == [
        ("x@example.com", "permanent", 550),
        ("y@example.com", "transient", 450),
    ]
    assert first.reply is not None and first.reply.code == 554 and first.mail_accepted
    assert second.ok and summary(second) == [("c@example.com", "accepted", 250)]


async def test_last_transaction_refused_is_reset_before_returning() -> None:
    script = [
        expect_line(MAIL), expect_line(rcpt("x@example.com")), expect_line("DATA"),
        send_lines("250 ok", "550 no", "554 no valid recipients"),
        expect_line("RSET"), send_lines("250 reset"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, _rec, _srv):
        [result] = await conn.send_many([prep(body(0), "x@example.com")])
        assert conn.is_usable
    assert result.outcome is Outcome.PERMANENT


async def test_354_with_no_recipient_accepted_sends_only_the_dot() -> None:
    m = [prep(body(0), "x@example.com", "y@example.com"), prep(body(1), "c@example.com")]
    script = [
        expect_line(MAIL), expect_line(rcpt("x@example.com")), expect_line(rcpt("y@example.com")),
        expect_line("DATA"),
        send_lines("250 ok", "550 no x", "452 4.5.3 too many", "354 go ahead anyway"),
        expect_line("."), expect_line(MAIL), expect_line(rcpt("c@example.com")),
        expect_line("DATA"),
        send_lines("554 5.5.1 no valid recipients", "250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, _srv):
        first, second = await conn.send_many(m)
        assert rec.writes[1] == b".\r\n" + MAIL + rcpt("c@example.com") + b"DATA\r\n"
    assert summary(first) == [
        ("x@example.com", "permanent", 550),
        ("y@example.com", "transient", 452),
    ]
    assert first.reply is not None and first.reply.code == 554
    assert second.ok


RCPT_CODES = ("250", "452 4.5.3 too many recipients", "550 5.1.1 unknown", "450 4.2.1 busy")


@pytest.mark.parametrize("codes", list(itertools.product(RCPT_CODES, repeat=3)))
async def test_reply_mapping_every_mix(codes: tuple[str, str, str]) -> None:
    """Each RCPT reply maps to its own recipient; the next message is untouched."""
    rcpts = ["r0@example.com", "r1@example.com", "r2@example.com"]
    accepted = [c == "250" for c in codes]
    script: list[Step] = [
        expect_line(MAIL), *[expect_line(rcpt(r)) for r in rcpts], expect_line("DATA"),
    ]  # fmt: skip
    if any(accepted):
        script += [
            send_lines("250 ok", *codes, "354 go"),
            expect_data(),
            expect_line(MAIL), expect_line(rcpt("next@example.com")), expect_line("DATA"),
            send_lines("250 2.0.0 queued", "250 ok", "250 ok", "354 go"),
        ]  # fmt: skip
    else:
        script += [
            send_lines("250 ok", *codes, "554 5.5.1 no valid recipients"),
            expect_line("RSET"),
            expect_line(MAIL), expect_line(rcpt("next@example.com")), expect_line("DATA"),
            send_lines("250 reset", "250 ok", "250 ok", "354 go"),
        ]  # fmt: skip
    script += [expect_data(), send_lines("250 queued next"), *quit_steps()]
    async with scripted(script) as (conn, _rec, _srv):
        first, second = await conn.send_many(
            [prep(body(0), *rcpts), prep(body(1), "next@example.com")]
        )
    expected = []
    for r, c in zip(rcpts, codes, strict=True):
        code = int(c[:3])
        outcome = {250: "accepted", 452: "transient", 450: "transient", 550: "permanent"}[code]
        expected.append((r, outcome, code))
    assert summary(first) == expected
    assert second.ok and second.reply is not None and second.reply.text == "queued next"


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_452_then_250_maps_exactly(transport: str) -> None:
    """R42 (Exim bug 2692): 250 x3, 452, 250 -- each reply to its own recipient."""
    rcpts = [f"r{i}@example.com" for i in range(5)]
    codes = ["250 ok", "250 ok", "250 ok", "452 4.5.3 too many recipients", "250 ok"]
    script = [
        expect_line(MAIL), *[expect_line(rcpt(r)) for r in rcpts], expect_line("DATA"),
        send_lines("250 ok", *codes, "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with session(script, transport=transport) as (conn, _srv):
        [result] = await conn.send_many([prep(body(0), *rcpts)])
    assert summary(result) == [
        ("r0@example.com", "accepted", 250),
        ("r1@example.com", "accepted", 250),
        ("r2@example.com", "accepted", 250),
        ("r3@example.com", "transient", 452),
        ("r4@example.com", "accepted", 250),
    ]
    assert result.by_outcome(Outcome.TRANSIENT) == ["r3@example.com"]


async def test_final_reply_failure_does_not_leak_into_the_next() -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        send_lines("552 5.3.4 too big", "250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b2@example.com")),
        expect_line("DATA"),
        send_lines("451 4.3.0 try later", "250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, _srv):
        results = await conn.send_many(m)
        assert b"RSET" not in b"".join(rec.writes)  # the dot ends each transaction
    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.TRANSIENT, Outcome.ACCEPTED]
    assert conn.messages_sent == 1


# -- DATA: 421 and lost connections --------------------------------------------------------


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_421_to_rcpt_in_the_middle_of_a_group(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com", f"c{i}@example.com") for i in range(4)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line(rcpt("c0@example.com")),
        expect_line("DATA"),
        send_lines("250 ok", "250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line(rcpt("c1@example.com")), expect_line("DATA"),
        send_lines("250 queued 0", "250 ok", "550 no b1", "421 4.3.2 shutting down"),
        expect_eof(allow_quit=False),
    ]  # fmt: skip
    async with session(script, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
        assert not conn.is_usable
    assert results[0].ok
    assert summary(results[1]) == [
        ("b1@example.com", "permanent", 550),
        ("c1@example.com", "transient", 421),
    ]
    assert results[1].error == "server closing (421)"
    for r in results[2:]:
        assert r.outcome is Outcome.TRANSIENT and not r.mail_accepted
        assert r.error is not None and "never started" in r.error


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_421_to_final_dot_with_next_envelope_in_flight(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        send_lines("421 4.3.2 going down"),
        expect_eof(allow_quit=False),
    ]  # fmt: skip
    async with session(script, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
    assert summary(results[0]) == [("b0@example.com", "transient", 421)]
    assert summary(results[1]) == [("b1@example.com", "transient", None)]
    assert results[1].error is not None and "421" in results[1].error
    assert "never started" not in results[1].error
    assert results[2].error is not None and "never started" in results[2].error


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_421_to_mail(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(2)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("421 4.7.0 too busy"),
        expect_eof(allow_quit=False),
    ]  # fmt: skip
    async with session(script, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
    assert summary(results[0]) == [("b0@example.com", "transient", 421)]
    assert not results[0].mail_accepted
    assert "never started" in (results[1].error or "")


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_connection_lost_after_final_dot_is_unknown(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        abort(),
    ]  # fmt: skip
    seen: list[int] = []
    async with session(script, transport=transport) as (conn, _srv):
        results = await conn.send_many(m, on_result=lambda i, r: seen.append(i))
        assert not conn.is_usable
    assert [r.outcome for r in results] == [Outcome.UNKNOWN, Outcome.TRANSIENT, Outcome.TRANSIENT]
    assert results[0].error and "SMTPDisconnected" in results[0].error
    assert results[1].mail_accepted is False and "never started" not in (results[1].error or "")
    assert "never started" in (results[2].error or "")
    assert sorted(seen) == [0, 1, 2]


async def test_reply_timeout_classifies_like_a_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(2)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        expect_eof(timeout=10_000, allow_quit=False),
    ]  # fmt: skip
    async with scripted(script) as (conn, _rec, _srv):
        results = await conn.send_many(m)
    assert [r.outcome for r in results] == [Outcome.UNKNOWN, Outcome.TRANSIENT]
    assert "SMTPTimeoutError" in (results[0].error or "")


async def test_early_reply_while_the_body_is_written() -> None:
    """A 552 and a hang-up while a large body is still going out: the 552 is the answer."""
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 2000
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        read_bytes(10_000),
        send_lines("552 5.3.4 message too big"),
        close(),
    ]  # fmt: skip
    async with scripted(script, pair=lambda: bounded_stream_pair(8192)) as (conn, _rec, _srv):
        [result] = await conn.send_many([prep(big, "b@example.com")])
    assert summary(result) == [("b@example.com", "permanent", 552)]
    assert result.error == "server replied before the end of data"


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_refused_rset_stops_the_batch(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "550 no", "554 no valid recipients"),
        expect_line("RSET"), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        send_lines("500 5.5.2 what?", "503 5.5.1 nested MAIL", "503 need MAIL", "503 need MAIL"),
        expect_eof(allow_quit=False),
    ]  # fmt: skip
    async with session(script, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
        assert not conn.is_usable
    assert results[0].outcome is Outcome.PERMANENT
    assert results[1].outcome is Outcome.TRANSIENT and "RSET refused" in (results[1].error or "")
    assert "never started" in (results[2].error or "")


# -- DATA: bounded groups, large messages ----------------------------------------------------


async def test_large_recipient_list_goes_in_bounded_groups() -> None:
    rcpts = [f"r{i}@example.com" for i in range(250)]
    script: list[Step] = [expect_line(MAIL)]
    for i, r in enumerate(rcpts):
        script.append(expect_line(rcpt(r)))
        if i in (RCPT_GROUP - 1, 2 * RCPT_GROUP - 1):
            script.append(send_lines(*(["250 ok"] if i == RCPT_GROUP - 1 else []),
                                     *(["250 ok"] * RCPT_GROUP)))  # fmt: skip
    script += [
        expect_line("DATA"),
        send_lines(*["250 ok"] * 49, "452 4.5.3 too many", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, _srv):
        [result] = await conn.send_many([prep(body(0), *rcpts)])
        writes = list(rec.writes)
    assert [w.count(b"RCPT TO:") for w in writes[:3]] == [RCPT_GROUP, RCPT_GROUP, 50]
    assert writes[0].startswith(MAIL) and writes[2].endswith(b"DATA\r\n")
    assert result.by_outcome(Outcome.TRANSIENT) == ["r249@example.com"]
    assert len(result.accepted) == 249


async def test_thousand_recipients_against_a_small_window() -> None:
    """R29: 1000 RCPTs, a server that answers each line and a 1 KiB window each way."""
    rcpts = [f"recipient{i:04d}@example.com" for i in range(1000)]
    script: list[Step] = [expect_line(MAIL), send_lines("250 ok")]
    for r in rcpts:
        script += [expect_line(rcpt(r)), send_lines("250 ok")]
    script += [
        expect_line("DATA"), send_lines("354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    full = [send_lines("220 scripted ESMTP"), expect_line("EHLO client.test"),
            ehlo_reply("PIPELINING"), *script]  # fmt: skip
    with trio.fail_after(30):
        async with scripted_server(full, recv_buffer_size=2048) as srv:
            async with triomail.connect(
                srv.host, srv.port, tls="none", local_hostname="client.test"
            ) as conn:
                [result] = await conn.send_many([prep(body(0), *rcpts)])
    assert result.ok and len(result.accepted) == 1000


async def test_thousand_recipients_small_windows_both_ways() -> None:
    """Also with 2 KiB each way in memory, and a realistic reply length."""
    rcpts = [f"recipient{i:04d}@example.com" for i in range(1000)]
    script: list[Step] = [expect_line(MAIL), send_lines("250 2.1.0 Ok")]
    for r in rcpts:
        script += [expect_line(rcpt(r)), send_lines("250 2.1.5 Ok")]
    script += [
        expect_line("DATA"), send_lines("354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    with trio.fail_after(30):
        async with scripted(script, pair=lambda: bounded_stream_pair(2048)) as (conn, _r, _s):
            [result] = await conn.send_many([prep(body(0), *rcpts)])
    assert result.ok and len(result.accepted) == 1000


async def test_large_body_is_streamed_in_chunks() -> None:
    from triomail._client.pipeline import DATA_CHUNK

    big = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 6000  # ~600 kB
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("c@example.com")),
        expect_line("DATA"),
        send_lines("250 queued", "250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, rec, srv):
        results = await conn.send_many([prep(big, "b@example.com"), prep(body(1), "c@example.com")])
        writes = list(rec.writes)
    assert all(r.ok for r in results)
    assert [len(w) for w in writes[1:3]] == [DATA_CHUNK, DATA_CHUNK]
    assert writes[3].endswith(b".\r\n" + MAIL + rcpt("c@example.com") + b"DATA\r\n")
    assert b"".join(writes[1:4]).startswith(big + b".\r\n")
    assert srv.transcript.bodies[0] == big + b".\r\n"


async def test_without_pipelining_falls_back_to_send() -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(2)]
    script: list[Step] = []
    for i in range(2):
        script += [
            expect_line(MAIL), send_lines("250 ok"),
            expect_line(rcpt(f"b{i}@example.com")), send_lines("250 ok"),
            expect_line("DATA"), send_lines("354 go"),
            expect_data(), send_lines("250 queued"),
        ]  # fmt: skip
    script += quit_steps()
    async with scripted(script, caps=("8BITMIME",)) as (conn, rec, _srv):
        results = await conn.send_many(m)
        assert rec.writes[:3] == [MAIL, rcpt("b0@example.com"), b"DATA\r\n"]
    assert all(r.ok for r in results)


async def test_local_failures_stay_in_place_and_touch_no_wire() -> None:
    eight_bit = prep("Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0\r\n", "x@example.com")
    m = [prep(body(0), "b@example.com"), eight_bit, prep(body(2), "c@example.com")]
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("c@example.com")),
        expect_line("DATA"),
        send_lines("250 queued", "250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script) as (conn, _rec, _srv):
        results = await conn.send_many(m)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reply is not None and results[1].reply.enhanced_code == "5.6.3"
    assert b"x@example.com" not in b"".join(d for _, d in _srv.transcript.writes)


async def test_closed_connection_raises_before_writing() -> None:
    async with scripted([expect_eof(allow_quit=True)]) as (conn, _rec, _srv):
        await conn.abort()
        with pytest.raises(triomail.SMTPDisconnected):
            await conn.send_many([prep(body(0), "b@example.com")])


async def test_chunking_true_requires_the_extension() -> None:
    async with scripted(quit_steps()) as (conn, _rec, _srv):
        with pytest.raises(triomail.LocalProtocolError):
            await conn.send_many([prep(body(0), "b@example.com")], chunking=True)


# -- BDAT --------------------------------------------------------------------------------------

CHUNKING = ("PIPELINING", "CHUNKING", "8BITMIME")


def bdat_txn(n: int, data: bytes, *, rset: bool) -> list[Step]:
    return [
        *([expect_line("RSET")] if rset else []),
        expect_line(MAIL),
        expect_line(rcpt(f"b{n}@example.com")),
        expect_line(b"BDAT %d LAST" % len(data)),
        read_bytes(len(data)),
    ]


async def test_bdat_transactions_go_back_to_back() -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        *bdat_txn(0, body(0), rset=False),
        *bdat_txn(1, body(1), rset=True),
        *bdat_txn(2, body(2), rset=True),
        send_lines("250 ok", "250 ok", "250 2.0.0 queued 0"),
        send_lines("250 reset", "250 ok", "250 ok", "250 2.0.0 queued 1"),
        send_lines("250 reset", "250 ok", "250 ok", "250 2.0.0 queued 2"),
        *quit_steps(),
    ]
    async with scripted(script, caps=CHUNKING) as (conn, rec, srv):
        results = await conn.send_many(m)
        writes = list(rec.writes)
    expected = b"".join(
        (b"RSET\r\n" if i else b"")
        + MAIL
        + rcpt(f"b{i}@example.com")
        + b"BDAT %d LAST\r\n" % len(body(i))
        + body(i)
        for i in range(3)
    )
    assert writes == [expected]
    assert [r.reply.text for r in results if r.reply] == ["queued 0", "queued 1", "queued 2"]
    assert srv.transcript.bodies == [body(0), body(1), body(2)]
    assert conn.messages_sent == 3


async def test_bdat_counts_canonical_octets_without_dot_stuffing() -> None:
    raw = b".lead\nbare LF\rbare CR\r\n.\n..\rend"
    canonical = b".lead\r\nbare LF\r\nbare CR\r\n.\r\n..\r\nend\r\n"
    script = [*bdat_txn(0, canonical, rset=False), send_lines("250 ok", "250 ok", "250 queued")]
    script += quit_steps()
    async with scripted(script, caps=CHUNKING) as (conn, rec, srv):
        [result] = await conn.send_many([prep(raw, "b0@example.com")])
        assert rec.writes[0].endswith(b"BDAT %d LAST\r\n" % len(canonical) + canonical)
    assert len(canonical) == 37
    assert result.ok and srv.transcript.bodies == [canonical]


async def test_empty_message_is_bdat_0_last() -> None:
    script = [*bdat_txn(0, b"", rset=False), send_lines("250 ok", "250 ok", "250 queued")]
    script += quit_steps()
    async with scripted(script, caps=CHUNKING) as (conn, rec, _srv):
        [result] = await conn.send_many([prep(b"", "b0@example.com")])
        assert rec.writes[0].endswith(b"BDAT 0 LAST\r\n")
    assert result.ok


async def test_bdat_failing_mid_window_spares_its_neighbours() -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(4)]
    script = [
        *bdat_txn(0, body(0), rset=False),
        *bdat_txn(1, body(1), rset=True),
        *bdat_txn(2, body(2), rset=True),
        *bdat_txn(3, body(3), rset=True),
        send_lines("250 ok", "250 ok", "250 queued 0"),
        send_lines("250 reset", "250 ok", "250 ok", "552 5.3.4 chunk too big"),
        send_lines("250 reset", "250 ok", "250 ok", "451 4.3.0 local error"),
        send_lines("250 reset", "250 ok", "250 ok", "250 queued 3"),
        *quit_steps(),
    ]
    async with scripted(script, caps=CHUNKING) as (conn, rec, _srv):
        results = await conn.send_many(m)
        assert len(rec.writes) == 1 and rec.writes[0].count(b"BDAT ") == 4
    assert [r.outcome for r in results] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
        Outcome.ACCEPTED,
    ]
    assert results[1].reply is not None and results[1].reply.code == 552
    assert results[1].mail_accepted and results[1].error is None


async def test_bdat_last_failure_resets_the_session() -> None:
    script = [
        *bdat_txn(0, body(0), rset=False),
        send_lines("250 ok", "250 ok", "554 5.7.1 rejected"),
        expect_line("RSET"),
        send_lines("250 reset"),
        *quit_steps(),
    ]
    async with scripted(script, caps=CHUNKING) as (conn, _rec, _srv):
        [result] = await conn.send_many([prep(body(0), "b0@example.com")])
        assert conn.is_usable
    assert result.outcome is Outcome.PERMANENT


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_bdat_reply_mapping_with_refused_mail_and_recipients(transport: str) -> None:
    m = [
        prep(body(0), "b0@example.com", "x@example.com"),
        prep(body(1), "b1@example.com"),
        prep(body(2), "b2@example.com"),
    ]
    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line(rcpt("x@example.com")),
        expect_line(b"BDAT %d LAST" % len(body(0))), read_bytes(len(body(0))),
        *bdat_txn(1, body(1), rset=True),
        *bdat_txn(2, body(2), rset=True),
        send_lines("250 ok", "452 4.5.3 too many", "250 ok", "250 queued 0"),
        send_lines("250 reset", "550 5.7.1 sender refused", "503 need MAIL", "503 need RCPT"),
        send_lines("250 reset", "250 ok", "550 5.1.1 unknown", "554 no valid recipients"),
        expect_line("RSET"), send_lines("250 reset"),
        *quit_steps(),
    ]  # fmt: skip
    async with session(script, caps=CHUNKING, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
    assert summary(results[0]) == [
        ("b0@example.com", "transient", 452),
        ("x@example.com", "accepted", 250),
    ]
    assert summary(results[1]) == [("b1@example.com", "permanent", 550)]
    assert not results[1].mail_accepted
    assert summary(results[2]) == [("b2@example.com", "permanent", 550)]


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_bdat_421_stops_the_window(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        *bdat_txn(0, body(0), rset=False),
        *bdat_txn(1, body(1), rset=True),
        *bdat_txn(2, body(2), rset=True),
        send_lines("250 ok", "250 ok", "250 queued 0", "421 4.3.2 bye"),
        expect_eof(allow_quit=False),
    ]
    async with session(script, caps=CHUNKING, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
    assert results[0].ok
    assert summary(results[1]) == [("b1@example.com", "transient", 421)]
    # Behind a 421 nothing was acted on: transient, not unknown.
    assert summary(results[2]) == [("b2@example.com", "transient", None)]


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_bdat_connection_lost_with_a_window_in_flight(transport: str) -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [
        *bdat_txn(0, body(0), rset=False),
        *bdat_txn(1, body(1), rset=True),
        *bdat_txn(2, body(2), rset=True),
        send_lines("250 ok", "250 ok", "250 queued 0"),
        abort(),
    ]
    async with session(script, caps=CHUNKING, transport=transport) as (conn, _srv):
        results = await conn.send_many(m)
        assert not conn.is_usable
    assert [r.outcome for r in results] == [Outcome.ACCEPTED, Outcome.UNKNOWN, Outcome.UNKNOWN]


async def test_bdat_windows_are_bounded_and_overlap() -> None:
    n = WINDOW_MESSAGES + 5
    m = [prep(body(i), f"b{i}@example.com") for i in range(n)]
    script: list[Step] = []
    for i in range(WINDOW_MESSAGES):
        script += bdat_txn(i, body(i), rset=bool(i))
    # The second window is written before any reply to the first is read.
    for i in range(WINDOW_MESSAGES, n):
        script += bdat_txn(i, body(i), rset=True)
    for i in range(n):
        script.append(send_lines(*(["250 reset"] if i else []), "250 ok", "250 ok", f"250 q{i}"))
    script += quit_steps()
    async with scripted(script, caps=CHUNKING) as (conn, rec, _srv):
        results = await conn.send_many(m)
        counts = [w.count(b"BDAT ") for w in rec.writes]
    assert counts == [WINDOW_MESSAGES, 5]
    assert [r.reply.text for r in results if r.reply] == [f"q{i}" for i in range(n)]


async def test_bdat_large_message_sends_envelope_first() -> None:
    from triomail._client.chunking import WINDOW_BYTES
    from triomail._client.pipeline import DATA_CHUNK

    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * (WINDOW_BYTES // 1000 + 10)
    m = [prep(body(0), "b0@example.com"), prep(big, "b1@example.com"), prep(big, "b2@example.com")]
    script = [
        *bdat_txn(0, body(0), rset=False),
        send_lines("250 ok", "250 ok", "250 queued 0"),
        # m0 is known to be done: no RSET in front of m1.
        expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        send_lines("250 ok", "250 ok"),
        expect_line(b"BDAT %d LAST" % len(big)), read_bytes(len(big)),
        send_lines("250 queued big"),
        expect_line(MAIL), expect_line(rcpt("b2@example.com")),
        send_lines("250 ok", "550 5.1.1 no such user"),
        # nobody to send it to: no BDAT, but the open envelope is reset.
        expect_line("RSET"), send_lines("250 reset"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script, caps=CHUNKING) as (conn, rec, _srv):
        results = await conn.send_many(m)
        writes = list(rec.writes)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.PERMANENT]
    assert max(len(w) for w in writes) <= DATA_CHUNK + 100
    assert b"".join(writes).count(b"BDAT ") == 2


# -- equivalence with send() against a rule-based server ----------------------------------

_RCPT_RULES = {"r550": "550 5.1.1 unknown", "r452": "452 4.5.3 too many", "r450": "450 4.2.1 busy"}


class RuleServer:
    """A minimal SMTP server (PIPELINING, CHUNKING) whose replies follow the addresses:
    sender ``m550``/``m451`` -> MAIL refused; ``d552``/``d451`` -> end of data refused;
    ``m354`` -> 354 even without recipients; recipient ``r550``/``r452``/``r450`` -> that
    RCPT reply; ``r421`` -> 421 and hang up. After BDAT LAST, failed or not, the
    transaction is over (as in Postfix). Replies are written one by one, unbatched."""

    def __init__(self, stream: trio.abc.Stream, *, chunking: bool) -> None:
        self.stream = stream
        self.chunking = chunking
        self.buf = bytearray()
        self.delivered: list[tuple[str, tuple[str, ...], bytes]] = []

    async def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buf += data
        i = self.buf.index(b"\r\n") + 2
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    async def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def say(self, text: str) -> None:
        await self.stream.send_all(text.encode() + b"\r\n")

    async def serve(self) -> None:
        try:
            await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _serve(self) -> None:
        await self.say("220 rules ESMTP")
        sender: str | None = None
        rcpts: list[str] = []
        while True:
            line = await self.line()
            if line is None:
                return
            text = line.decode().rstrip("\r\n")
            verb = text.split(" ", 1)[0].upper()
            if verb == "EHLO":
                caps = ["rules", "PIPELINING", "8BITMIME"] + (["CHUNKING"] if self.chunking else [])
                await self.stream.send_all(
                    "".join(
                        f"250{'-' if i < len(caps) - 1 else ' '}{c}\r\n" for i, c in enumerate(caps)
                    ).encode()
                )
            elif verb == "MAIL":
                addr = re.search(r"<([^>]*)>", text)
                local = addr.group(1).split("@")[0] if addr else ""
                if sender is not None:
                    await self.say("503 5.5.1 nested MAIL")
                elif local in ("m550", "m451"):
                    await self.say(f"{local[1:]} {local[1]}.7.1 sender refused")
                else:
                    sender, rcpts = addr.group(1) if addr else "", []
                    await self.say("250 2.1.0 ok")
            elif verb == "RCPT":
                addr = re.search(r"<([^>]*)>", text)
                assert addr is not None
                local = addr.group(1).split("@")[0]
                if sender is None:
                    await self.say("503 5.5.1 need MAIL")
                elif local == "r421":
                    await self.say("421 4.3.2 going down")
                    return
                elif local in _RCPT_RULES:
                    await self.say(_RCPT_RULES[local])
                else:
                    rcpts.append(addr.group(1))
                    await self.say("250 2.1.5 ok")
            elif verb == "DATA":
                if sender is None:
                    await self.say("503 5.5.1 need MAIL")
                elif not rcpts and not sender.startswith("m354"):
                    await self.say("554 5.5.1 no valid recipients")
                else:
                    await self.say("354 go")
                    data = bytearray()
                    while True:
                        chunk = await self.line()
                        if chunk is None:
                            return
                        if chunk == b".\r\n":
                            break
                        data += chunk
                    await self.finish(sender, rcpts, bytes(data))
                    sender, rcpts = None, []
            elif verb == "BDAT":
                size = int(text.split()[1])
                data = await self.exact(size)
                if sender is None:
                    await self.say("503 5.5.1 need MAIL")
                elif not rcpts:
                    await self.say("554 5.5.1 no valid recipients")
                else:
                    await self.finish(sender, rcpts, data)
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                await self.say("250 2.0.0 reset")
            elif verb == "QUIT":
                await self.say("221 bye")
                return
            else:
                await self.say("500 5.5.2 what?")

    async def finish(self, sender: str, rcpts: list[str], data: bytes) -> None:
        local = sender.split("@")[0]
        if not rcpts:
            await self.say("554 5.5.1 no valid recipients")
        elif local in ("d552", "d451"):
            await self.say(f"{local[1:]} {local[1]}.3.0 data refused")
        else:
            self.delivered.append((sender, tuple(rcpts), data))
            await self.say("250 2.0.0 queued")


@asynccontextmanager
async def rule_session(*, chunking: bool) -> AsyncIterator[tuple[SMTPConnection, RuleServer]]:
    client, server_end = trio.testing.memory_stream_pair()
    server = RuleServer(server_end, chunking=chunking)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        conn = await triomail.start_session(
            client, host="rules.test", tls="none", local_hostname="client.test"
        )
        try:
            yield conn, server
        finally:
            await conn.aclose()


def comparable(result: SendResult, with_codes: bool) -> tuple[object, ...]:
    per = tuple((r.recipient, r.outcome, r.code if with_codes else None) for r in result.recipients)
    code = result.reply.code if with_codes and result.reply else None
    return per, code, result.mail_accepted if with_codes else None


async def _via_send(batch: Sequence[PreparedMessage]) -> list[SendResult]:
    out: list[SendResult] = []
    async with rule_session(chunking=False) as (conn, _server):
        for prepared in batch:
            if not conn.is_usable:
                out.append(SendResult(prepared.sender, tuple(
                    triomail.RecipientResult(r, Outcome.TRANSIENT, None)
                    for r in prepared.recipients
                )))  # fmt: skip
                continue
            out.append(await conn.send(prepared))
    return out


senders = st.sampled_from(["ok", "ok", "ok", "m550", "m451", "d552", "d451", "m354"])
recipient_kinds = st.sampled_from(["ok", "ok", "ok", "r550", "r452", "r450", "r421"])
batches = st.lists(
    st.tuples(senders, st.lists(recipient_kinds, min_size=1, max_size=4)), min_size=1, max_size=8
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches, chunking=st.booleans(), lazy=st.booleans())
def test_send_many_reports_what_send_reports(
    batch: list[tuple[str, list[str]]], chunking: bool, lazy: bool
) -> None:
    messages = [
        prep(body(i), *[f"{k}@example.com" for k in kinds], sender=f"{s}@example.com")
        for i, (s, kinds) in enumerate(batch)
    ]
    closing = any("r421" in kinds for _, kinds in batch)

    async def main() -> tuple[list[SendResult], list[SendResult], int]:
        expected = await _via_send(messages)
        async with rule_session(chunking=chunking) as (conn, server):
            got = await conn.send_many(iter(messages) if lazy else messages)
        return expected, got, len(server.delivered)

    expected, got, delivered = trio.run(main)
    assert len(got) == len(messages)
    for e, g in zip(expected, got, strict=True):
        assert comparable(g, not closing) == comparable(e, not closing)
    assert delivered == sum(1 for r in got if r.accepted and r.reply and r.reply.code < 300)


@pytest.mark.parametrize("chunking", [False, True])
async def test_rule_server_delivers_intact(chunking: bool) -> None:
    raws = [b".dot\nline\r\n" * (i + 1) for i in range(40)]
    async with rule_session(chunking=chunking) as (conn, server):
        results = await conn.send_many(
            [prep(raw, f"b{i}@example.com", tag=i) for i, raw in enumerate(raws)]
        )
    assert [r.tag for r in results] == list(range(40))
    assert all(r.ok for r in results)
    canonical = [triomail.prepare(r, sender=SENDER, recipients=[SENDER]).canonical for r in raws]
    if chunking:
        assert [d for _, _, d in server.delivered] == [c.data for c in canonical]
    else:  # the rule server keeps the transparency dots; the terminator is not data
        assert [d for _, _, d in server.delivered] == [dot_stuff(c)[:-3] for c in canonical]


# -- Postfix ---------------------------------------------------------------------------------

PF_MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: pipelined\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"caf\xc3\xa9\r\n"
)


async def _send_to(
    port: int, messages: Sequence[PreparedMessage], *, chunking: bool | None
) -> list[SendResult]:
    async with triomail.connect(
        "127.0.0.1", port, tls="none", local_hostname="client.test"
    ) as conn:
        assert conn.capabilities.pipelining and conn.capabilities.chunking
        results = await conn.send_many(messages, chunking=chunking)
        assert conn.is_usable
        return results


@pytest.mark.parametrize("chunking", [False, True])
async def test_postfix_batch_arrives_intact(postfix_store: PostfixInstance, chunking: bool) -> None:
    raws = [
        PF_MESSAGE,
        b"Subject: bare\n\nbare LF\nand bare CR\rend\n.\n",
        PF_MESSAGE.replace(b"\r\n", b"\n"),
    ] * 4
    raws = [raw + b"number %d\r\n" % i for i, raw in enumerate(raws)]
    cp = postfix_store.checkpoint()
    messages = [prep(raw, f"bob{i}@example.net") for i, raw in enumerate(raws)]
    results = await _send_to(postfix_store.port, messages, chunking=chunking)
    assert all(r.ok for r in results), [str(r.reply) for r in results]
    stored = await postfix_store.await_received(len(raws), since=cp)
    by_rcpt = {s.recipients[0]: as_sent(s.raw) for s in stored}
    for i, m in enumerate(messages):
        assert by_rcpt[f"bob{i}@example.net"] == m.canonical.data
    log = postfix_store.log(since=cp)
    assert ("bdat=" in log) == chunking
    assert postfix_store.trouble(since=cp) == []


@pytest.fixture(scope="module")
def postfix_rules(tls_ca: trustme.CA) -> Iterator[PostfixInstance]:
    """A private Postfix with access rules: recipient ``bad@`` refused (554), ``soft@``
    deferred (450), sender ``badsender@`` refused (at RCPT time, as Postfix delays it),
    a subject ``reject me`` refused at the end of data, at most 5 recipients (452)."""
    if not POSTFIX.exists():
        pytest.skip(f"{POSTFIX} not installed")
    rules = Path(tempfile.mkdtemp(prefix="triomail-rules-"))
    rules.chmod(0o755)
    header_checks = rules / "header_checks"
    header_checks.write_text("/^Subject: reject me/ REJECT subject refused\n")
    header_checks.chmod(0o644)
    try:
        with start_postfix(
            tls_ca,
            mode="discard",
            main_cf={
                "smtpd_recipient_restrictions": (
                    "check_sender_access inline:{badsender@example.com=REJECT},"
                    " check_recipient_access inline:{bad@example.com=REJECT,"
                    " soft@example.com=DEFER}"
                ),
                "header_checks": f"regexp:{header_checks}",
                "smtpd_recipient_limit": "5",
            },
        ) as inst:
            yield inst
    finally:
        shutil.rmtree(rules, ignore_errors=True)


@pytest.mark.parametrize("chunking", [False, True])
async def test_postfix_reply_mapping(postfix_rules: PostfixInstance, chunking: bool) -> None:
    ok_body = b"Subject: fine\r\n\r\nhello\r\n"
    bad_body = b"Subject: reject me\r\n\r\nhello\r\n"
    seven = [f"r{i}@example.com" for i in range(4)] + [
        "bad@example.com",
        "x@example.com",
        "y@example.com",
    ]
    messages = [
        prep(ok_body, "b0@example.com"),
        prep(ok_body, "bad@example.com", "b1@example.com", "soft@example.com"),
        prep(bad_body, "b2@example.com"),  # refused at the end of data, mid-window
        prep(ok_body, "bad@example.com"),  # no recipient accepted
        prep(ok_body, "b4@example.com", sender="badsender@example.com"),
        prep(ok_body, *seven),  # 452 after 5 accepted recipients
        prep(ok_body, "b6@example.com"),
    ]  # fmt: skip
    cp = postfix_rules.checkpoint()
    results = await _send_to(postfix_rules.port, messages, chunking=chunking)
    assert summary(results[0]) == [("b0@example.com", "accepted", 250)]
    assert summary(results[1]) == [
        ("bad@example.com", "permanent", 554),
        ("b1@example.com", "accepted", 250),
        ("soft@example.com", "transient", 450),
    ]
    assert results[2].outcome is Outcome.PERMANENT and results[2].mail_accepted
    assert results[2].reply is not None and "subject refused" in results[2].reply.text
    assert summary(results[3]) == [("bad@example.com", "permanent", 554)]
    assert results[4].outcome is Outcome.PERMANENT
    assert [r.code for r in results[5].recipients] == [250, 250, 250, 250, 554, 250, 452]
    assert results[5].by_outcome(Outcome.TRANSIENT) == ["y@example.com"]
    assert results[5].reply is not None and results[5].reply.code == 250
    assert results[6].ok
    delivered = await postfix_rules.await_delivered(1 + 1 + 5 + 1, since=cp)
    assert len(delivered) == 8
    assert "nested MAIL" not in postfix_rules.log(since=cp)


@pytest.mark.parametrize("chunking", [False, True])
async def test_postfix_many_messages_and_a_thousand_recipients(
    postfix: PostfixInstance, chunking: bool
) -> None:
    many = [prep(b"Subject: %d\r\n\r\nx\r\n" % i, f"m{i}@example.org") for i in range(200)]
    crowd = prep(b"Subject: crowd\r\n\r\nhi\r\n", *[f"c{i:04d}@example.org" for i in range(1000)])
    cp = postfix.checkpoint()
    with trio.fail_after(60):
        results = await _send_to(postfix.port, [*many[:100], crowd, *many[100:]], chunking=chunking)
    assert all(r.ok for r in results)
    assert len(results[100].accepted) == 1000
    await postfix.await_delivered(1200, since=cp, timeout=60)


# -- the capture sink (triomail.testing.SMTPSink, strict) -------------------------------------

SINK_RAWS = [
    b".leading dot\nbare LF\rbare CR\r\n.\r\n..\r\nend",
    b"Subject: plain\r\n\r\nhello\r\n",
    b"",
    "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode(),
]


@asynccontextmanager
async def sink_connection(**options: object) -> AsyncIterator[tuple[SMTPConnection, SMTPSink]]:
    async with SMTPSink(tls=False, **options) as sink:  # type: ignore[arg-type]
        async with triomail.connect(
            sink.host, sink.port, tls="none", local_hostname="client.test"
        ) as conn:
            yield conn, sink


@pytest.mark.parametrize("chunking", [False, True])
async def test_sink_batch_arrives_intact_with_no_sync_error(chunking: bool) -> None:
    raws = [raw + b"n%d\r\n" % i for i, raw in enumerate(SINK_RAWS * 10)]
    async with sink_connection() as (conn, sink):
        messages = [prep(raw, f"r{i}@example.com") for i, raw in enumerate(raws)]
        results = await conn.send_many(messages, chunking=chunking)
        assert conn.is_usable
        stored = await sink.wait_for_messages(len(raws))
    assert all(r.ok for r in results), [str(r.reply) for r in results if not r.ok]
    assert [m.rcpt_to for m in stored] == [[f"r{i}@example.com"] for i in range(len(raws))]
    assert [m.data for m in stored] == [m.canonical.data for m in messages]
    assert {m.transfer for m in stored} == {"BDAT" if chunking else "DATA"}


@pytest.mark.parametrize("chunking", [False, True])
async def test_sink_faults_map_to_their_messages(chunking: bool) -> None:
    faults = [
        Fault("RCPT", code=452, recipient="c2@example.com"),
        Fault("MAIL", code=550, message=3),
        Fault(".", code=554, message=5),
        Fault("RCPT", code=550, recipient="only6@example.com"),
        Fault("BDAT" if chunking else "DATA", code=451, message=7),
    ]
    async with sink_connection(faults=faults) as (conn, sink):
        messages = [
            prep(body(1), "b1@example.com"),
            prep(body(2), "b2@example.com", "c2@example.com", "d2@example.com"),
            prep(body(3), "b3@example.com"),
            prep(body(4), "b4@example.com"),
            prep(body(5), "b5@example.com"),
            prep(body(6), "only6@example.com"),
            prep(body(7), "b7@example.com"),
            prep(body(8), "b8@example.com"),
        ]
        results = await conn.send_many(messages, chunking=chunking)
        assert conn.is_usable
    assert summary(results[1]) == [
        ("b2@example.com", "accepted", 250),
        ("c2@example.com", "transient", 452),
        ("d2@example.com", "accepted", 250),
    ]
    assert summary(results[2]) == [("b3@example.com", "permanent", 550)]
    assert not results[2].mail_accepted
    assert summary(results[4]) == [("b5@example.com", "permanent", 554)]
    assert summary(results[5]) == [("only6@example.com", "permanent", 550)]
    assert summary(results[6]) == [("b7@example.com", "transient", 451)]
    assert [r.ok for r in results] == [True, False, False, True, False, False, False, True]
    assert [m.rcpt_to for m in sink.messages] == [
        ["b1@example.com"],
        ["b2@example.com", "d2@example.com"],
        ["b4@example.com"],
        ["b8@example.com"],
    ]


@pytest.mark.parametrize("chunking", [False, True])
async def test_sink_421_in_the_middle(chunking: bool) -> None:
    async with sink_connection(faults=[Fault("MAIL", code=421, message=3)]) as (conn, sink):
        results = await conn.send_many(
            [prep(body(i), f"b{i}@example.com") for i in range(5)], chunking=chunking
        )
        assert not conn.is_usable
    assert [r.ok for r in results[:2]] == [True, True]
    assert summary(results[2]) == [("b2@example.com", "transient", 421)]
    assert all(r.outcome is Outcome.TRANSIENT for r in results[3:])
    assert len(sink.messages) == 2


@pytest.mark.parametrize("chunking", [False, True])
async def test_sink_hang_up_before_the_final_reply(chunking: bool) -> None:
    fault = Fault(".", drop="before_reply", message=3)
    async with sink_connection(faults=[fault]) as (conn, sink):
        results = await conn.send_many(
            [prep(body(i), f"b{i}@example.com") for i in range(5)], chunking=chunking
        )
    assert [r.outcome for r in results[:3]] == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.UNKNOWN]
    assert all(r.outcome in (Outcome.TRANSIENT, Outcome.UNKNOWN) for r in results[3:])
    # The sink did store message 3: exactly why its outcome is unknown, not transient.
    assert [m.rcpt_to for m in sink.messages][:3] == [[f"b{i}@example.com"] for i in range(3)]


async def test_sink_without_pipelining_gets_one_command_at_a_time() -> None:
    async with sink_connection(hide_extensions=["PIPELINING", "CHUNKING"]) as (conn, sink):
        results = await conn.send_many([prep(body(i), f"b{i}@example.com") for i in range(4)])
    assert all(r.ok for r in results)
    assert len(sink.messages) == 4


# -- lazily consumed iterables ------------------------------------------------------------


async def test_a_generator_gives_the_same_groups_as_a_list() -> None:
    taken: list[int] = []

    def messages() -> Iterator[PreparedMessage]:
        for i in range(3):
            taken.append(i)
            yield prep(body(i), f"b{i}@example.com")

    script = [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        send_lines("250 queued 0", "250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b2@example.com")),
        expect_line("DATA"),
        send_lines("250 queued 1", "250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued 2"),
        *quit_steps(),
    ]  # fmt: skip
    gen = messages()
    async with scripted(script) as (conn, rec, _srv):
        results = await conn.send_many(gen)
        assert rec.writes[1] == body(0) + b".\r\n" + MAIL + rcpt("b1@example.com") + b"DATA\r\n"
    assert [r.reply.text for r in results if r.reply] == ["queued 0", "queued 1", "queued 2"]
    assert taken == [0, 1, 2]


@pytest.mark.parametrize("chunking", [False, True])
async def test_a_generator_is_drained_into_never_started_results(chunking: bool) -> None:
    fault = Fault("MAIL", code=421, message=2)
    async with sink_connection(faults=[fault]) as (conn, _sink):
        results = await conn.send_many(
            (prep(body(i), f"b{i}@example.com", tag=i) for i in range(6)), chunking=chunking
        )
    assert [r.tag for r in results] == list(range(6))
    assert results[0].ok
    assert summary(results[1]) == [("b1@example.com", "transient", 421)]
    assert all(r.outcome is Outcome.TRANSIENT for r in results[2:])
    if not chunking:  # with BDAT the rest of the window was already on the wire
        assert all("never started" in (r.error or "") for r in results[2:])


async def test_a_lazily_refused_message_is_a_result_not_an_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eight_bit = prep("Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0\r\n", "x@example.com")
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    real_plan = batch_module.plan

    def plan(prepared: PreparedMessage, *args: Any, **kw: Any) -> object:
        if prepared.sender == "bad@example.com":
            raise triomail.LocalProtocolError("no such thing")
        return real_plan(prepared, *args, **kw)

    monkeypatch.setattr(batch_module, "plan", plan)  # a generator is planned by the batch
    async with scripted(script) as (conn, _rec, _srv):
        results = await conn.send_many(
            iter([prep(body(0), "b@example.com"), eight_bit, prep(body(1), "c@x.example",
                 sender="bad@example.com")])
        )  # fmt: skip
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].reply is not None and results[1].reply.enhanced_code == "5.6.3"
    assert results[2].error == "not sent: no such thing"
    assert results[2].outcome is Outcome.PERMANENT


async def test_an_iterable_that_raises_leaves_the_connection_unusable() -> None:
    def messages() -> Iterator[PreparedMessage]:
        yield prep(body(0), "b@example.com")
        raise RuntimeError("the caller's bug")

    seen: list[int] = []
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_eof(allow_quit=False),
    ]  # fmt: skip
    async with scripted(script) as (conn, _rec, _srv):
        with pytest.raises(RuntimeError, match="the caller's bug"):
            await conn.send_many(messages(), on_result=lambda i, r: seen.append(i))
        assert not conn.is_usable
    assert seen == []


# -- a server that refuses commands pipelined behind an end of data (issue 17) ---------------

BAD_SEQUENCE = "503 5.5.0 Bad sequence of commands - pipelined after end of DATA"


def _second_refused_behind_the_first() -> list[Step]:
    """Message 0 goes; message 1's envelope, behind 0's end of data, gets 503s."""
    return [
        expect_line(MAIL), expect_line(rcpt("b0@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), expect_line(MAIL), expect_line(rcpt("b1@example.com")),
        expect_line("DATA"),
        send_lines("250 queued 0", BAD_SEQUENCE, BAD_SEQUENCE, BAD_SEQUENCE),
    ]  # fmt: skip


def _alone(i: int) -> list[Step]:
    """Message ``i`` with its end of data answered before anything follows it."""
    return [
        expect_line(MAIL), expect_line(rcpt(f"b{i}@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), send_lines(f"250 queued {i}"),
    ]  # fmt: skip


async def test_503_behind_an_end_of_data_falls_back_and_sends_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Haraka: 250 to the end of data, 503 to the MAIL, RCPT and DATA behind it. That
    message never started: it is sent again at once, and from then on each end of data
    is answered before the next MAIL: two round trips a message."""
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    script = [*_second_refused_behind_the_first(), *_alone(1), *_alone(2), *quit_steps()]
    envelope = [MAIL + rcpt(f"b{i}@example.com") + b"DATA\r\n" for i in range(3)]
    with caplog.at_level("INFO", logger="triomail"):
        async with scripted(script) as (conn, rec, srv):
            assert conn.pipeline == "cross"
            results = await conn.send_many(m)
            writes = list(rec.writes)
            mode = conn.pipeline
    assert writes == [
        envelope[0],
        body(0) + b".\r\n" + envelope[1],  # refused behind the end of data
        envelope[1],  # sent again at once
        body(1) + b".\r\n",
        envelope[2],
        body(2) + b".\r\n",
    ]
    assert [r.ok for r in results] == [True, True, True]
    assert [r.reply.text for r in results if r.reply] == ["queued 0", "queued 1", "queued 2"]
    assert all(r.attempts == 1 and r.error is None for r in results)
    assert len(srv.transcript.bodies) == 3
    assert mode == "within"
    falls = [r for r in caplog.records if "behind an end of data" in r.getMessage()]
    assert [r.levelname for r in falls] == ["INFO"]


async def test_the_last_message_refused_behind_a_dot_is_sent_again() -> None:
    m = [prep(body(i), f"b{i}@example.com") for i in range(2)]
    script = [*_second_refused_behind_the_first(), *_alone(1), *quit_steps()]
    async with scripted(script) as (conn, _rec, _srv):
        results = await conn.send_many(iter(m))  # lazily, as the pool feeds it
    assert [r.ok for r in results] == [True, True]
    assert conn.messages_sent == 2


@pytest.mark.parametrize(
    ("mode", "writes"),
    [
        ("within", [MAIL + rcpt("b@example.com") + b"DATA\r\n", body(0) + b".\r\n"]),
        ("off", [MAIL, rcpt("b@example.com"), b"DATA\r\n", body(0) + b".\r\n"]),
    ],
)
async def test_pipeline_mode_within_and_off(mode: str, writes: list[bytes]) -> None:
    script = [
        expect_line(MAIL), expect_line(rcpt("b@example.com")), expect_line("DATA"),
        send_lines("250 ok", "250 ok", "354 go"),
        expect_data(), send_lines("250 queued"),
        *quit_steps(),
    ]  # fmt: skip
    if mode == "off":
        script[:4] = [
            expect_line(MAIL), send_lines("250 ok"),
            expect_line(rcpt("b@example.com")), send_lines("250 ok"),
            expect_line("DATA"), send_lines("354 go"),
        ]  # fmt: skip
    async with scripted(script) as (conn, rec, _srv):
        results = await conn.send_many([prep(body(0), "b@example.com")], pipeline=mode)  # type: ignore[arg-type]
        assert rec.writes == writes
        assert conn.pipeline == "cross"  # a choice for one call, not the server's mode
    assert results[0].ok


async def test_an_unknown_pipeline_mode_is_refused() -> None:
    async with sink_connection() as (conn, _sink):
        with pytest.raises(ValueError, match="pipeline"):
            await conn.send_many([], pipeline="both")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="pipeline"):
            conn.pipeline = "both"  # type: ignore[assignment]


async def test_sink_refusing_pipelining_after_data_loses_nothing() -> None:
    """The sink plays Haraka's policy; every message arrives once, the connection keeps
    the mode it fell back to, and a later batch starts in it (no 503 at all)."""
    raws = [raw + b"n%d\r\n" % i for i, raw in enumerate(SINK_RAWS * 25)]
    messages = [prep(raw, f"r{i}@example.com") for i, raw in enumerate(raws)]
    async with sink_connection(refuse_pipelined_after_data=True) as (conn, sink):
        assert conn._io.quickack is None  # the cross path asks the kernel nothing
        results = await conn.send_many(messages[:50], chunking=False)
        assert conn.pipeline == "within"
        # Each group waited for: each read acknowledged at once (transport's header).
        assert conn._io.quickack is not None
        results += await conn.send_many(messages[50:], chunking=False)
        stored = await sink.wait_for_messages(len(raws))
    assert all(r.ok and r.attempts == 1 for r in results), [str(r.reply) for r in results]
    assert [m.data for m in stored] == [m.canonical.data for m in messages]


async def test_sink_fault_refusing_pipelining_once() -> None:
    fault = Fault(".", refuse_pipelined=True, message=3)
    messages = [prep(body(i), f"r{i}@example.com") for i in range(10)]
    async with sink_connection(faults=[fault]) as (conn, sink):
        results = await conn.send_many(messages, chunking=False)
        stored = await sink.wait_for_messages(10)
        assert conn.pipeline == "within"
    assert all(r.ok for r in results)
    assert sorted(m.data for m in stored) == sorted(m.canonical.data for m in messages)
    with pytest.raises(ValueError, match="refuse_pipelined"):
        Fault("MAIL", refuse_pipelined=True)


async def test_bdat_window_refused_behind_an_end_of_data_is_sent_again_one_by_one() -> None:
    """The same policy under CHUNKING: the RSET leading each transaction behind a BDAT
    LAST is refused with 503, and so is everything after it. Those messages never
    started: they go again, each window one message, its reply read first."""
    m = [prep(body(i), f"b{i}@example.com") for i in range(3)]
    refused = [BAD_SEQUENCE] * 4  # RSET, MAIL, RCPT, BDAT
    script = [
        *bdat_txn(0, body(0), rset=False),
        *bdat_txn(1, body(1), rset=True),
        *bdat_txn(2, body(2), rset=True),
        send_lines("250 ok", "250 ok", "250 2.0.0 queued 0", *refused, *refused),
        expect_line("RSET"), send_lines("250 reset"),  # the batch leaves the session clean
        *bdat_txn(1, body(1), rset=True),
        send_lines("250 reset", "250 ok", "250 ok", "250 2.0.0 queued 1"),
        *bdat_txn(2, body(2), rset=False),
        send_lines("250 ok", "250 ok", "250 2.0.0 queued 2"),
        *quit_steps(),
    ]  # fmt: skip
    async with scripted(script, caps=CHUNKING) as (conn, rec, _srv):
        results = await conn.send_many(m)
        writes = len(rec.writes)
        mode = conn.pipeline
        assert not conn.awaiting_final_reply  # every reply owed was read
    assert [r.reply.text for r in results if r.reply] == ["queued 0", "queued 1", "queued 2"]
    assert all(r.attempts == 1 for r in results)
    assert (writes, mode) == (4, "within")
