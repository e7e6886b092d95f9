"""Against a real third-party server: aiosmtpd in-process, STARTTLS + AUTH (issue 2)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import triomail

USER, PASSWORD = "jürgen", "pässwörd 🔑"


class Recorder:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 OK queued"


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login.decode() == USER
        and auth_data.password.decode() == PASSWORD
    )
    return AuthResult(success=ok, handled=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def aiosmtpd_server(tls_ca: trustme.CA) -> Iterator[tuple[Controller, Recorder]]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    recorder = Recorder()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=_free_port(),
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=_authenticator,
        auth_require_tls=True,
    )
    controller.start()
    try:
        yield controller, recorder
    finally:
        controller.stop()


def _client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = triomail.default_ssl_context()
    ca.configure_trust(ctx)
    return ctx


async def test_starttls_auth_plain_and_utf8_subject(
    aiosmtpd_server: tuple[Controller, Recorder], tls_ca: trustme.CA
) -> None:
    """EHLO, STARTTLS, TLS on the same socket, EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT."""
    controller, recorder = aiosmtpd_server
    msg = EmailMessage()
    msg["From"] = "Ann <ann@example.com>"
    msg["To"] = "bob@example.org"
    msg["Bcc"] = "carol@example.net"
    msg["Subject"] = "Grüße aus Köln ✉"
    msg.set_content("Hallo Bob,\n.a line that starts with a dot\nbye\n")
    async with triomail.connect(
        "127.0.0.1",
        controller.port,
        tls="starttls",
        ssl_context=_client_ctx(tls_ca),
        username=USER,
        password=PASSWORD,
    ) as conn:
        assert conn.tls_active and conn.authenticated
        result = await conn.send(msg)
    assert result.ok, result
    assert [r.recipient for r in result.recipients] == ["bob@example.org", "carol@example.net"]
    (envelope,) = recorder.envelopes
    assert envelope.mail_from == "ann@example.com"
    assert envelope.rcpt_tos == ["bob@example.org", "carol@example.net"]
    received = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
    assert received["Subject"] == "Grüße aus Köln ✉"
    assert "Bcc" not in received  # stripped from the data, still a recipient
    body = received.get_content().replace("\r\n", "\n")
    assert body == "Hallo Bob,\n.a line that starts with a dot\nbye\n"


async def test_login_mechanism(
    aiosmtpd_server: tuple[Controller, Recorder], tls_ca: trustme.CA
) -> None:
    controller, recorder = aiosmtpd_server
    async with triomail.connect(
        "127.0.0.1",
        controller.port,
        ssl_context=_client_ctx(tls_ca),
    ) as conn:
        await conn.auth(triomail._core.sasl.Login(USER, PASSWORD))
        assert conn.authenticated
        result = await conn.send(
            b"Subject: x\r\n\r\nbody\r\n", sender="a@x.org", recipients=["b@y.org"]
        )
    assert result.ok
    assert recorder.envelopes[0].content == b"Subject: x\r\n\r\nbody\r\n"


async def test_wrong_password_is_an_authentication_error(
    aiosmtpd_server: tuple[Controller, Recorder], tls_ca: trustme.CA
) -> None:
    controller, _ = aiosmtpd_server
    with pytest.raises(triomail.SMTPAuthenticationError) as info:
        async with triomail.connect(
            "127.0.0.1",
            controller.port,
            ssl_context=_client_ctx(tls_ca),
            username=USER,
            password="wrong",
        ):
            pass
    assert info.value.code == 535 and info.value.permanent
    assert "wrong" not in str(info.value)  # R36
