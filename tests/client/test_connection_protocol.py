"""Reply handling, command hygiene and AUTH through the connection (issue 2).

R13, R21-R25, R35, R36 and R47, each asserting the bytes the client wrote. The tests run
on in-memory streams (``scripted_stream``), the greeting delay on virtual time; the idle
connection test (R24) uses a socket pair, because ``is_stale()`` peeks at the socket.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from helpers.connection_script import EHLO, GREETING, QUIT, prelude, session
from helpers.scripted import (
    Step,
    close,
    expect,
    expect_eof,
    expect_line,
    expect_nothing,
    reply,
    scripted_stream,
    send,
    send_lines,
)

import triomail
from triomail._core.sasl import Plain

MAIL = b"MAIL FROM:<a@x.test>\r\n"


async def closed_by_client(srv: Any) -> None:
    """The script (ending in expect_eof) completes only once the client closed."""
    with trio.fail_after(1):
        await srv.finished.wait()


# ------------------------------------------------------------------------------ R21


@pytest.mark.parametrize(
    "bad",
    [
        b"2a0 ok\r\n",
        b"250ok\r\n",
        b"099 x\r\n",
        b"650 x\r\n",
        b"250-a\r\n550 b\r\n",
        b"\r\n",
        b"250 a\nb\r\n",
        b"25\r\n",
    ],
)
async def test_R21_malformed_reply_is_a_protocol_error_and_closes(bad: bytes) -> None:
    """R21: a reply off the RFC 5321 grammar raises SMTPProtocolError and the connection
    is closed at once (no QUIT, no reuse)."""
    script = [*prelude("PIPELINING"), expect_line("NOOP"), send(bad), expect_eof(allow_quit=False)]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        with pytest.raises(triomail.SMTPProtocolError):
            await conn.noop()
        assert not conn.is_usable
        await closed_by_client(srv)
        with pytest.raises(triomail.SMTPDisconnected):
            await conn.noop()
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"NOOP\r\n"


async def test_R21_code_only_reply_is_valid() -> None:
    """R21: ``250\\r\\n`` (no text) is a valid reply."""
    script = [*prelude(), expect_line("NOOP"), send(b"250\r\n"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        assert (await conn.noop()).code == 250
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"NOOP\r\nQUIT\r\n"


@pytest.mark.parametrize(
    "bad", [b"2a0 mx.test ESMTP\r\n", b"220mx.test\r\n", b"220-a\r\n554 b\r\n"]
)
async def test_R21_malformed_greeting_writes_nothing(bad: bytes) -> None:
    """R21/R25: a malformed greeting: protocol error, not one byte written."""
    async with scripted_stream([send(bad), expect_eof(allow_quit=False)]) as (stream, srv):
        with pytest.raises(triomail.SMTPProtocolError):
            await session(stream)
    assert srv.transcript.data() == b""


# ------------------------------------------------------------------------------ R22


class CountingStream(trio.abc.Stream):
    """Counts the bytes the client received."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize(
    "flood",
    [b"250-" + b"x" * 1_000_000, b"250-x\r\n" * 100_000],
    ids=["1MB-no-CRLF", "100k-lines"],
)
async def test_R22_oversized_reply_fails_early_and_closes(flood: bytes) -> None:
    """R22: 1 MB without CRLF, or 100,000 continuation lines: protocol error as soon as
    a limit is crossed (the client stops reading long before the end), connection closed."""
    script = [*prelude(), expect_line("NOOP"), send(flood), expect_eof(allow_quit=False)]
    async with scripted_stream(script) as (raw, srv):
        stream = CountingStream(raw)
        conn = await session(stream)
        with pytest.raises(triomail.SMTPProtocolError, match=r"longer|more than"):
            await conn.noop()
        await closed_by_client(srv)
    assert stream.received < 200_000
    assert srv.transcript.data() == EHLO + b"NOOP\r\n"


async def test_R23_eight_bit_reply_text_does_not_crash() -> None:
    """R23: 8-bit reply text is decoded tolerantly."""
    script = [*prelude(), expect_line("NOOP"), send(b"250 caf\xe9 \xff ok\r\n"), *QUIT]
    async with scripted_stream(script) as (stream, _):
        conn = await session(stream)
        assert (await conn.noop()).text.startswith("caf")
        await conn.aclose()


# ------------------------------------------------------------------------------ R24


async def test_R24_two_replies_to_mail_is_a_desync() -> None:
    """R24: MAIL answered with two replies (no PIPELINING): the second is never taken as
    the RCPT reply; no RCPT is written, the connection is closed, the result transient."""
    script = [*prelude("8BITMIME"), expect_line(MAIL), send(b"250 OK\r\n250 OK\r\n")]
    script.append(expect_eof(allow_quit=False))
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(b"Subject: x\r\n\r\nhi\r\n", sender="a@x.test", recipients=["b@y"])
        assert result.outcome is triomail.Outcome.TRANSIENT
        assert "more than one reply" in (result.error or "")
        assert not conn.is_usable
        await closed_by_client(srv)
    assert srv.transcript.data() == EHLO + MAIL


async def test_R24_reply_followed_by_extra_bytes_is_a_desync() -> None:
    """R24: bytes after a complete reply (no pipelining) close the connection."""
    script = [
        *prelude(),
        expect_line("NOOP"),
        send(b"250 ok\r\n421 bye"),
        expect_eof(allow_quit=False),
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        with pytest.raises(triomail.SMTPProtocolError, match="more than one reply"):
            await conn.noop()
        await closed_by_client(srv)
    assert srv.transcript.data() == EHLO + b"NOOP\r\n"


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of real sockets (is_stale() peeks at the socket)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


@dataclass(frozen=True)
class WaitFor(Step):
    """Script step: wait until the test sets ``event``."""

    event: trio.Event

    async def run(self, conn: Any) -> None:
        await self.event.wait()


@pytest.mark.parametrize("unsolicited", ["421 4.4.2 idle timeout", "250 surprise", None])
async def test_R24_idle_connection_that_got_data_is_stale(unsolicited: str | None) -> None:
    """R24/R45: a 421 (or anything, or EOF) arriving while idle makes the connection
    stale; send() raises SMTPDisconnected without writing MAIL."""
    go = trio.Event()
    idle = [send_lines(unsolicited)] if unsolicited else [close()]
    script = [*prelude("PIPELINING"), WaitFor(go), *idle]
    if unsolicited:
        script.append(expect_eof(allow_quit=False))
    async with scripted_stream(script, pair=socket_pair) as (stream, srv):
        conn = await session(stream)
        await trio.testing.wait_all_tasks_blocked()
        assert not conn.is_stale()
        go.set()
        await trio.testing.wait_all_tasks_blocked()  # the server wrote and waits
        assert conn.is_stale()
        with pytest.raises(triomail.SMTPDisconnected):
            await conn.send(b"x\r\n", sender="a@x.test", recipients=["b@y"])
        assert not conn.is_usable
    assert srv.transcript.data() == EHLO


# ------------------------------------------------------------------------------ R25


async def test_R25_nothing_is_sent_before_the_greeting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """R25: the greeting comes after 2 s (virtual); the client writes nothing before."""
    script = [expect_nothing(2), *prelude(), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        start = trio.current_time()
        conn = await session(stream)
        assert trio.current_time() - start == pytest.approx(2)
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"QUIT\r\n"


async def test_R25_554_greeting_means_quit_and_error() -> None:
    """R25: 554 greeting: QUIT, then an error carrying the reply (permanent)."""
    script = [send_lines("554 5.3.2 no service here"), *QUIT, expect_eof()]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPResponseError) as info:
            await session(stream)
    assert info.value.code == 554 and info.value.reply.enhanced_code == "5.3.2"
    assert srv.transcript.data() == b"QUIT\r\n"


async def test_R25_421_greeting_is_an_error_without_quit() -> None:
    """R25/R40: 421 greeting: transient error, nothing written (no QUIT)."""
    script = [send_lines("421 4.3.2 try later"), expect_eof(allow_quit=False)]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPResponseError) as info:
            await session(stream)
    assert info.value.code == 421 and info.value.reply.is_transient
    assert srv.transcript.data() == b""


@pytest.mark.parametrize("greeting", ["354 go", "221 bye", "500 what", "250 ok"])
async def test_R25_other_greetings_are_protocol_errors(greeting: str) -> None:
    """R25: a greeting other than 220/4xx/554 is a protocol error; no EHLO."""
    script = [send_lines(greeting), expect_eof()]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPProtocolError, match="greeting"):
            await session(stream)
    assert srv.transcript.data() in (b"", b"QUIT\r\n")


# ------------------------------------------------------------------------------ R47


@pytest.mark.parametrize(
    "answer", ["220 hello again", "221 bye", "354 go", "421 4.3.2 no", "530 auth"]
)
async def test_R47_odd_reply_to_ehlo_closes_without_crash(answer: str) -> None:
    """R47: EHLO answered 220/221/354/421/530: an SMTPResponseError, connection closed,
    nothing else written (no HELO, no MAIL)."""
    script = [GREETING, expect_line(EHLO), send_lines(answer), expect_eof()]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPResponseError) as info:
            await session(stream)
    assert info.value.code == int(answer[:3])
    assert srv.transcript.data() in (EHLO, EHLO + b"QUIT\r\n")


@pytest.mark.parametrize(
    ("answer", "outcome", "then"),
    [
        ("550 5.7.1 no", triomail.Outcome.PERMANENT, [expect_line("RSET"), reply(250, "ok")]),
        ("451 4.3.0 later", triomail.Outcome.TRANSIENT, [expect_line("RSET"), reply(250, "ok")]),
        ("250 2.0.0 what?", triomail.Outcome.TRANSIENT, [expect_eof(allow_quit=False)]),
        ("334 what?", triomail.Outcome.TRANSIENT, [expect_eof(allow_quit=False)]),
    ],
)
async def test_R47_data_not_answered_354_sends_no_body(
    answer: str, outcome: triomail.Outcome, then: list[Step]
) -> None:
    """R47: DATA answered with anything but 354: no body. A refusal is the outcome (and
    RSET follows); a positive reply other than 354 is a protocol error (closed)."""
    script = [
        *prelude(),
        expect_line(MAIL),
        reply(250, "ok"),
        expect_line("RCPT TO:<b@y.test>"),
        reply(250, "ok"),
        expect_line("DATA"),
        send_lines(answer),
        *then,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        result = await conn.send(
            b"Subject: s\r\n\r\nbody\r\n", sender="a@x.test", recipients=["b@y.test"]
        )
        assert result.outcome is outcome
        assert [r.outcome for r in result.recipients] == [outcome]
        await conn.aclose()
    data = srv.transcript.data()
    assert b"body" not in data and b"Subject" not in data
    assert data.startswith(EHLO + MAIL + b"RCPT TO:<b@y.test>\r\nDATA\r\n")


async def test_R47_quit_answered_354_does_not_crash() -> None:
    """R47: QUIT answered with 354: aclose() returns, nothing more is written."""
    script = [*prelude(), expect_line("QUIT"), send_lines("354 go ahead"), expect_eof()]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        await conn.aclose()
        assert not conn.is_usable
    assert srv.transcript.data() == EHLO + b"QUIT\r\n"


# ------------------------------------------------------------------------------ R13

INJECTIONS = ["x\r\nRCPT TO:<evil@x>", "x\n", "x\r", "x\x00", "x\x7f", "x\tq", "x\x1b"]


@pytest.mark.parametrize("bad", INJECTIONS)
@pytest.mark.parametrize("where", ["sender", "recipient"])
async def test_R13_control_characters_never_reach_the_wire(bad: str, where: str) -> None:
    """R13: a control character in an envelope address raises LocalProtocolError and
    nothing is written for that command (nor any command of the transaction)."""
    address = f"{bad}@x.test"
    sender, recipients = (address, ["b@y.test"]) if where == "sender" else ("a@x.test", [address])
    script = [*prelude("PIPELINING", "DSN", "SMTPUTF8"), expect_line("NOOP"), reply(250), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(stream)
        with pytest.raises(triomail.LocalProtocolError):
            await conn.send(b"x\r\n", sender=sender, recipients=recipients)
        assert conn.is_usable
        await conn.noop()
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"NOOP\r\nQUIT\r\n"


@pytest.mark.parametrize("bad", INJECTIONS)
async def test_R13_local_hostname_is_checked_before_anything_is_written(bad: str) -> None:
    """R13: a control character in the EHLO name: raised before a byte is written, and
    the stream is closed."""
    async with scripted_stream([expect_eof(allow_quit=False)]) as (stream, srv):
        with pytest.raises(triomail.LocalProtocolError):
            await triomail.start_session(
                stream, host="mx.test", tls="none", local_hostname=f"client{bad}.test"
            )
        await closed_by_client(srv)
    assert srv.transcript.data() == b""


# ------------------------------------------------------------------------------ R35

PLAIN_IR = base64.b64encode(b"\0user\0secret")


async def login(stream: trio.abc.Stream, **kw: Any) -> triomail.SMTPConnection:
    kw.setdefault("username", "user")
    kw.setdefault("password", "secret")
    return await session(stream, allow_insecure_auth=True, **kw)


async def test_R35_endless_334_is_cancelled_with_star() -> None:
    """R35: a server that keeps sending 334: after 5 answers the client sends ``*`` and
    fails (smtplib's _MAXCHALLENGE)."""
    endless: list[Step] = []
    for _ in range(5):
        endless += [reply(334, ""), expect_line(PLAIN_IR)]
    script = [
        *prelude("AUTH PLAIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        *endless,
        reply(334, ""),
        expect_line("*"),
        reply(501, "5.7.0 cancelled"),
        expect_eof(),
    ]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPAuthenticationError):
            await login(stream)
    lines = srv.transcript.lines()
    assert lines[1] == b"AUTH PLAIN " + PLAIN_IR
    assert lines[2:7] == [PLAIN_IR] * 5
    assert lines[7] == b"*"
    assert lines[8:] in ([], [b"QUIT"])


@pytest.mark.parametrize("challenge", ["not base64!", "VXNlcm5hbWU", "Zm9v=YmFy", "é"])
async def test_R35_non_base64_challenge_is_cancelled(challenge: str) -> None:
    """R35: a 334 that is not valid base64 is answered with ``*``."""
    script = [
        *prelude("AUTH LOGIN"),
        expect_line("AUTH LOGIN"),
        reply(334, challenge),
        expect_line("*"),
        reply(501, "5.7.0 cancelled"),
        expect_eof(),
    ]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPAuthenticationError):
            await login(stream)
    assert srv.transcript.lines()[1:3] == [b"AUTH LOGIN", b"*"]


@pytest.mark.parametrize(("code", "permanent"), [(535, True), (454, False), (432, False)])
async def test_R35_auth_failure_is_classified_and_not_retried(code: int, permanent: bool) -> None:
    """R35: 535 is permanent, 454/432 temporary; AUTH is written exactly once: a wrong
    password is not tried again with another mechanism (a lockout), nor is a 4xx."""
    script = [
        *prelude("AUTH PLAIN LOGIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(code, f"{code // 100}.7.8 no"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPAuthenticationError) as info:
            await login(stream)
    assert info.value.permanent is permanent
    assert info.value.code == code
    assert srv.transcript.data().count(b"AUTH") == 1


@pytest.mark.parametrize("code", [504, 534, 538])
async def test_R35_a_refused_mechanism_gives_way_to_the_next(code: int) -> None:
    """Issue 12: a reply that refuses the mechanism (not the credentials) makes the
    session try the next advertised one, as smtplib and aiosmtplib do."""
    script = [
        *prelude("AUTH PLAIN LOGIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(code, f"5.7.{code % 10} mechanism refused"),
        expect_line("AUTH LOGIN"),
        reply(334, "VXNlcm5hbWU6"),
        expect_line(base64.b64encode(b"user")),
        reply(334, "UGFzc3dvcmQ6"),
        expect_line(base64.b64encode(b"secret")),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _srv):
        conn = await login(stream)
        assert conn.authenticated
        await conn.aclose()


async def test_R35_the_last_mechanism_refused_raises() -> None:
    script = [
        *prelude("AUTH PLAIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(534, "5.7.9 too weak"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _srv):
        with pytest.raises(triomail.SMTPAuthenticationError) as info:
            await login(stream)
    assert info.value.code == 534


async def test_auth_names_the_mechanism() -> None:
    """Issue 12: ``auth=`` chooses the mechanism (here PLAIN although CRAM-MD5, the
    stronger, is offered)."""
    script = [
        *prelude("AUTH CRAM-MD5 PLAIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _srv):
        conn = await login(stream, auth="plain")
        await conn.aclose()


async def test_auth_list_is_tried_in_order() -> None:
    script = [
        *prelude("AUTH CRAM-MD5 PLAIN LOGIN"),
        expect_line("AUTH LOGIN"),
        reply(504, "5.5.4 not here"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _srv):
        conn = await login(stream, auth=["LOGIN", "PLAIN"])
        await conn.aclose()


async def test_auth_naming_an_unoffered_mechanism_sends_nothing() -> None:
    script = [*prelude("AUTH PLAIN"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPSecurityError, match="does not offer LOGIN"):
            await login(stream, auth="LOGIN")
    assert b"AUTH" not in srv.transcript.data()


async def test_auth_offered_only_after_tls_says_so() -> None:
    """Issue 12: no AUTH in plaintext but STARTTLS offered: the error says AUTH comes
    after TLS, not that no mechanism is usable."""
    script = [*prelude("STARTTLS"), *QUIT]
    async with scripted_stream(script) as (stream, _srv):
        with pytest.raises(triomail.SMTPSecurityError, match="only after TLS"):
            await login(stream)


async def test_R35_legacy_auth_equals_and_login_exchange() -> None:
    """R35: ``AUTH=LOGIN`` (pre-RFC 4954 form) is understood; LOGIN answers two 334s."""
    script = [
        *prelude("AUTH=LOGIN"),
        expect_line("AUTH LOGIN"),
        reply(334, "VXNlcm5hbWU6"),
        expect_line(base64.b64encode(b"user")),
        reply(334, "UGFzc3dvcmQ6"),
        expect_line(base64.b64encode(b"secret")),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await login(stream)
        assert conn.authenticated
        await conn.aclose()


async def test_R35_never_auth_twice() -> None:
    """R35: a second AUTH is refused locally; nothing is written for it."""
    script = [
        *prelude("AUTH PLAIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await login(stream)
        with pytest.raises(triomail.LocalProtocolError):
            await conn.auth(Plain("user", "secret"))
        await conn.aclose()
    assert srv.transcript.data().count(b"AUTH") == 1


async def test_R35_long_initial_response_waits_for_the_334() -> None:
    """R35: an initial response that would make the AUTH line too long is not sent on
    the AUTH line but in answer to the first 334."""
    password = "p" * 13000
    answer = base64.b64encode(b"\0user\0" + password.encode())
    script = [
        *prelude("AUTH PLAIN"),
        expect_line("AUTH PLAIN"),
        reply(334, ""),
        expect_line(answer),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await login(stream, password=password)
        await conn.aclose()


async def test_R35_auth_line_is_redacted_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """R35/R36: the logged AUTH line names the mechanism, never the payload."""
    caplog.set_level(logging.DEBUG, logger="triomail")
    script = [
        *prelude("AUTH PLAIN"),
        expect_line(b"AUTH PLAIN " + PLAIN_IR),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, _):
        conn = await login(stream)
        await conn.aclose()
    messages = [r.getMessage() for r in caplog.records]
    auth = [m for m in messages if "AUTH" in m and " > " in m]
    assert auth and all("AUTH PLAIN" in m and "redacted" in m for m in auth), messages
    assert not any(PLAIN_IR.decode() in m for m in messages)


# ------------------------------------------------------------------------------ R36

PASSWORD = "s3cr3t-pässwörd"


def secret_forms(username: str, password: str) -> list[str]:
    pw = password.encode()
    return [
        password,
        base64.b64encode(pw).decode(),
        base64.b64encode(b"\0" + username.encode() + b"\0" + pw).decode(),
        repr(pw)[2:-1],
    ]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("final", [235, 535])
async def test_R36_no_secret_in_logs_or_exceptions(
    mechanism: str, final: int, caplog: pytest.LogCaptureFixture
) -> None:
    """R36: at DEBUG, neither the password nor its base64 forms appear in any log record
    or in the exception; 334 challenges are redacted too."""
    caplog.set_level(logging.DEBUG)
    user = "jürgen"
    challenge = base64.b64encode(b"<1896.697170952@mx.test>").decode()
    exchange: list[Step] = {
        "PLAIN": [expect("AUTH PLAIN ")],
        "LOGIN": [
            expect_line("AUTH LOGIN"),
            reply(334, "VXNlcm5hbWU6"),
            expect(b""),
            reply(334, "UGFzc3dvcmQ6"),
            expect(b""),
        ],
        "CRAM-MD5": [expect_line("AUTH CRAM-MD5"), reply(334, challenge), expect(b"")],
    }[mechanism]
    script = [
        *prelude(f"AUTH {mechanism}"),
        *exchange,
        reply(final, "2.7.0 ok" if final == 235 else "5.7.8 bad credentials"),
        *QUIT,
    ]
    error: BaseException | None = None
    async with scripted_stream(script) as (stream, _):
        try:
            conn = await login(stream, username=user, password=PASSWORD)
        except triomail.SMTPAuthenticationError as exc:
            error = exc
        else:
            await conn.aclose()
    assert (error is None) == (final == 235)
    texts = [r.getMessage() for r in caplog.records]
    if error is not None:
        texts += [str(error), repr(error), repr(error.args)]
    for text in texts:
        for secret in secret_forms(user, PASSWORD):
            assert secret not in text, text
        assert challenge not in text and "UGFzc3dvcmQ6" not in text, text
    assert any("AUTH" in t for t in texts)
