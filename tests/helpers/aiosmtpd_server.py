"""aiosmtpd (the asyncio SMTP server library) as an interop contract target.

:func:`start_aiosmtpd` runs aiosmtpd's :class:`~aiosmtpd.controller.Controller` (its own
thread and event loop) on a free loopback port: STARTTLS required before MAIL (a
certificate from the session CA), AUTH PLAIN/LOGIN over TLS, SMTPUTF8 on, 8BITMIME
(always advertised), PIPELINING implicitly (aiosmtpd reads commands in order and never
refuses one for arriving early), no CHUNKING. The handler keeps the ledger in memory,
refuses ``REFUSED_DOMAIN`` recipients with 550, and answers the cue recipient with 421
and closes the transport itself (aiosmtpd would otherwise keep the session open).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from typing import Any

import aiosmtpd
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from helpers.certs import server_ssl_context
from helpers.mta import CUE_421, HOST, REFUSED_DOMAIN, Target
from helpers.postfix import free_loopback_port

USER, PASSWORD = "triomail", "interop-secret"
_CLOSING = b"421 4.3.0 closing on cue\r\n"


class LedgerHandler:
    """Accepts every message, recording its Message-ID."""

    def __init__(self) -> None:
        self.ledger: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        local, _, domain = address.rpartition("@")
        if local == CUE_421:
            server.transport.write(_CLOSING)
            server.transport.close()  # the 421 below goes nowhere: closed
            return _CLOSING.decode().strip()
        if domain.lower() == REFUSED_DOMAIN:
            return "550 5.1.2 refused by the test configuration"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = BytesHeaderParser().parsebytes(envelope.original_content)
        self.ledger.append(str(headers.get("Message-ID", "-")).strip())
        return "250 2.0.0 OK queued"


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@contextlib.contextmanager
def start_aiosmtpd(ca: trustme.CA) -> Iterator[Target]:
    """Run aiosmtpd in its thread for the duration of the ``with`` block."""
    handler = LedgerHandler()
    tls: ssl.SSLContext = server_ssl_context(ca)
    controller = Controller(
        handler,
        hostname=HOST,
        port=free_loopback_port(),
        tls_context=tls,
        require_starttls=True,
        authenticator=_authenticator,
        auth_require_tls=True,
        enable_SMTPUTF8=True,
    )
    controller.start()
    try:
        yield Target(
            name="aiosmtpd",
            version=f"aiosmtpd {aiosmtpd.__version__}",
            host=HOST,
            port=controller.port,
            ledger=lambda: list(handler.ledger),
            ca=ca,
            auth=(USER, PASSWORD),
            cue_421=True,
        )
    finally:
        controller.stop()
