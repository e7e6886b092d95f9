"""The capture server over raw bytes: grammar, strictness, limits, TLS, AUTH, faults."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import trio
from helpers import sink_raw
from helpers.sink_raw import RawClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triomail._sink.syntax import parse_esmtp_params, parse_path_argument
from triomail.testing import CapturedMessage, Fault, SMTPSink


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    await sink_raw.close_all()


MSG = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nbody\r\n"


def plain(b64: str) -> bytes:
    return base64.b64decode(b64)


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


# --- session basics --------------------------------------------------------------------


async def test_greeting_and_ehlo_advertise_every_extension() -> None:
    async with SMTPSink(hostname="sink.test") as sink:
        client = await RawClient.connect(sink, ehlo=None)
        reply = await client.cmd("EHLO me.example")
        assert reply.code == 250
        assert reply.lines == [
            "sink.test Hello me.example",
            "PIPELINING",
            "SIZE 10485760",
            "8BITMIME",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "STARTTLS",
        ]
        assert client.received.startswith(b"220 sink.test ESMTP")


async def test_helo_session_has_no_extensions() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink, ehlo=None)
        assert (await client.cmd("HELO me.example")).lines == ["localhost"]
        reply = await client.cmd("MAIL FROM:<a@example.org> SIZE=10")
        assert (reply.code, reply.text) == (555, "Error: unsupported parameter SIZE")
        assert (await client.cmd("MAIL FROM:<a@example.org>")).text == "Ok"  # no 2.1.0 code
        assert (await client.bdat(b"abc", last=True)).code == 502  # CHUNKING not offered


async def test_pipelined_commands_are_answered_in_order() -> None:
    async with SMTPSink() as sink:
        client = await RawClient.connect(sink)
        await client.send(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            b"RCPT TO:<not an address>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
        )
        codes = [r.code for r in await client.replies(5)]
        assert codes == [250, 250, 501, 250, 354]
        await client.send(MSG + b".\r\nQUIT\r\n")
        assert [r.code for r in await client.replies(2)] == [250, 221]
        assert await client.closed()
        [message] = sink.messages
        assert message.rcpt_to == ["b@example.net", "c@example.net"]
        assert message.data == MSG


@pytest.mark.parametrize(
    ("wire", "data"),
    [
        (b"..leading\r\n", b".leading\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n...\r\n", b"a\r\n..\r\n"),
        (b"x\r\n..\r\n..\r\n", b"x\r\n.\r\n.\r\n"),
        (b"no dots . here .\r\n", b"no dots . here .\r\n"),
        (b"", b""),
        (b"\r\n", b"\r\n"),
    ],
)
async def test_dot_unstuffing_is_exact(wire: bytes, data: bytes) -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        reply = await client.transaction(wire + b".\r\n")
        assert reply.code == 250, reply
        assert sink.messages[0].data == data


async def test_data_arriving_one_byte_at_a_time() -> None:
    wire = b"Subject: x\r\n\r\n..a\r\nb\r\n.\r\n"
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        for i in range(len(wire)):
            await client.send(wire[i : i + 1])
            await trio.sleep(0.001)  # separate TCP segments
        assert (await client.reply()).code == 250
        assert sink.messages[0].data == b"Subject: x\r\n\r\n.a\r\nb\r\n"


def _client_encode(body: bytes) -> bytes:
    """What a correct client sends (RFC 5321 §2.3.8 and §4.5.2), as a reference."""
    body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"\r", b"a", b" ", b"..", b"\r\n.\r\n"])).map(
        b"".join
    )
)
async def test_correctly_encoded_data_roundtrips(body: bytes) -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        wire = _client_encode(body)
        reply = await client.transaction(wire)
        assert reply.code == 250, reply
        expected = wire[: -len(b".\r\n")]
        expected = (b"\r\n" + expected).replace(b"\r\n.", b"\r\n")[2:]
        assert sink.messages[0].data == expected
        assert sink.messages[0].data.replace(b"\r\n", b"") == body.replace(b"\r", b"").replace(
            b"\n", b""
        )


# --- strictness: content -------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<x@evil.example>\r\nRCPT TO:<y@example.net>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize(
    "ending",
    [
        b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
        b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\r\n",
    ],
)  # fmt: skip
async def test_smuggling_endings_are_content_and_rejected(ending: bytes) -> None:
    """Only <CRLF>.<CRLF> ends DATA; the rest is content and is refused (smtpsmug)."""
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        reply = await client.transaction(b"Subject: x\r\n\r\nbody" + ending + SMUGGLED + b".\r\n")
        assert reply.code == 550, reply
        assert reply.text.startswith(("5.5.2 Error: bare", "5.6.0 Error: NUL"))
        # Nothing was executed from the smuggled part: the next reply is NOOP's.
        assert (await client.cmd("NOOP")).code == 250
        assert sink.messages == []


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"Subject: x\n\nbody\r\n", "5.5.2 Error: bare <LF> received"),
        (b"Subject: x\r\n\r\nbo\rdy\r\n", "5.5.2 Error: bare <CR> received"),
        (b"Subject: x\r\n\r\nbo\x00dy\r\n", "5.6.0 Error: NUL character in message data"),
        (b"Subject: x\r\n\r\nh\xc3\xa9\r\n", "5.6.0 Error: 8-bit data without BODY=8BITMIME or SMTPUTF8"),
        (b"x" * 999 + b"\r\n", "5.5.6 Error: message line longer than 1000 octets"),
        (b"Subject: x\r\n\r\n.unstuffed\r\n", '5.5.2 Error: line starts with an unstuffed "."'),
    ],
)  # fmt: skip
async def test_bad_content_is_rejected(body: bytes, text: str) -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        reply = await client.transaction(body + b".\r\n")
        assert reply.text == text
        assert reply.code in (500, 550)
        assert sink.messages == []
        # The transaction is over; a new one works.
        assert (await client.transaction(MSG + b".\r\n")).code == 250


async def test_longest_allowed_line_and_declared_8bit_are_accepted() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        assert (await client.transaction(b"x" * 998 + b"\r\n.\r\n")).code == 250
        eight_bit = "Subject: h\u00e9\r\n\r\nh\u00e9\r\n".encode()
        for option in ("BODY=8BITMIME", "SMTPUTF8"):
            assert (await client.cmd(f"MAIL FROM:<a@example.org> {option}")).code == 250
            assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
            assert (await client.cmd("DATA")).code == 354
            await client.send(eight_bit + b".\r\n")
            assert (await client.reply()).code == 250
        assert [m.data for m in sink.messages[1:]] == [eight_bit, eight_bit]
        assert sink.messages[2].message["Subject"] == "h\u00e9"


async def test_not_strict_still_rejects_bare_newlines_only() -> None:
    async with SMTPSink(tls=False, strict=False) as sink:
        client = await RawClient.connect(sink)
        reply = await client.transaction(b"a\x00\r\n.unstuffed\r\n\xff\r\n.\r\n")
        assert reply.code == 250
        assert sink.messages[0].data == b"a\x00\r\nunstuffed\r\n\xff\r\n"  # RFC 5321 §4.5.2
        assert (await client.transaction(b"a\nb\r\n.\r\n")).code == 550


# --- BDAT (RFC 3030) -------------------------------------------------------------------


async def test_bdat_chunks_are_assembled_byte_for_byte() -> None:
    chunks = [b"Subject: chunked\r\n", b"\r\n.\r\n..not unstuffed\r\n", b".\r\nQUIT\r\n", b""]
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        wire = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        for chunk in chunks[:-1]:
            wire += b"BDAT %d\r\n" % len(chunk) + chunk
        wire += b"BDAT 0 LAST\r\n"
        await client.send(wire)  # all pipelined in one write
        replies = await client.replies(6)
        assert [r.code for r in replies] == [250] * 6
        assert replies[2].text == "2.0.0 Ok: 18 octets received"
        [message] = sink.messages
        assert message.data == b"".join(chunks)
        assert message.transfer == "BDAT"
        assert (await client.cmd("NOOP")).code == 250  # "QUIT" inside a chunk did nothing


async def test_bdat_chunk_split_across_writes_and_last_with_data() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        await client.send(b"BDAT 12 LAST\r\nSubje")
        await trio.sleep(0.01)
        await client.send(b"ct: x\r\n")
        assert [r.code for r in await client.replies(3)] == [250, 250, 250]
        assert sink.messages[0].data == b"Subject: x\r\n"


async def test_bdat_errors_still_consume_the_chunk() -> None:
    async with SMTPSink(tls=False, max_message_size=20) as sink:
        client = await RawClient.connect(sink)
        # Out of sequence: 503, and the chunk's "QUIT" is not executed.
        assert (await client.bdat(b"QUIT\r\n")).code == 503
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.bdat(b"ab\r\n", last=True)).code == 554  # no recipients
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
        reply = await client.bdat(b"y" * 30)
        assert (reply.code, reply.text) == (552, "5.3.4 Error: message file too big")
        # RFC 3030: after a failed chunk the transaction is dead until RSET.
        assert (await client.bdat(b"ok", last=True)).code == 503
        assert (await client.cmd("DATA")).code == 503  # never mix DATA into BDAT
        assert (await client.cmd("RSET")).code == 250
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
        assert (await client.bdat(b"ab\ncd\r\n", last=True)).code == 550  # bare LF
        assert sink.messages == []


async def test_bdat_without_valid_size_closes_the_connection() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        reply = await client.cmd("BDAT many")
        assert (reply.code, reply.text) == (501, "5.5.4 Syntax: BDAT count [LAST]")
        assert await client.closed()


# --- strictness: commands --------------------------------------------------------------


@pytest.mark.parametrize(
    ("commands", "code", "text"),
    [
        (["MAIL FROM:<a@example.org>"], 503, "Error: send HELO/EHLO first"),
        (["EHLO x", "RCPT TO:<b@example.net>"], 503, "5.5.1 Error: need MAIL command"),
        (["EHLO x", "DATA"], 503, "5.5.1 Error: need MAIL command"),
        (["EHLO x", "MAIL FROM:<a@example.org>", "DATA"], 554, "5.5.1 Error: no valid recipients"),
        (
            ["EHLO x", "MAIL FROM:<a@example.org>", "MAIL FROM:<a@example.org>"],
            503,
            "5.5.1 Error: nested MAIL command",
        ),
        (["EHLO x", "MAIL FROM:a@example.org"], 501, "5.1.7 Error: bad sender address syntax"),
        (["EHLO x", "MAIL FROM: <a@example.org>"], 501, "5.1.7 Error: bad sender address syntax"),
        (["EHLO x", "MAIL TO:<a@example.org>"], 501, "5.5.4 Syntax: MAIL FROM:<address>"),
        (["EHLO x", "MAIL FROM:<a@example.org> FOO=1"], 555, "5.5.4 Error: unsupported parameter FOO"),
        (["EHLO x", "MAIL FROM:<a@example.org> BODY=9BIT"], 501, "5.5.4 Error: bad value for BODY"),
        (["EHLO x", "MAIL FROM:<a@example.org> SIZE=1 SIZE=2"], 501, "5.5.4 Error: duplicate parameter SIZE"),
        (["EHLO x", "MAIL FROM:<j\u00f6rg@example.org>"], 553, "5.6.7 Error: non-ASCII address needs SMTPUTF8"),
        (["EHLO x", "MAIL FROM:<" + "l" * 65 + "@example.org>"], 501, "5.1.7 Error: bad sender address syntax"),
        (["EHLO x", "MAIL FROM:<>", "RCPT TO:<a b@example.net>"], 501, "5.1.3 Error: bad recipient address syntax"),
        (["EHLO x", "MAIL FROM:<>", "RCPT TO:<>"], 501, "5.1.3 Error: bad recipient address syntax"),
        (["EHLO x", "MAIL FROM:<>", "RCPT TO:<b@example.net> NOTIFY=SOMETIMES"], 501, "5.5.4 Error: bad value for NOTIFY"),
        (["EHLO x", "MAIL FROM:<>", "RCPT TO:<b@example.net> SIZE=3"], 555, "5.5.4 Error: unsupported parameter SIZE"),
        (["XYZZY"], 500, "Error: command not recognized"),
        ([""], 500, "Error: command not recognized"),
        (["EHLO"], 501, "Syntax: EHLO hostname"),
        (["EHLO x", "RSET now"], 501, "5.5.4 Syntax: RSET"),
        (["EHLO x", "VRFY"], 501, "5.5.4 Syntax: VRFY address"),
        (["EHLO x", "EXPN list"], 502, "5.5.1 Error: command not implemented"),
        (["EHLO x", "AUTH PLAIN"], 503, "5.5.1 Error: authentication not enabled"),
        (["EHLO x", "DATA now"], 501, "5.5.4 Syntax: DATA"),
    ],
)  # fmt: skip
async def test_command_errors(commands: list[str], code: int, text: str) -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink, ehlo=None)
        for command in commands[:-1]:
            assert (await client.cmd(command)).code == 250
        reply = await client.cmd(commands[-1])
        assert (reply.code, reply.text) == (code, text)
        assert (await client.cmd("NOOP")).code == 250  # the session goes on


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"NOOP\n", "Error: bare <LF> received"),
        (b"NO\rOP\r\n", "Error: bare <CR> received"),
        (b"NOOP \x00\r\n", "Error: control character in command"),
        (b"NOOP \xff\r\n", "Error: invalid UTF-8 in command"),
        (b"NOOP " + b"x" * 3000 + b"\r\n", "Error: line too long"),
    ],
)
async def test_malformed_command_lines(line: bytes, text: str) -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink, ehlo=None)
        await client.send(line)
        reply = await client.reply()
        assert (reply.code, reply.text) == (500, text)
        assert (await client.cmd("NOOP")).code == 250


async def test_valid_paths_and_parameters_are_recorded() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        for line in [
            "MAIL FROM:<a@example.org> RET=HDRS ENVID=id+2B1 SIZE=52 BODY=7BIT",
            "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net",
            "RCPT TO:<Postmaster>",
            'RCPT TO:<"quoted local"@[192.0.2.1]>',
            "RCPT TO:<@relay.example:c@example.net>",
        ]:
            assert (await client.cmd(line)).code == 250, line
        assert (await client.cmd("DATA")).code == 354
        await client.send(MSG + b".\r\n")
        assert (await client.reply()).code == 250
        [message] = sink.messages
        assert message.mail_from == "a@example.org"
        assert message.mail_options == ["RET=HDRS", "ENVID=id+2B1", "SIZE=52", "BODY=7BIT"]
        assert message.rcpt_to == [
            "b@example.net",
            "Postmaster",
            '"quoted local"@[192.0.2.1]',
            "c@example.net",
        ]
        assert message.rcpt_options == [
            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@example.net"],
            [],
            [],
            [],
        ]
        assert message.helo == "client.example"
        assert message.peer[0] == "127.0.0.1"
        assert isinstance(message.message, EmailMessage)
        assert message.subject == "hello"


async def test_smtputf8_addresses() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8")).code == 250
        assert (await client.cmd("RCPT TO:<\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(MSG + b".\r\n")
        assert (await client.reply()).code == 250
        assert sink.messages[0].mail_from == "j\u00f6rg@b\u00fccher.example"
        assert sink.messages[0].rcpt_to == ["\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a"]


async def test_vrfy_noop_rset_help_quit() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        reply = await client.cmd("VRFY someone")
        assert (reply.code, reply.text) == (252, "2.0.0 Cannot VRFY user, but will accept message")
        assert (await client.cmd("NOOP with argument")).code == 250
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RSET")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 503  # RSET ended it
        help_reply = await client.cmd("HELP")
        assert help_reply.code == 214
        assert "BDAT" in help_reply.text
        assert (await client.cmd("QUIT")).code == 221
        assert await client.closed()


@pytest.mark.parametrize(
    "wire",
    [
        b"EHLO again\r\nNOOP\r\n",  # EHLO must end a group (RFC 2920 §3.1)
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n",
        b"NOOP\r\nNOOP\r\n",
    ],
)
async def test_pipelining_violations_are_caught(wire: bytes) -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
        await client.send(wire)
        replies = []
        while not await client.closed():
            replies.append(await client.reply())
        assert replies[-1].code == 554
        assert replies[-1].text == "5.5.0 Error: SMTP protocol synchronization"


async def test_without_pipelining_any_pipelined_command_is_caught() -> None:
    async with SMTPSink(tls=False, hide_extensions=["PIPELINING"]) as sink:
        client = await RawClient.connect(sink)
        assert "PIPELINING" not in client.received.decode()
        await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        reply = await client.reply()
        assert (reply.code, reply.text) == (554, "5.5.0 Error: SMTP protocol synchronization")
        assert await client.closed()


# --- extensions hidden or added --------------------------------------------------------


async def test_hidden_extensions_are_neither_advertised_nor_accepted() -> None:
    hidden = ["SIZE", "DSN", "CHUNKING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
    async with SMTPSink(tls=False, hide_extensions=hidden, extra_extensions=["XFOO bar"]) as sink:
        client = await RawClient.connect(sink, ehlo=None)
        ehlo = await client.cmd("EHLO x")
        assert ehlo.lines[1:] == ["PIPELINING", "XFOO bar"]
        for param in ("SIZE=1", "RET=FULL", "BODY=8BITMIME", "SMTPUTF8"):
            reply = await client.cmd(f"MAIL FROM:<a@example.org> {param}")
            assert reply.code == 555, param
            assert not reply.text.startswith("5.")  # no enhanced codes either
        assert (await client.bdat(b"QUIT", last=True)).code == 502
        assert (await client.cmd("NOOP")).code == 250


# --- limits ---------------------------------------------------------------------------


async def test_message_size_limit() -> None:
    async with SMTPSink(tls=False, max_message_size=1000) as sink:
        client = await RawClient.connect(sink)
        assert "SIZE 1000" in client.received.decode()
        reply = await client.cmd("MAIL FROM:<a@example.org> SIZE=1001")
        assert (reply.code, reply.text) == (552, "5.3.4 Error: message size exceeds fixed limit")
        big = (b"x" * 98 + b"\r\n") * 20_000  # 2 MB, far past the buffering limit
        reply = await client.transaction(big + b".\r\n")
        assert (reply.code, reply.text) == (552, "5.3.4 Error: message file too big")
        reply = await client.transaction(b"x" * 999 + b"\r\n.\r\n")
        assert reply.code == 552
        assert (await client.transaction(b"y" * 998 + b"\r\n.\r\n")).code == 250  # 1000
        assert len(sink.messages) == 1


async def test_recipient_limit() -> None:
    async with SMTPSink(tls=False, max_recipients=3) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        codes = [(await client.cmd(f"RCPT TO:<r{i}@example.net>")) for i in range(5)]
        assert [r.code for r in codes] == [250, 250, 250, 452, 452]
        assert codes[3].text == "4.5.3 Error: too many recipients"
        assert (await client.cmd("DATA")).code == 354
        await client.send(MSG + b".\r\n")
        assert (await client.reply()).code == 250
        assert sink.messages[0].rcpt_to == ["r0@example.net", "r1@example.net", "r2@example.net"]


async def test_connection_limit() -> None:
    async with SMTPSink(tls=False, max_connections=2) as sink:
        first = await RawClient.connect(sink)
        second = await RawClient.connect(sink)
        third = RawClient(await trio.open_tcp_stream(sink.host, sink.port))
        reply = await third.reply()
        assert (reply.code, reply.text) == (421, "localhost Error: too many connections")
        assert await third.closed()
        assert sink.active_connections == 2
        assert (await first.cmd("QUIT")).code == 221
        assert await first.closed()
        await trio.sleep(0.05)
        fourth = await RawClient.connect(sink)
        assert (await fourth.cmd("NOOP")).code == 250
        assert (await second.cmd("NOOP")).code == 250


async def test_stored_message_limit_is_visible() -> None:
    async with SMTPSink(tls=False, max_stored=1) as sink:
        client = await RawClient.connect(sink)
        assert (await client.transaction(MSG + b".\r\n")).code == 250
        reply = await client.transaction(MSG + b".\r\n")
        assert (reply.code, reply.text) == (452, "4.3.1 Error: insufficient system storage")
        sink.clear()
        assert (await client.transaction(MSG + b".\r\n")).code == 250
        assert sink.received == 1


# --- TLS and AUTH ---------------------------------------------------------------------


async def test_starttls_forgets_the_session_and_marks_messages() -> None:
    async with SMTPSink(auth={"alice": "s3cret"}) as sink:
        client = await RawClient.connect(sink)
        assert "AUTH" not in client.received.decode()  # no AUTH before TLS
        reply = await client.cmd("AUTH PLAIN " + b64("\0alice\0s3cret"))
        assert (reply.code, reply.text) == (530, "5.7.0 Must issue a STARTTLS command first")
        await client.starttls(sink.client_ssl_context())
        # RFC 3207 §4.2: the EHLO from before TLS is forgotten.
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 503
        ehlo = await client.cmd("EHLO again")
        assert "STARTTLS" not in ehlo.lines
        assert "AUTH PLAIN LOGIN" in ehlo.lines
        assert (await client.cmd("STARTTLS")).code == 503
        reply = await client.cmd("AUTH PLAIN " + b64("\0alice\0s3cret"))
        assert (reply.code, reply.text) == (235, "2.7.0 Authentication successful")
        assert (await client.transaction(MSG + b".\r\n")).code == 250
        [message] = sink.messages
        assert message.tls
        assert message.authenticated_as == "alice"


async def test_starttls_with_pipelined_commands_is_refused() -> None:
    for strict in (True, False):
        async with SMTPSink(strict=strict) as sink:
            client = await RawClient.connect(sink)
            await client.send(b"STARTTLS\r\nMAIL FROM:<a@example.org>\r\n")
            reply = await client.reply()
            assert reply.code == 554
            assert await client.closed()


async def test_implicit_tls() -> None:
    async with SMTPSink(implicit_tls=True) as sink:
        client = await RawClient.connect(sink, implicit_tls=True)
        assert "STARTTLS" not in client.received.decode()
        assert (await client.transaction(MSG + b".\r\n")).code == 250
        assert sink.messages[0].tls


async def test_tls_handshake_failure_only_ends_that_connection() -> None:
    async with SMTPSink(implicit_tls=True) as sink:
        raw = RawClient(await trio.open_tcp_stream(sink.host, sink.port))
        await raw.send(b"EHLO plaintext\r\n")
        while not await raw.closed():
            pass
        client = await RawClient.connect(sink, implicit_tls=True)
        assert (await client.cmd("NOOP")).code == 250


@pytest.mark.parametrize(
    ("steps", "final"),
    [
        (["AUTH PLAIN " + b64("\0alice\0wrong")], "535 5.7.8 Error: authentication failed"),
        (["AUTH PLAIN " + b64("bob\0alice\0s3cret")], "535 5.7.8 Error: authentication failed"),
        (["AUTH PLAIN " + b64("alice\0alice\0s3cret")], "235 2.7.0 Authentication successful"),
        (["AUTH PLAIN", b64("\0alice\0s3cret")], "235 2.7.0 Authentication successful"),
        (["AUTH PLAIN", "*"], "501 5.7.0 Error: authentication aborted"),
        (["AUTH PLAIN not-base64!"], "501 5.5.2 Error: malformed authentication response"),
        (["AUTH LOGIN", b64("alice"), b64("s3cret")], "235 2.7.0 Authentication successful"),
        (["AUTH LOGIN " + b64("alice"), b64("s3cret")], "235 2.7.0 Authentication successful"),
        (["AUTH LOGIN", b64("alice"), b64("nope")], "535 5.7.8 Error: authentication failed"),
        (["AUTH CRAM-MD5"], "504 5.5.4 Error: unsupported authentication mechanism"),
    ],
)
async def test_auth_exchanges(steps: list[str], final: str) -> None:
    async with SMTPSink(tls=False, auth={"alice": "s3cret"}, allow_insecure_auth=True) as sink:
        client = await RawClient.connect(sink)
        assert "AUTH PLAIN LOGIN" in client.received.decode()
        for step in steps[:-1]:
            assert (await client.cmd(step)).code == 334
        assert str(await client.cmd(steps[-1])) == final
        if final.startswith("235"):
            again = await client.cmd("AUTH PLAIN " + b64("\0alice\0s3cret"))
            assert (again.code, again.text) == (503, "5.5.1 Error: already authenticated")


async def test_login_prompts_are_the_standard_ones() -> None:
    async with SMTPSink(tls=False, auth={"u": "p"}, allow_insecure_auth=True) as sink:
        client = await RawClient.connect(sink)
        assert plain((await client.cmd("AUTH LOGIN")).text) == b"Username:"
        assert plain((await client.cmd(b64("u"))).text) == b"Password:"
        assert (await client.cmd(b64("p"))).code == 235


async def test_require_tls_and_require_auth() -> None:
    async with SMTPSink(auth={"u": "p"}, require_tls=True, require_auth=True) as sink:
        client = await RawClient.connect(sink)
        reply = await client.cmd("MAIL FROM:<a@example.org>")
        assert (reply.code, reply.text) == (530, "5.7.0 Must issue a STARTTLS command first")
        await client.starttls(sink.client_ssl_context())
        await client.cmd("EHLO again")
        reply = await client.cmd("MAIL FROM:<a@example.org>")
        assert (reply.code, reply.text) == (530, "5.7.0 Authentication required")
        assert (await client.cmd("AUTH PLAIN " + b64("\0u\0p"))).code == 235
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250


async def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="allow_insecure_auth"):
        SMTPSink(tls=False, auth={"u": "p"})
    with pytest.raises(ValueError, match="implicit_tls needs tls"):
        SMTPSink(tls=False, implicit_tls=True)
    with pytest.raises(ValueError, match="auth_mechanisms"):
        SMTPSink(auth_mechanisms=["CRAM-MD5"])
    with pytest.raises(ValueError, match="require_tls needs tls"):
        SMTPSink(tls=False, require_tls=True)
    with pytest.raises(ValueError, match="require_auth needs auth"):
        SMTPSink(require_auth=True)
    with pytest.raises(ValueError, match="512"):
        SMTPSink(max_line_length=100)
    with pytest.raises(RuntimeError, match="no generated certificate"):
        SMTPSink(tls=False).client_ssl_context()
    with pytest.raises(RuntimeError, match="not running"):
        _ = SMTPSink(tls=False).port


# --- fault injection ------------------------------------------------------------------


async def test_fault_rules_are_validated() -> None:
    assert Fault("rcpt", code=550).command == "RCPT"
    for bad in [
        {"command": "FOO"},
        {"command": "MAIL", "code": 600},
        {"command": "MAIL", "code": 450, "raw": b"450 x\r\n"},
        {"command": "MAIL", "text": "no code"},
        {"command": "MAIL", "recipient": "a@b"},
        {"command": "RCPT", "drop": "during_data"},
        {"command": "DATA", "drop": "during_data", "code": 451},
        {"command": "MAIL", "times": 0},
        {"command": "MAIL", "message": 0},
        {"command": "MAIL", "delay": -1},
    ]:
        with pytest.raises(ValueError):
            Fault(**bad)  # type: ignore[arg-type]


async def test_ehlo_refused_or_starttls_stripped() -> None:
    """The server shapes of R3/R4: no ESMTP at all, or STARTTLS hidden / refused."""
    faults = [Fault("EHLO", code=502, text="5.5.1 no ESMTP here", times=1)]
    async with SMTPSink(faults=faults) as sink:
        client = await RawClient.connect(sink, ehlo=None)
        assert (await client.cmd("EHLO x")).code == 502
        assert (await client.cmd("HELO x")).code == 250
        assert (await client.cmd("STARTTLS")).code == 502  # no extensions after HELO
    async with SMTPSink(hide_extensions=["STARTTLS"]) as sink:
        client = await RawClient.connect(sink)
        assert "STARTTLS" not in client.received.decode()
        assert (await client.cmd("STARTTLS")).code == 502
    async with SMTPSink(
        faults=[Fault("STARTTLS", code=454, text="4.7.0 TLS not available")]
    ) as sink:
        client = await RawClient.connect(sink)
        assert str(await client.cmd("STARTTLS")) == "454 4.7.0 TLS not available"
        assert (await client.cmd("NOOP")).code == 250  # still plaintext, still talking


async def test_fault_replaces_a_reply_and_the_command_has_no_effect() -> None:
    fault = Fault("MAIL", code=451, text="4.3.0 Try again later")
    async with SMTPSink(tls=False, faults=[fault]) as sink:
        client = await RawClient.connect(sink)
        assert str(await client.cmd("MAIL FROM:<a@example.org>")) == "451 4.3.0 Try again later"
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 503


async def test_fault_for_one_recipient() -> None:
    fault = Fault("RCPT", code=550, text="5.1.1 No such user", recipient="Bad@Example.net")
    async with SMTPSink(tls=False, faults=[fault]) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<good@example.net>")).code == 250
        assert str(await client.cmd("RCPT TO:<bad@example.net>")) == "550 5.1.1 No such user"
        assert (await client.cmd("DATA")).code == 354
        await client.send(MSG + b".\r\n")
        assert (await client.reply()).code == 250
        assert sink.messages[0].rcpt_to == ["good@example.net"]


async def test_fault_for_the_nth_message_counts_every_mail_command() -> None:
    faults = [Fault(".", code=451, message=2), Fault("MAIL", code=452, message=4)]
    async with SMTPSink(tls=False, faults=faults) as sink:
        client = await RawClient.connect(sink)
        codes = [(await client.transaction(MSG + b".\r\n")).code for _ in range(3)]
        assert codes == [250, 451, 250]
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 452  # 4th MAIL
        assert (await client.transaction(MSG + b".\r\n")).code == 250  # 5th: the retry
        assert sink.received == 3


async def test_fault_delay_keeps_the_normal_reply() -> None:
    async with SMTPSink(tls=False, faults=[Fault("RCPT", delay=0.3)]) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        start = time.monotonic()
        reply = await client.cmd("RCPT TO:<b@example.net>")
        assert time.monotonic() - start >= 0.3
        assert str(reply) == "250 2.1.5 Ok"


async def test_fault_times_limits_how_often_it_fires() -> None:
    async with SMTPSink(tls=False, faults=[Fault("NOOP", code=450, times=2)]) as sink:
        client = await RawClient.connect(sink)
        codes = [(await client.cmd("NOOP")).code for _ in range(4)]
        assert codes == [450, 450, 250, 250]


async def test_fault_raw_and_multiline_replies() -> None:
    faults = [
        Fault("NOOP", raw=b"250-first\r\n250 second\r\n", times=1),
        Fault("NOOP", code=250, text="2.0.0 line one\nline two"),
    ]
    async with SMTPSink(tls=False, faults=faults) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("NOOP")).lines == ["first", "second"]
        assert (await client.cmd("NOOP")).lines == ["2.0.0 line one", "line two"]
        assert client.received.endswith(b"250-2.0.0 line one\r\n250 line two\r\n")


async def test_fault_421_closes_the_connection() -> None:
    async with SMTPSink(tls=False, faults=[Fault("RCPT", code=421)]) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert str(await client.cmd("RCPT TO:<b@example.net>")) == "421 4.0.0 Injected fault"
        assert await client.closed()


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "."])
async def test_fault_drop_before_reply(command: str) -> None:
    steps = [
        ("MAIL", b"MAIL FROM:<a@example.org>\r\n"),
        ("RCPT", b"RCPT TO:<b@example.net>\r\n"),
        ("DATA", b"DATA\r\n"),
        (".", MSG + b".\r\n"),
    ]
    async with SMTPSink(tls=False, faults=[Fault(command, drop="before_reply")]) as sink:
        client = await RawClient.connect(sink)
        for name, wire in steps:
            await client.send(wire)
            if name == command:
                assert await client.closed()
                break
            assert (await client.reply()).code in (250, 354)
        # After the final "." the message was received: only the reply was lost.
        assert sink.received == (1 if command == "." else 0)


async def test_fault_drop_after_reply() -> None:
    async with SMTPSink(tls=False, faults=[Fault("RCPT", drop="after_reply")]) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert str(await client.cmd("RCPT TO:<b@example.net>")) == "250 2.1.5 Ok"
        assert await client.closed()


async def test_fault_drop_during_data() -> None:
    fault = Fault("DATA", drop="during_data", after_bytes=1000)
    async with SMTPSink(tls=False, faults=[fault]) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(1000):
                await client.send(b"x" * 98 + b"\r\n")
                await trio.sleep(0.001)
        assert await client.closed()
        assert sink.received == 0


async def test_fault_on_bdat_chunks() -> None:
    faults = [
        Fault("BDAT", code=451, text="4.3.0 chunk lost", times=1),
        Fault("BDAT", drop="during_data", after_bytes=3, message=2),
    ]
    async with SMTPSink(tls=False, faults=faults) as sink:
        client = await RawClient.connect(sink)
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
        assert str(await client.bdat(b"QUIT\r")) == "451 4.3.0 chunk lost"
        assert (await client.bdat(b"\r\n", last=True)).code == 503  # transaction failed
        assert (await client.cmd("RSET")).code == 250
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<b@example.net>")).code == 250
        await client.send(b"BDAT 10 LAST\r\n0123456789")
        assert await client.closed()
        assert sink.received == 0


@pytest.mark.parametrize("code", [554, 421])
async def test_fault_on_the_greeting(code: int) -> None:
    async with SMTPSink(tls=False, faults=[Fault("CONNECT", code=code, text="no service")]) as sink:
        client = RawClient(await trio.open_tcp_stream(sink.host, sink.port))
        assert str(await client.reply()) == f"{code} no service"
        if code == 421:
            assert await client.closed()
            return
        # RFC 5321 §3.1: everything but QUIT gets 503 after a 554 greeting.
        assert (await client.cmd("EHLO x")).code == 503
        assert (await client.cmd("QUIT")).code == 221
        assert await client.closed()


async def test_fault_drop_at_connect_then_next_connection_works() -> None:
    faults = [Fault("CONNECT", drop="before_reply", times=1)]
    async with SMTPSink(tls=False, faults=faults) as sink:
        client = RawClient(await trio.open_tcp_stream(sink.host, sink.port))
        assert await client.closed()
        assert client.received == b""
        assert (await (await RawClient.connect(sink)).cmd("NOOP")).code == 250


async def test_fault_slow_greeting() -> None:
    async with SMTPSink(tls=False, faults=[Fault("CONNECT", delay=0.3)]) as sink:
        start = time.monotonic()
        await RawClient.connect(sink)
        assert time.monotonic() - start >= 0.3


async def test_idle_connections_are_closed() -> None:
    async with SMTPSink(tls=False, idle_timeout=0.2) as sink:
        client = await RawClient.connect(sink)
        start = time.monotonic()
        reply = await client.reply()
        assert (reply.code, reply.text) == (421, "4.4.2 localhost Error: timeout exceeded")
        assert time.monotonic() - start >= 0.2
        assert await client.closed()


async def test_421_after_n_messages_per_connection() -> None:
    async with SMTPSink(tls=False, messages_per_connection=2) as sink:
        client = await RawClient.connect(sink)
        for _ in range(2):
            assert (await client.transaction(MSG + b".\r\n")).code == 250
        reply = await client.cmd("MAIL FROM:<a@example.org>")
        assert (reply.code, reply.text) == (
            421,
            "4.7.0 localhost Error: too many messages in one session",
        )
        assert await client.closed()
        again = await RawClient.connect(sink)
        assert (await again.transaction(MSG + b".\r\n")).code == 250
        assert sink.received == 3


# --- what the sink exposes ------------------------------------------------------------


async def test_out_dir_callback_and_wait(tmp_path: Path) -> None:
    seen: list[CapturedMessage] = []
    async with SMTPSink(tls=False, out_dir=tmp_path / "mail", on_message=seen.append) as sink:

        async def send_later() -> None:
            await trio.sleep(0.05)
            client = await RawClient.connect(sink)
            for body in (MSG, b"Subject: two\r\n\r\n..x\r\n"):
                assert (await client.transaction(body + b".\r\n")).code == 250

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_later)
            with trio.fail_after(5):
                messages = await sink.wait_for_messages(2)
        assert [m.data for m in messages] == [MSG, b"Subject: two\r\n\r\n.x\r\n"]
        assert seen == messages
        files = sorted((tmp_path / "mail").glob("*.eml"))
        assert [f.read_bytes() for f in files] == [MSG, b"Subject: two\r\n\r\n.x\r\n"]


async def test_store_false_keeps_nothing_but_counts() -> None:
    async with SMTPSink(tls=False, store=False) as sink:
        client = await RawClient.connect(sink)
        assert (await client.transaction(MSG + b".\r\n")).code == 250
        assert sink.messages == []
        assert sink.received == 1


async def test_leaving_the_block_closes_open_connections() -> None:
    async with SMTPSink(tls=False) as sink:
        client = await RawClient.connect(sink)
    assert await client.closed()
    with pytest.raises(RuntimeError, match="only be entered once"):
        async with sink:
            pass


# --- sans-IO grammar units ------------------------------------------------------------


async def test_path_and_parameter_grammar() -> None:
    assert parse_path_argument("FROM:<>", "FROM", utf8=False) == ("", "")
    assert parse_path_argument("to:<a@b.c> X", "TO", utf8=False) == ("a@b.c", "X")
    assert parse_path_argument("TO:<a@b.c>X", "TO", utf8=False) != ("a@b.c", "X")
    assert parse_path_argument("TO:<a@" + "b" * 260 + ">", "TO", utf8=False) != (
        "a@" + "b" * 260,
        "",
    )
    assert parse_esmtp_params("", "MAIL", (), max_size=1) == ([], {})
    assert parse_esmtp_params("SIZE=5", "MAIL", ("SIZE",), max_size=10) == (
        ["SIZE=5"],
        {"SIZE": "5"},
    )
