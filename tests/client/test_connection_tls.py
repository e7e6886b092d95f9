"""TLS and STARTTLS on the wire (issue 2): R1-R12 against the scripted server.

Every test asserts the bytes the client wrote. The TLS tests run on loopback TCP with
trustme certificates (``tls_ca``); a few plaintext ones run on in-memory streams.
"""

from __future__ import annotations

import base64
import logging
import ssl
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from helpers import certs
from helpers.connection_script import EHLO, GREETING, QUIT, session
from helpers.scripted import (
    ScriptedServer,
    Transcript,
    abort,
    close,
    ehlo_reply,
    expect_data,
    expect_eof,
    expect_line,
    read_bytes,
    reply,
    scripted_server,
    scripted_stream,
    send,
    send_lines,
    sleep,
    starttls,
    truncate,
)

import triomail
from triomail._core.sasl import Plain


def open_conn(srv: ScriptedServer, ctx: ssl.SSLContext | None, **kw: Any) -> Any:
    return triomail.open_connection(
        srv.host, srv.port, ssl_context=ctx, local_hostname="client.test", **kw
    )


def tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records *data* consists of; fails on anything else
    (a plaintext command after a failed handshake would not parse as a record)."""
    types = []
    while data:
        assert len(data) >= 5 and data[0] in (20, 21, 22, 23) and data[1] == 3, data[:40]
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return types


def after_starttls(transcript: Transcript) -> bytes:
    """Raw bytes the client wrote after its ``STARTTLS\\r\\n``."""
    _, sep, tail = bytes(transcript.wire).partition(b"STARTTLS\r\n")
    assert sep, transcript.wire
    return tail


def assert_nothing_after_starttls_but_quit(transcript: Transcript) -> None:
    """R3: after the failed STARTTLS only an optional QUIT; never AUTH, MAIL or data."""
    assert transcript.lines("plain")[:2] == [EHLO.rstrip(), b"STARTTLS"]
    assert after_starttls(transcript) in (b"", b"QUIT\r\n")
    assert transcript.buffered_at_starttls is None  # no handshake was attempted


def other_ca_context(*names: str) -> ssl.SSLContext:
    return certs.server_ssl_context(certs.make_ca(), *names)


class TCPCalls:
    """Records ``trio.open_tcp_stream`` calls; ``route`` maps a port to a local one
    (``None``: connection refused)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.route: dict[int, int | None] = {}


@pytest.fixture
def tcp_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[TCPCalls]:
    rec = TCPCalls()
    real = trio.open_tcp_stream

    async def fake(host: str, port: int, **kw: Any) -> trio.SocketStream:
        rec.calls.append((host, port))
        if port in rec.route:
            target = rec.route[port]
            if target is None:
                raise ConnectionRefusedError(111, "Connection refused")
            return await real("127.0.0.1", target, **kw)
        return await real(host, port, **kw)

    monkeypatch.setattr(trio, "open_tcp_stream", fake)
    yield rec


# --------------------------------------------------------------------------------- R1


async def test_R1_port_465_refused_raises_and_never_tries_a_weaker_mode(
    tcp_calls: TCPCalls,
) -> None:
    """R1: 465 refusing the connection raises; no retry on 587/25, no plaintext."""
    tcp_calls.route = {465: None, 587: None, 25: None}
    with pytest.raises(triomail.SMTPConnectError):
        await triomail.open_connection("mail.test", 465, local_hostname="client.test")
    with pytest.raises(triomail.SMTPConnectError):
        await triomail.open_connection("mail.test", tls="implicit", local_hostname="client.test")
    assert tcp_calls.calls == [("mail.test", 465), ("mail.test", 465)]


async def test_R1_implicit_handshake_failure_raises_without_fallback(
    tcp_calls: TCPCalls, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R1: a failing handshake on 465 raises; one connection, no plaintext, no STARTTLS."""
    async with scripted_server(
        [starttls(expect_failure=True), expect_eof()], server_ssl_context=other_ca_context()
    ) as srv:
        tcp_calls.route = {465: srv.port, 587: srv.port, 25: srv.port}
        with pytest.raises(triomail.SMTPCertificateError):
            await triomail.open_connection(
                "127.0.0.1", 465, ssl_context=client_ssl_ctx, local_hostname="client.test"
            )
    assert tcp_calls.calls == [("127.0.0.1", 465)]
    assert srv.connections == 1
    assert srv.transcript.wire[:2] == b"\x16\x03"
    tls_records(bytes(srv.transcript.wire))  # TLS records only: no EHLO in the clear


async def test_R1_starttls_stripped_raises_without_fallback(
    tcp_calls: TCPCalls, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R1/R3: STARTTLS stripped from EHLO raises; the client does not reconnect."""
    script = [GREETING, expect_line(EHLO), ehlo_reply("PIPELINING", "AUTH PLAIN"), expect_eof()]
    async with scripted_server(script) as srv:
        tcp_calls.route = {587: srv.port, 25: srv.port, 465: srv.port}
        with pytest.raises(triomail.SMTPSecurityError, match="does not offer STARTTLS"):
            await triomail.open_connection(
                "127.0.0.1",
                ssl_context=client_ssl_ctx,
                username="u",
                password="p",
                local_hostname="client.test",
            )
    assert tcp_calls.calls == [("127.0.0.1", 587)]
    assert srv.connections == 1
    assert srv.transcript.data() in (EHLO, EHLO + b"QUIT\r\n")


# --------------------------------------------------------------------------------- R2


def _tls11_only_server(ca: trustme.CA) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = certs.server_ssl_context(
            ca, minimum_version=ssl.TLSVersion.TLSv1_1, maximum_version=ssl.TLSVersion.TLSv1_1
        )
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("wrong-name", triomail.SMTPCertificateError),
        ("other-ca", triomail.SMTPCertificateError),
        ("tls1.1-only", triomail.SMTPSecurityError),
    ],
)
async def test_R2_bad_certificate_or_old_tls_fails_handshake_before_ehlo(
    case: str, error: type[Exception], tls_ca: trustme.CA, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R2/R10: wrong name, untrusted CA, TLS 1.1 only: handshake error, no EHLO, no QUIT."""
    server_ctx = {
        "wrong-name": lambda: certs.server_ssl_context(tls_ca, "other.example"),
        "other-ca": other_ca_context,
        "tls1.1-only": lambda: _tls11_only_server(tls_ca),
    }[case]()
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("STARTTLS", "AUTH PLAIN"),
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 go ahead"),
        starttls(expect_failure=True),
        # The client refuses the server's certificate and hangs up; a TLS 1.1-only
        # server refuses the ClientHello and hangs up itself.
        close() if case == "tls1.1-only" else expect_eof(),
    ]
    async with scripted_server(script, server_ssl_context=server_ctx) as srv:
        with pytest.raises(error) as info:
            await open_conn(srv, client_ssl_ctx, username="u", password="p")
    if error is triomail.SMTPSecurityError:
        assert not isinstance(info.value, triomail.SMTPCertificateError)
    t = srv.transcript
    assert t.lines("plain") == [EHLO.rstrip(), b"STARTTLS"]
    assert t.data("tls") == b""
    assert t.buffered_at_starttls == b""
    assert t.wire_after_starttls[:2] == b"\x16\x03"
    tls_records(t.wire_after_starttls)


async def test_R2_old_tls_allowed_by_the_callers_context_is_still_refused(
    tls_ca: trustme.CA,
) -> None:
    """R2: even if a caller's context allows TLS 1.1, a 1.1 session sends no EHLO."""
    client_ctx = certs.client_ssl_context(tls_ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    client_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    script = [starttls(), expect_eof()]
    async with scripted_server(script, server_ssl_context=_tls11_only_server(tls_ca)) as srv:
        with pytest.raises(triomail.SMTPSecurityError, match=r"TLSv1\.1"):
            await open_conn(srv, client_ctx, tls="implicit")
    assert srv.transcript.data("tls") == b""


async def test_R2_certificate_is_checked_against_the_configured_name_not_the_greeting(
    tls_ca: trustme.CA, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R2: the certificate matches the name the server *announces*, not the configured
    one: verification fails (server_hostname is never taken from the greeting/EHLO)."""
    script = [
        send_lines("220 evil.example ESMTP"),
        expect_line(EHLO),
        ehlo_reply("STARTTLS", domain="evil.example"),
        expect_line("STARTTLS"),
        send_lines("220 go ahead"),
        starttls(expect_failure=True),
        expect_eof(),
    ]
    ctx = certs.server_ssl_context(tls_ca, "evil.example")
    async with scripted_server(script, server_ssl_context=ctx) as srv:
        with pytest.raises(triomail.SMTPCertificateError):
            await open_conn(srv, client_ssl_ctx)
    assert srv.transcript.data("tls") == b""


async def test_R2_default_context_verifies(server_ssl_ctx: ssl.SSLContext) -> None:
    """R2: without ssl_context= the system trust store is used: a trustme cert fails."""
    ctx = triomail.default_ssl_context()
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert not ctx.options & getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    async with scripted_server(
        [starttls(expect_failure=True), expect_eof()], server_ssl_context=server_ssl_ctx
    ) as srv:
        with pytest.raises(triomail.SMTPCertificateError):
            await open_conn(srv, None, tls="implicit")
    assert srv.transcript.data("tls") == b""


async def test_R2_trustme_certificate_succeeds(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R2: a valid certificate for the configured host name (sent as SNI): TLS, then
    EHLO again."""
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("STARTTLS"),
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 go ahead"),
        starttls(),
        expect_line(EHLO),
        ehlo_reply("PIPELINING"),
        *QUIT,
    ]
    sni: list[str | None] = []

    def record_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni.append(name)

    server_ssl_ctx.sni_callback = record_sni  # type: ignore[assignment]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        conn = await triomail.open_connection(
            "localhost", srv.port, ssl_context=client_ssl_ctx, local_hostname="client.test"
        )
        assert conn.tls_active
        await conn.aclose()
    assert sni == ["localhost"]
    assert srv.transcript.data("plain") == EHLO + b"STARTTLS\r\n"
    assert srv.transcript.data("tls") == EHLO + b"QUIT\r\n"


# --------------------------------------------------------------------------------- R3

STARTTLS_REFUSALS = [
    "454 4.7.0 TLS not available",
    "500 5.5.1 unrecognized",
    "501 5.5.4 syntax",
    "502 5.5.1 not implemented",
    "530 5.7.0 must issue STARTTLS first",
    "421 4.3.2 shutting down",
    "354 go ahead",
    "221 2.0.0 bye",
    "250 2.0.0 ok",
]


@pytest.mark.parametrize("refusal", [*STARTTLS_REFUSALS, None], ids=lambda r: r or "absent")
async def test_R3_starttls_stripping_fails_closed(refusal: str | None) -> None:
    """R3: STARTTLS answered with anything but 220 (or not advertised): the only thing
    the client may still write is QUIT; never AUTH, MAIL or data."""
    caps = ["PIPELINING", "AUTH PLAIN LOGIN", "SIZE 1000000", "8BITMIME"]
    if refusal is None:
        script = [GREETING, expect_line(EHLO), ehlo_reply(*caps), expect_eof()]
    else:
        script = [
            GREETING,
            expect_line(EHLO),
            ehlo_reply(*caps, "STARTTLS"),
            expect_line("STARTTLS"),
            send_lines(refusal),
            expect_eof(),
        ]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPSecurityError, match="plaintext"):
            await session(
                stream,
                tls="starttls",
                username="user",
                password="secret",
            )
    data = srv.transcript.data()
    if refusal is None:
        assert data in (EHLO, EHLO + b"QUIT\r\n")
    else:
        assert data in (EHLO + b"STARTTLS\r\n", EHLO + b"STARTTLS\r\nQUIT\r\n")
    assert b"AUTH" not in data and b"MAIL" not in data


# --------------------------------------------------------------------------------- R4


async def test_R4_no_esmtp_means_no_tls() -> None:
    """R4 (EAST D_1): EHLO refused, HELO accepted: no STARTTLS, so abort; no AUTH/MAIL."""
    script = [
        GREETING,
        expect_line(EHLO),
        reply(500, "5.5.1 command unrecognized"),
        expect_line("HELO client.test"),
        reply(250, "mx.test"),
        expect_eof(),
    ]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPSecurityError, match="refused EHLO"):
            await session(
                stream,
                tls="starttls",
                username="u",
                password="p",
            )
    assert srv.transcript.data() in (
        EHLO + b"HELO client.test\r\n",
        EHLO + b"HELO client.test\r\nQUIT\r\n",
    )


async def test_R4_helo_fallback_works_when_plaintext_was_chosen() -> None:
    """R4 contrast: with tls='none' the HELO session is usable, with no extensions."""
    script = [
        GREETING,
        expect_line(EHLO),
        reply(502, "5.5.1 no"),
        expect_line("HELO client.test"),
        reply(250, "mx.test"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(
            stream,
            tls="none",
        )
        assert not conn.capabilities.esmtp
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"HELO client.test\r\nQUIT\r\n"


# --------------------------------------------------------------------------------- R5


def _starttls_ok_script(*tls_caps: str) -> list[Any]:
    return [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("PIPELINING", "STARTTLS", "AUTH PLAIN"),
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 Ready to start TLS"),
        starttls(),
        expect_line(EHLO),
        ehlo_reply(*tls_caps),
    ]


async def test_R5_starttls_is_last_and_alone(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R5: nothing is pipelined after STARTTLS; the next bytes are a ClientHello."""
    script = [*_starttls_ok_script("PIPELINING"), *QUIT]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        conn = await open_conn(srv, client_ssl_ctx)
        await conn.aclose()
    t = srv.transcript
    assert t.buffered_at_starttls == b""
    assert t.wire_after_starttls[:2] == b"\x16\x03"
    plain_writes = [d for phase, d in t.writes if phase == "plain"]
    assert plain_writes == [EHLO, b"STARTTLS\r\n"]
    assert after_starttls(t) == t.wire_after_starttls


# --------------------------------------------------------------------------------- R6


@pytest.mark.parametrize(
    "injected",
    [
        pytest.param(b"220 Ready\r\n250-evil\r\n250 AUTH LOGIN\r\n", id="a-same-write"),
        pytest.param(b"220 Ready\r\n250-inj", id="b-partial-line"),
        pytest.param(b"220 Ready\r\n2", id="b-one-byte"),
    ],
)
async def test_R6_bytes_after_the_starttls_220_abort(injected: bytes) -> None:
    """R6 (a)(b): anything buffered behind the 220 is injection: abort, no handshake,
    nothing parsed; the client never proceeds on the injected 250."""
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("STARTTLS", "AUTH PLAIN"),
        expect_line("STARTTLS"),
        send(injected),
        expect_eof(),
    ]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPSecurityError, match="injection"):
            await session(
                stream,
                tls="starttls",
                username="u",
                password="p",
            )
    assert_nothing_after_starttls_but_quit(srv.transcript)


async def test_R6_injection_in_a_separate_write_breaks_the_handshake(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R6 (c): bytes injected after the 220 (once the ClientHello is out) go into TLS
    and fail the handshake; they are never parsed as replies."""
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("STARTTLS", "AUTH PLAIN"),
        expect_line("STARTTLS"),
        send_lines("220 Ready"),
        read_bytes(5),  # the client's ClientHello has started
        send(b"250-evil\r\n250 AUTH LOGIN PLAIN\r\n"),
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        with pytest.raises(triomail.SMTPSecurityError) as info:
            await open_conn(srv, client_ssl_ctx, username="u", password="p")
    assert not isinstance(info.value, triomail.SMTPCertificateError)
    assert "TLS" in str(info.value)
    t = srv.transcript
    assert t.bodies[0][:2] == b"\x16\x03"
    tls_records(after_starttls(t))
    assert t.lines("plain")[:2] == [EHLO.rstrip(), b"STARTTLS"]


# --------------------------------------------------------------------------------- R7

BIG = b"Subject: five kilobytes\r\n\r\n" + (b"x" * 68 + b"\r\n") * 72


async def test_R7_everything_learnt_before_tls_is_forgotten(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R7: pre-TLS AUTH CRAM-MD5 and SIZE 10 are forgotten; PLAIN from the post-TLS EHLO
    is used and a 5 KB message goes through under SIZE 100000."""
    size = len(BIG)
    assert 5000 < size < 100000
    auth = b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("AUTH CRAM-MD5", "SIZE 10", "STARTTLS", "PIPELINING"),
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 go ahead"),
        starttls(),
        expect_line(EHLO),
        ehlo_reply("AUTH PLAIN", "SIZE 100000"),
        expect_line(auth),
        reply(235, "2.7.0 ok"),
        expect_line(f"MAIL FROM:<a@x.test> SIZE={size}"),
        reply(250, "2.1.0 ok"),
        expect_line("RCPT TO:<b@y.test>"),
        reply(250, "2.1.5 ok"),
        expect_line("DATA"),
        reply(354, "go"),
        expect_data(),
        reply(250, "2.0.0 queued"),
        *QUIT,
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        conn = await open_conn(srv, client_ssl_ctx, username="user", password="secret")
        caps = conn.capabilities
        assert caps.auth_mechanisms == {"PLAIN"} and caps.size_limit == 100000
        assert not caps.pipelining
        assert conn.greeting is None  # the plaintext greeting is not kept (R7, R12)
        result = await conn.send(BIG, sender="a@x.test", recipients=["b@y.test"])
        await conn.aclose()
    assert result.ok
    assert srv.transcript.bodies == [BIG + b".\r\n"]
    assert b"CRAM-MD5" not in srv.transcript.data()


async def test_R7_no_auth_after_tls_means_login_fails(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R7: AUTH advertised only before TLS: login fails, no AUTH is written."""
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("AUTH PLAIN LOGIN", "STARTTLS"),
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 go ahead"),
        starttls(),
        expect_line(EHLO),
        ehlo_reply("SIZE 100000"),
        *QUIT,
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        with pytest.raises(triomail.SMTPSecurityError, match="no usable AUTH"):
            await open_conn(srv, client_ssl_ctx, username="user", password="secret")
    assert srv.transcript.data("tls") == EHLO + b"QUIT\r\n"


# --------------------------------------------------------------------------------- R8


async def test_R8_implicit_tls_handshakes_before_the_greeting(
    server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R8: on an implicit-TLS port the client's first bytes are a ClientHello."""
    script = [GREETING, expect_line(EHLO), ehlo_reply("PIPELINING"), *QUIT]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx, implicit_tls=True) as srv:
        conn = await open_conn(srv, client_ssl_ctx, tls="implicit")
        assert conn.tls_active
        await conn.aclose()
    assert srv.transcript.wire[:2] == b"\x16\x03"
    assert srv.transcript.data("plain") == b""
    assert srv.transcript.data("tls") == EHLO + b"QUIT\r\n"


async def test_R8_plaintext_greeting_on_implicit_port_is_a_handshake_error(
    client_ssl_ctx: ssl.SSLContext,
) -> None:
    """R8: a server that sends a plaintext 220 on an implicit-TLS port: handshake error,
    no EHLO in the clear."""
    script = [GREETING, read_bytes(5)]
    async with scripted_server(script) as srv:
        with pytest.raises(triomail.SMTPSecurityError, match="TLS"):
            await open_conn(srv, client_ssl_ctx, tls="implicit")
    assert srv.transcript.bodies[0][:2] == b"\x16\x03"
    tls_records(bytes(srv.transcript.wire))


async def test_R8_handshake_has_a_deadline(
    autojump_clock: trio.testing.MockClock, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R8/R26: a server that never answers the ClientHello: the handshake times out at
    its deadline (virtual time), and no greeting is waited for."""
    async with scripted_stream([sleep(61)]) as (stream, _):
        start = trio.current_time()
        with pytest.raises(triomail.SMTPTimeoutError) as info:
            await triomail.start_session(
                stream,
                host="mx.test",
                tls="implicit",
                ssl_context=client_ssl_ctx,
                local_hostname="client.test",
                timeouts=triomail.Timeouts(tls_handshake=60, greeting=300),
            )
        assert trio.current_time() - start == pytest.approx(60)
    assert info.value.stage == "TLS handshake"


# --------------------------------------------------------------------------------- R9


async def test_R9_no_credentials_over_plaintext() -> None:
    """R9: a plaintext server advertising AUTH PLAIN: refused before AUTH is written."""
    script = [GREETING, expect_line(EHLO), ehlo_reply("AUTH PLAIN LOGIN"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        with pytest.raises(triomail.SMTPSecurityError, match="without TLS"):
            await session(
                stream,
                tls="none",
                username="user",
                password="secret",
            )
    assert srv.transcript.data() == EHLO + b"QUIT\r\n"


async def test_R9_public_auth_is_refused_over_plaintext_too() -> None:
    """R9: conn.auth() itself refuses without TLS; nothing is written for it."""
    script = [GREETING, expect_line(EHLO), ehlo_reply("AUTH PLAIN"), *QUIT]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(
            stream,
            tls="none",
        )
        with pytest.raises(triomail.SMTPSecurityError, match="without TLS"):
            await conn.auth(Plain("user", "secret"))
        await conn.aclose()
    assert srv.transcript.data() == EHLO + b"QUIT\r\n"


async def test_R9_allow_insecure_auth_is_an_explicit_opt_in() -> None:
    """R9: allow_insecure_auth=True sends AUTH PLAIN over plaintext."""
    auth = b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("AUTH PLAIN"),
        expect_line(auth),
        reply(235, "2.7.0 ok"),
        *QUIT,
    ]
    async with scripted_stream(script) as (stream, srv):
        conn = await session(
            stream,
            tls="none",
            username="user",
            password="secret",
            allow_insecure_auth=True,
        )
        assert conn.authenticated
        await conn.aclose()
    assert srv.transcript.data() == EHLO + auth + b"QUIT\r\n"


# -------------------------------------------------------------------------------- R10


@pytest.mark.parametrize("failure", ["certificate", "protocol"])
async def test_R10_tls_failure_is_terminal(
    failure: str, server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R10: after a handshake error only TLS records follow STARTTLS (never plaintext)
    and the socket is closed; a certificate failure is SMTPCertificateError (a
    configuration error), other failures a plain SMTPSecurityError."""
    if failure == "certificate":
        handshake = [starttls(expect_failure=True), expect_eof()]
        ctx = other_ca_context()
    else:  # the server answers the ClientHello with garbage
        handshake = [read_bytes(5), send_lines("250 not TLS at all")]
        ctx = server_ssl_ctx
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("STARTTLS"),
        expect_line("STARTTLS"),
        send_lines("220 go ahead"),
        *handshake,
    ]
    async with scripted_server(script, server_ssl_context=ctx) as srv:
        with pytest.raises(triomail.SMTPSecurityError) as info:
            await open_conn(srv, client_ssl_ctx)
        with trio.fail_after(5):  # the client closed its end: the script can finish
            await srv.finished.wait()
    assert isinstance(info.value, triomail.SMTPCertificateError) == (failure == "certificate")
    tls_records(after_starttls(srv.transcript))
    assert srv.connections == 1


# -------------------------------------------------------------------------------- R11


@pytest.mark.parametrize("close_step", [truncate, abort], ids=["fin-no-close-notify", "rst"])
async def test_R11_abrupt_close_after_221_is_tolerated(
    close_step: Any, server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R11: the server closes TCP right after 221 (no close_notify): aclose() is fine."""
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("PIPELINING"),
        expect_line("QUIT"),
        send_lines("221 2.0.0 bye"),
        close_step(),
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx, implicit_tls=True) as srv:
        conn = await open_conn(srv, client_ssl_ctx, tls="implicit")
        with trio.fail_after(2):
            await conn.aclose()
        assert not conn.is_usable
    assert srv.transcript.data("tls") == EHLO + b"QUIT\r\n"


@pytest.mark.parametrize("close_step", [truncate, abort], ids=["fin-no-close-notify", "rst"])
async def test_R11_close_in_the_middle_of_a_reply_is_a_disconnect(
    close_step: Any, server_ssl_ctx: ssl.SSLContext, client_ssl_ctx: ssl.SSLContext
) -> None:
    """R11: EOF without close_notify while a reply is outstanding is a lost connection,
    never success."""
    script = [
        GREETING,
        expect_line(EHLO),
        ehlo_reply("PIPELINING"),
        expect_line("NOOP"),
        send(b"250-first line\r\n250-sec"),
        close_step(),
    ]
    async with scripted_server(script, server_ssl_context=server_ssl_ctx, implicit_tls=True) as srv:
        conn = await open_conn(srv, client_ssl_ctx, tls="implicit")
        with pytest.raises(triomail.SMTPDisconnected):
            await conn.noop()
        assert not conn.is_usable
        await conn.aclose()
    assert srv.transcript.data("tls") == EHLO + b"NOOP\r\n"


# -------------------------------------------------------------------------------- R12


async def test_R12_logs_tag_the_phase(
    caplog: pytest.LogCaptureFixture,
    server_ssl_ctx: ssl.SSLContext,
    client_ssl_ctx: ssl.SSLContext,
) -> None:
    """R12: the transcript log says which replies came before TLS (untrusted)."""
    script = [
        send_lines("220 pre-tls-greeting ESMTP"),
        expect_line(EHLO),
        ehlo_reply("STARTTLS", domain="pre-tls-ehlo"),
        expect_line("STARTTLS"),
        send_lines("220 2.0.0 go ahead"),
        starttls(),
        expect_line(EHLO),
        ehlo_reply("PIPELINING", domain="post-tls-ehlo"),
        *QUIT,
    ]
    caplog.set_level(logging.DEBUG, logger="triomail")
    async with scripted_server(script, server_ssl_context=server_ssl_ctx) as srv:
        conn = await open_conn(srv, client_ssl_ctx)
        await conn.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "triomail"]
    greeting = [m for m in messages if "pre-tls-greeting" in m]
    pre_ehlo = [m for m in messages if "pre-tls-ehlo" in m]
    post_ehlo = [m for m in messages if "post-tls-ehlo" in m]
    assert greeting and pre_ehlo and post_ehlo, messages
    assert all(" plain < " in m for m in greeting + pre_ehlo)
    assert all(" tls < " in m for m in post_ehlo)
    assert any(" tls > " in m and "QUIT" in m for m in messages)


async def test_transcript_helpers_catch_plaintext_after_starttls() -> None:
    """The helpers above fail on plaintext after STARTTLS (so the R3/R10 checks bite)."""
    with pytest.raises(AssertionError):
        tls_records(b"\x16\x03\x01\x00\x01\x00EHLO client.test\r\n")
    t = Transcript()
    t.wire += EHLO + b"STARTTLS\r\nAUTH PLAIN x\r\n"
    t.writes.append(("plain", EHLO + b"STARTTLS\r\nAUTH PLAIN x\r\n"))
    with pytest.raises(AssertionError):
        assert_nothing_after_starttls_but_quit(t)
