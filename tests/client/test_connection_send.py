"""One transaction on the wire (issue 2): R16, R18, R28-R34, R37, R39-R41.

The scripted server plays the other side on in-memory streams (``scripted_stream``;
lockstep pairs where the tests look at write boundaries, bounded pairs for small
windows); REQUIRETLS (R34) runs over loopback TLS. Every test asserts the exact bytes.
"""

from __future__ import annotations

import re
import ssl
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import pytest
import trio
import trio.testing
from helpers.connection_script import EHLO, GREETING, QUIT, prelude, rcpt, session
from helpers.scripted import (
    Step,
    abort,
    bounded_stream_pair,
    close,
    ehlo_reply,
    expect_data,
    expect_eof,
    expect_line,
    read_bytes,
    reply,
    scripted_server,
    scripted_stream,
    send_lines,
    starttls,
)

import triomail
from triomail import Outcome

MSG = b"Subject: test\r\n\r\nHello.\r\n"


def accept_data() -> list[Step]:
    return [expect_line("DATA"), reply(354, "go ahead"), expect_data(), reply(250, "2.0.0 queued")]


def writes(srv: Any) -> list[bytes]:
    return [data for _, data in srv.transcript.writes]


# ------------------------------------------------------------------------- R28, R33

DSN = triomail.DSN(notify=("SUCCESS", "FAILURE"), ret="HDRS", envid="env+1 2", orcpt=True)


async def test_R28_parameters_never_sent_unadvertised() -> None:
    """R28: no DSN, SIZE or 8BITMIME advertised: dsn= is dropped, no SIZE=, no BODY=."""
    script = [
        *prelude("PIPELINING"),
        expect_line("MAIL FROM:<s@x.test>"),
        expect_line(rcpt("a+b=c@x.test")),
        expect_line("DATA"),
        reply(250, "ok"),
        reply(250, "ok"),
        reply(354, "go"),
        expect_data(),
        reply(250, "ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=["a+b=c@x.test"], dsn=DSN)
        assert result.ok
        await conn.aclose()
    envelope = srv.transcript.data().split(b"\r\n\r\n")[0]
    for word in (b"NOTIFY", b"RET=", b"ENVID", b"ORCPT", b"SIZE=", b"BODY=", b"SMTPUTF8"):
        assert word not in envelope


async def test_R28_R33_dsn_parameters_exact_when_advertised() -> None:
    """R33: with DSN: RET, xtext ENVID, NOTIFY and ORCPT=rfc822;a+2Bb+3Dc@x (xtext)."""
    size = len(MSG)
    script = [
        *prelude("DSN", "SIZE 0"),
        expect_line(f"MAIL FROM:<s@x.test> SIZE={size} RET=HDRS ENVID=env+2B1+202"),
        reply(250, "ok"),
        expect_line(
            rcpt("a+b=c@x.test", "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a+2Bb+3Dc@x.test")
        ),
        reply(250, "ok"),
        *accept_data(),
        expect_line(f"MAIL FROM:<s@x.test> SIZE={size}"),
        reply(250, "ok"),
        expect_line(rcpt("n@x.test", "NOTIFY=NEVER")),
        reply(250, "ok"),
        *accept_data(),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await session(stream)
        assert conn.capabilities.size_limit is None  # SIZE 0: no limit (R30)
        r1 = await conn.send(MSG, sender="s@x.test", recipients=["a+b=c@x.test"], dsn=DSN)
        never = triomail.DSN(notify=("never",))
        r2 = await conn.send(MSG, sender="s@x.test", recipients=["n@x.test"], dsn=never)
        assert r1.ok and r2.ok
        await conn.aclose()


# ------------------------------------------------------------------------------ R29


async def test_R29_pipelined_envelope_is_one_write() -> None:
    """R29: with PIPELINING, MAIL + every RCPT + DATA go out in one write, and the body
    only after all their replies were read."""
    envelope = b"MAIL FROM:<s@x.test>\r\n" + rcpt("a@y.test") + rcpt("b@y.test") + b"DATA\r\n"
    script = [
        *prelude("PIPELINING"),
        expect_line("MAIL FROM:<s@x.test>"),
        expect_line(rcpt("a@y.test")),
        expect_line(rcpt("b@y.test")),
        expect_line("DATA"),
        reply(250, "2.1.0 ok"),
        reply(250, "2.1.5 ok"),
        reply(250, "2.1.5 ok"),
        reply(354, "go"),
        expect_data(),
        reply(250, "2.0.0 queued"),
        *QUIT,
    ]
    async with scripted_stream(script, pair=trio.testing.lockstep_stream_pair) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=["a@y.test", "b@y.test"])
        assert result.ok
        await conn.aclose()
    assert writes(srv) == [EHLO, envelope, MSG + b".\r\n", b"QUIT\r\n"]


async def test_R29_all_rcpts_refused_but_354_sends_only_the_dot() -> None:
    """R29: every RCPT refused yet DATA got 354: the data is just ``.\\r\\n``; each
    recipient keeps its own refusal."""
    script = [
        *prelude("PIPELINING"),
        expect_line("MAIL FROM:<s@x.test>"),
        expect_line(rcpt("a@y.test")),
        expect_line(rcpt("b@y.test")),
        expect_line("DATA"),
        reply(250, "ok"),
        reply(550, "5.1.1 no such user a"),
        reply(450, "4.2.1 try b later"),
        reply(354, "go"),
        expect_line(b".\r\n"),
        reply(554, "5.5.1 no valid recipients"),
        *QUIT,
    ]
    async with scripted_stream(script, pair=trio.testing.lockstep_stream_pair) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=["a@y.test", "b@y.test"])
        await conn.aclose()
    assert [(r.outcome, r.code) for r in result.recipients] == [
        (Outcome.PERMANENT, 550),
        (Outcome.TRANSIENT, 450),
    ]
    assert writes(srv)[2:] == [b".\r\n", b"QUIT\r\n"]
    assert b"Hello" not in srv.transcript.data()


async def test_R29_pipelined_data_refused_means_rset() -> None:
    """R29: every reply of the group is checked; DATA refused: no body, then RSET."""
    script = [
        *prelude("PIPELINING"),
        expect_line("MAIL FROM:<s@x.test>"),
        expect_line(rcpt("a@y.test")),
        expect_line("DATA"),
        reply(250, "ok"),
        reply(550, "5.1.1 no"),
        reply(554, "5.5.1 no valid recipients"),
        expect_line("RSET"),
        reply(250, "ok"),
        *QUIT,
    ]
    async with scripted_stream(script, pair=trio.testing.lockstep_stream_pair) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=["a@y.test"])
        assert conn.is_usable
        await conn.aclose()
    assert result.recipients[0].code == 550
    assert writes(srv)[2:] == [b"RSET\r\n", b"QUIT\r\n"]


async def test_R29_thousand_rcpts_against_a_slow_reader_do_not_deadlock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R29: 1000 pipelined RCPTs; 4 KB windows each way, a server that reads 256 bytes
    every 10 ms and answers each line at once: no deadlock, every reply matched."""
    recipients = [f"r{i:04d}@example.test" for i in range(1000)]
    script: list[Step] = [*prelude("PIPELINING"), expect_line("MAIL FROM:<s@x.test>")]
    script.append(reply(250, "2.1.0 ok"))
    for address in recipients:
        script += [expect_line(rcpt(address)), reply(250, "2.1.5 ok")]
    script += [*accept_data(), *QUIT]

    def pair() -> Any:
        return bounded_stream_pair(4096, server_max_read=256, server_read_delay=0.01)

    async with scripted_stream(script, pair=pair) as (stream, srv):
        conn = await session(stream)
        start = trio.current_time()
        result = await conn.send(MSG, sender="s@x.test", recipients=recipients)
        elapsed = trio.current_time() - start
        await conn.aclose()
    assert result.ok, result.error
    assert len(result.accepted) == 1000
    assert elapsed < 60  # virtual seconds: the reads, not a timeout
    sent = srv.transcript.lines()
    assert sent[2:1002] == [rcpt(a)[:-2] for a in recipients]


# ------------------------------------------------------------------------------ R30


async def test_R30_size_is_checked_before_mail() -> None:
    """R30: SIZE 1000 and a 2000-octet message: a permanent 552 before MAIL; a smaller
    message carries SIZE=<octets> (CRLFs counted, not the dot-stuffing)."""
    big = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 20
    assert len(big) > 1000
    small = b"Subject: small\r\n\r\n.dot\r\n"
    script = [
        *prelude("SIZE 1000"),
        expect_line(f"MAIL FROM:<s@x.test> SIZE={len(small)}"),
        reply(250, "ok"),
        expect_line(rcpt("a@y.test")),
        reply(250, "ok"),
        *accept_data(),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        refused = await conn.send(big, sender="s@x.test", recipients=["a@y.test"])
        assert (refused.reply.code, refused.reply.enhanced_code) == (552, "5.3.4")
        assert refused.outcome is Outcome.PERMANENT and not refused.mail_accepted
        assert (await conn.send(small, sender="s@x.test", recipients=["a@y.test"])).ok
        await conn.aclose()
    assert srv.transcript.data().count(b"MAIL") == 1
    assert srv.transcript.bodies == [b"Subject: small\r\n\r\n..dot\r\n.\r\n"]


# ------------------------------------------------------------------------------ R31


async def test_R31_enhanced_codes_on_results() -> None:
    """R31: each recipient's result carries the code, enhanced code and text."""
    script = [
        *prelude("ENHANCEDSTATUSCODES"),
        expect_line("MAIL FROM:<s@x.test>"),
        reply(250, "2.1.0 sender ok"),
        expect_line(rcpt("ok@y.test")),
        reply(250, "2.1.5 recipient ok"),
        expect_line(rcpt("gone@y.test")),
        reply(550, "5.1.1 no such user"),
        expect_line(rcpt("many@y.test")),
        reply(452, "4.5.3 too many recipients"),
        expect_line("DATA"),
        reply(354, "go"),
        expect_data(),
        reply(250, "2.0.0 queued as X"),
        expect_line("MAIL FROM:<s@x.test>"),
        reply(421, "4.7.0 slow down"),
        expect_eof(allow_quit=False),
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await session(stream)
        result = await conn.send(
            MSG, sender="s@x.test", recipients=["ok@y.test", "gone@y.test", "many@y.test"]
        )
        throttled = await conn.send(MSG, sender="s@x.test", recipients=["ok@y.test"])
    assert [(r.outcome, r.code, r.enhanced_code, r.text) for r in result.recipients] == [
        (Outcome.ACCEPTED, 250, "2.0.0", "queued as X"),
        (Outcome.PERMANENT, 550, "5.1.1", "no such user"),
        (Outcome.TRANSIENT, 452, "4.5.3", "too many recipients"),
    ]
    assert throttled.outcome is Outcome.TRANSIENT and not throttled.mail_accepted
    assert (throttled.reply.code, throttled.reply.enhanced_code) == (421, "4.7.0")
    assert not conn.is_usable


# ------------------------------------------------------------------------------ R32

UTF8_LOCAL = "用户@例子.测试"
ASCII_LOCAL = "user@例子.测试"
A_LABEL = "user@xn--fsqu00a.xn--0zwm56d"


async def test_R32_utf8_address_without_smtputf8_is_not_sent() -> None:
    """R32: a UTF-8 local part and no SMTPUTF8: refused before MAIL (no downgrade); an
    ASCII local part with an IDN domain goes out as A-labels, without SMTPUTF8."""
    script = [
        *prelude("8BITMIME", "PIPELINING"),
        expect_line("MAIL FROM:<s@x.test>"),
        expect_line(rcpt(A_LABEL)),
        expect_line("DATA"),
        reply(250, "ok"),
        reply(250, "ok"),
        reply(354, "go"),
        expect_data(),
        reply(250, "ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        refused = await conn.send(MSG, sender="s@x.test", recipients=[UTF8_LOCAL])
        assert refused.outcome is Outcome.PERMANENT
        assert refused.reply.enhanced_code == "5.6.7"
        assert (await conn.send(MSG, sender="s@x.test", recipients=[ASCII_LOCAL])).ok
        await conn.aclose()
    assert srv.transcript.data().count(b"MAIL") == 1
    assert srv.transcript.data().isascii()


async def test_R32_utf8_header_address_to_a_server_without_smtputf8_is_a_553_value() -> None:
    """R32: an EmailMessage whose From has a UTF-8 local part cannot be written without
    RFC 6532; against a server without SMTPUTF8 it is a 553 5.6.7 result, no MAIL."""
    msg = EmailMessage()
    msg["From"] = UTF8_LOCAL
    msg["To"] = "b@x.test"
    msg["Subject"] = "hi"
    msg.set_content("hello\n")
    script = [*prelude("8BITMIME"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(msg)
        assert result.outcome is Outcome.PERMANENT
        assert result.reply is not None and result.reply.enhanced_code == "5.6.7"
        await conn.aclose()
    assert b"MAIL" not in srv.transcript.data()


async def test_R33_orcpt_for_a_utf8_recipient_is_utf8_addr_xtext() -> None:
    """R33 / RFC 6533 §3: ORCPT=utf-8; with \\x{HEX} for non-ASCII, + and =."""
    orcpt = "ORCPT=utf-8;\\x{7528}\\x{6237}@\\x{4F8B}\\x{5B50}.\\x{6D4B}\\x{8BD5}"
    script = [
        *prelude("DSN", "SMTPUTF8", "8BITMIME"),
        expect_line("MAIL FROM:<s@x.test> SMTPUTF8"),
        reply(250, "ok"),
        expect_line(rcpt(UTF8_LOCAL, orcpt)),
        reply(250, "ok"),
        *accept_data(),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await session(stream)
        dsn = triomail.DSN(orcpt=True)
        assert (await conn.send(MSG, sender="s@x.test", recipients=[UTF8_LOCAL], dsn=dsn)).ok
        await conn.aclose()


async def test_R32_smtputf8_parameter_when_needed_and_offered() -> None:
    """R32: with SMTPUTF8 advertised, a UTF-8 address goes out as UTF-8 with the
    SMTPUTF8 parameter on MAIL FROM; the EHLO name stays ASCII."""
    script = [
        *prelude("SMTPUTF8", "8BITMIME"),
        expect_line("MAIL FROM:<s@x.test> SMTPUTF8"),
        reply(250, "ok"),
        expect_line(rcpt(UTF8_LOCAL)),
        reply(250, "ok"),
        *accept_data(),
        expect_line("MAIL FROM:<s@x.test>"),
        reply(250, "ok"),
        expect_line(rcpt("plain@y.test")),
        reply(250, "ok"),
        *accept_data(),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await session(stream)
        assert (await conn.send(MSG, sender="s@x.test", recipients=[UTF8_LOCAL])).ok
        assert (await conn.send(MSG, sender="s@x.test", recipients=["plain@y.test"])).ok
        await conn.aclose()


# ------------------------------------------------------------------------------ R34


@pytest.mark.parametrize("advertised", [False, True])
async def test_R34_requiretls_needs_tls_and_the_extension(
    advertised: bool, server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R34: requiretls=True over verified TLS: without REQUIRETLS in the post-TLS EHLO
    the message fails with 5.7.30 and no MAIL; with it, MAIL carries REQUIRETLS."""
    caps = ["PIPELINING", "REQUIRETLS"] if advertised else ["PIPELINING"]
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("STARTTLS", "REQUIRETLS"),  # before TLS: worthless (R7)
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 go ahead"),
        starttls(),
        expect_line(EHLO),
        ehlo_reply(*caps),
    ]
    if advertised:
        script += [
            expect_line("MAIL FROM:<s@x.test> REQUIRETLS"),
            expect_line(rcpt("a@y.test")),
            expect_line("DATA"),
            reply(250, "ok"),
            reply(250, "ok"),
            reply(354, "go"),
            expect_data(),
            reply(250, "ok"),
        ]
    script += QUIT
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        conn = await triomail.open_connection(
            srv.host, srv.port, ssl_context=client_ssl_ctx, local_hostname="client.test"
        )
        result = await conn.send(MSG, sender="s@x.test", recipients=["a@y.test"], requiretls=True)
        await conn.aclose()
    if advertised:
        assert result.ok
    else:
        assert result.outcome is Outcome.PERMANENT
        assert result.reply.enhanced_code == "5.7.30"
        assert srv.transcript.data("tls") == EHLO + b"QUIT\r\n"


async def test_R34_requiretls_without_tls_is_refused() -> None:
    """R34: REQUIRETLS advertised in plaintext is not enough: 5.7.30, no MAIL."""
    async with scripted_stream([*prelude("REQUIRETLS"), *QUIT]) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=["a@y.test"], requiretls=True)
        await conn.aclose()
    assert result.reply.enhanced_code == "5.7.30"
    assert srv.transcript.data() == EHLO + b"QUIT\r\n"


# ------------------------------------------------------------------------- R37, R39


def _to_data(*rcpt_replies: str) -> list[Step]:
    steps: list[Step] = [expect_line("MAIL FROM:<s@x.test>"), reply(250, "ok")]
    for i, answer in enumerate(rcpt_replies):
        steps += [expect_line(rcpt(f"r{i}@y.test")), send_lines(answer)]
    return [*steps, expect_line("DATA"), reply(354, "go")]


@pytest.mark.parametrize("hang_up", [close, abort])
async def test_R37_lost_after_the_final_dot_is_unknown(hang_up: Any) -> None:
    """R37: the server reads the whole DATA and closes without replying: every accepted
    recipient is *unknown* (never permanent); a refused one keeps its 550."""
    script = [*prelude(), *_to_data("250 ok", "550 5.1.1 no", "250 ok"), expect_data(), hang_up()]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        rcpts = ["r0@y.test", "r1@y.test", "r2@y.test"]
        result = await conn.send(MSG, sender="s@x.test", recipients=rcpts)
        assert conn.awaiting_final_reply
        assert not conn.is_usable
    assert [r.outcome for r in result.recipients] == [
        Outcome.UNKNOWN,
        Outcome.PERMANENT,
        Outcome.UNKNOWN,
    ]
    assert result.outcome is Outcome.UNKNOWN and result.error
    assert srv.transcript.bodies == [MSG + b".\r\n"]


async def test_R39_lost_in_the_middle_of_the_body_is_transient() -> None:
    """R39: the server reads part of the body and closes: the final dot never went out,
    so every accepted recipient is transient (as 451), not sent, not unknown."""
    body = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 3000  # 300 KB
    script = [*prelude(), *_to_data("250 ok", "550 5.1.1 no"), read_bytes(1000), close()]
    async with scripted_stream(script, pair=trio.testing.lockstep_stream_pair) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(body, sender="s@x.test", recipients=["r0@y.test", "r1@y.test"])
        assert not conn.is_usable
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT, Outcome.PERMANENT]
    assert not conn.awaiting_final_reply
    assert srv.transcript.bodies[0] == body[:1000]


async def test_R46_refusal_while_the_body_is_written_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R46 (smtp-sink -A): a 552 sent while the body is still being written, then a
    close: the write fails and the server's refusal decides the outcome."""
    body = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 3000
    script = [
        *prelude(),
        *_to_data("250 ok"),
        read_bytes(1000),
        reply(552, "5.3.4 message too big"),
        close(),
    ]
    async with scripted_stream(script, pair=bounded_stream_pair) as (stream, _):
        conn = await session(stream)
        result = await conn.send(body, sender="s@x.test", recipients=["r0@y.test"])
    assert result.recipients[0].outcome is Outcome.PERMANENT
    assert result.reply.enhanced_code == "5.3.4"


# ------------------------------------------------------------------------------ R40


@pytest.mark.parametrize("pipelining", [False, True])
async def test_R40_421_to_the_third_rcpt_ends_everything(pipelining: bool) -> None:
    """R40: 421 to RCPT number 3: every recipient transient, nothing more written (no
    QUIT, no DATA), the connection closed and not reusable."""
    rcpts = [f"r{i}@y.test" for i in range(4)]
    if pipelining:
        script = [
            *prelude("PIPELINING"),
            expect_line("MAIL FROM:<s@x.test>"),
            *[expect_line(rcpt(r)) for r in rcpts],
            expect_line("DATA"),
            reply(250, "ok"),
            reply(250, "ok"),
            reply(250, "ok"),
            reply(421, "4.7.0 closing"),
            expect_eof(allow_quit=False),
        ]
    else:
        script = [*prelude(), *_to_data("250 ok", "250 ok", "421 4.7.0 closing")[:-2]]
        script.append(expect_eof(allow_quit=False))
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=rcpts)
        assert not conn.is_usable
        with pytest.raises(triomail.SMTPDisconnected):
            await conn.send(MSG, sender="s@x.test", recipients=rcpts)
        await conn.aclose()
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT] * 4
    assert result.recipients[2].code == 421
    data = srv.transcript.data()
    assert b"QUIT" not in data and b"Hello" not in data
    if not pipelining:
        assert data.endswith(rcpt("r2@y.test"))


# ------------------------------------------------------------------------------ R41


async def test_R41_per_recipient_results() -> None:
    """R41: 250, 450 and 550 replies: accepted, transient, permanent, each with its own
    reply; the message goes to the accepted one."""
    script = [*prelude(), *_to_data("250 2.1.5 ok", "450 4.2.1 busy", "550 5.1.1 unknown")]
    script += [expect_data(), reply(250, "2.0.0 queued"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(
            MSG, sender="s@x.test", recipients=["r0@y.test", "r1@y.test", "r2@y.test"]
        )
        await conn.aclose()
    assert [(r.outcome, r.code) for r in result.recipients] == [
        (Outcome.ACCEPTED, 250),
        (Outcome.TRANSIENT, 450),
        (Outcome.PERMANENT, 550),
    ]
    assert result.accepted == ["r0@y.test"]
    assert srv.transcript.bodies == [MSG + b".\r\n"]


async def test_R41_no_recipient_accepted_means_no_data_but_rset() -> None:
    """R41/R45: no RCPT accepted: no DATA, RSET instead; the connection stays usable."""
    script = [
        *prelude(),
        expect_line("MAIL FROM:<s@x.test>"),
        reply(250, "ok"),
        expect_line(rcpt("r0@y.test")),
        reply(450, "4.2.1 busy"),
        expect_line(rcpt("r1@y.test")),
        reply(550, "5.1.1 unknown"),
        expect_line("RSET"),
        reply(250, "ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(MSG, sender="s@x.test", recipients=["r0@y.test", "r1@y.test"])
        assert conn.is_usable
        await conn.aclose()
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT, Outcome.PERMANENT]
    assert b"DATA" not in srv.transcript.data()


# ------------------------------------------------------------------------------ R16

SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\r\n",
]
SMUGGLED = b"MAIL FROM:<x@evil.test>\r\nRCPT TO:<y@victim.test>\r\nDATA\r\nsmuggled\r\n.\r\n"


def reference_canonical(data: bytes) -> bytes:
    """An independent normaliser: every CR, LF or CRLF becomes CRLF, final CRLF added."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def reference_unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize(
    "body",
    [
        *(b"Subject: s\r\n\r\nhello" + e + SMUGGLED + b"tail" for e in SMUGGLING_ENDINGS),
        b".starts with a dot\r\n.\r\n..\r\nend",
        b"Subject: no final newline\r\n\r\nlast line",
    ],
)
async def test_R16_smuggling_payloads_leave_one_terminator(body: bytes) -> None:
    """R16 end to end: whatever the bytes, on the wire CR and LF appear only as CRLF,
    ``\\r\\n.\\r\\n`` appears once, as the last 5 bytes, and un-stuffing gives back the
    normalised message."""
    script = [*prelude(), *_to_data("250 ok"), expect_data(), reply(250, "ok"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        assert (await conn.send(body, sender="s@x.test", recipients=["r0@y.test"])).ok
        await conn.aclose()
    wire = srv.transcript.bodies[0]
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert reference_unstuff(wire) == reference_canonical(body)
    assert srv.transcript.data().endswith(b"DATA\r\n" + wire + b"QUIT\r\n")


async def test_R16_R17_nul_payload_is_refused_before_anything_is_written() -> None:
    """R17: ``\\r\\n\\x00.\\r\\n`` (NUL) is refused locally; nothing is written for it."""
    async with scripted_stream([*prelude(), *QUIT]) as (stream, srv):
        conn = await session(stream)
        with pytest.raises(triomail.LocalProtocolError, match="NUL"):
            await conn.send(b"x\r\n\x00.\r\n" + SMUGGLED, sender="s@x.test", recipients=["r@y"])
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"QUIT\r\n"


# ------------------------------------------------------------------------------ R18


def _eight_bit_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "s@x.test"
    msg["To"] = "r0@y.test"
    msg["Subject"] = "Grüße"
    msg.set_content("Grüße aus Köln, ½ € — ça va?\n", cte="8bit")
    return msg


async def test_R18_eight_bit_email_message_is_sent_as_7bit_without_8bitmime() -> None:
    """R18: an 8-bit EmailMessage to a server without 8BITMIME goes out 7-bit (no BODY=
    parameter) and decodes back to the same text."""
    script = [*prelude("PIPELINING")]
    script += [expect_line("MAIL FROM:<s@x.test>"), expect_line(rcpt("r0@y.test"))]
    script += [expect_line("DATA"), reply(250, "ok"), reply(250, "ok"), reply(354, "go")]
    script += [expect_data(), reply(250, "ok"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        assert (await conn.send(_eight_bit_message())).ok
        await conn.aclose()
    wire = srv.transcript.bodies[0]
    assert wire.isascii() and srv.transcript.data().isascii()
    parsed = BytesParser(policy=default_policy).parsebytes(reference_unstuff(wire))
    assert parsed["Subject"] == "Grüße"
    assert parsed.get_content() == "Grüße aus Köln, ½ € — ça va?\n"


async def test_R18_eight_bit_raw_bytes_without_8bitmime_are_refused_before_mail() -> None:
    """R18: raw 8-bit bytes cannot be re-encoded: refused (5.6.3) before MAIL; with
    8BITMIME they go out as they are with BODY=8BITMIME."""
    raw = "Subject: x\r\n\r\nGrüße\r\n".encode()
    script = [
        *prelude("8BITMIME"),
        expect_line("MAIL FROM:<s@x.test> BODY=8BITMIME"),
        reply(250, "ok"),
        expect_line(rcpt("r0@y.test")),
        reply(250, "ok"),
        *accept_data(),
        *QUIT,
    ]
    async with scripted_stream([*prelude(), *QUIT]) as (stream, plain):
        conn = await session(stream)
        refused = await conn.send(raw, sender="s@x.test", recipients=["r0@y.test"])
        await conn.aclose()
    assert refused.outcome is Outcome.PERMANENT and refused.reply.enhanced_code == "5.6.3"
    assert plain.transcript.data() == EHLO + b"QUIT\r\n"
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        assert (await conn.send(raw, sender="s@x.test", recipients=["r0@y.test"])).ok
        await conn.aclose()
    assert srv.transcript.bodies == [raw + b".\r\n"]
