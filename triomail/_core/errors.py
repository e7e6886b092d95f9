"""The exception hierarchy: everything triomail raises derives from :class:`SMTPError`.

Errors from trio and :mod:`ssl` are translated at the one I/O boundary
(``_client.transport``), so callers never need to catch ``trio.BrokenResourceError`` or
``ssl.SSLError``. Credentials never appear in a message or an attribute (R36).
"""

from __future__ import annotations

from .reply import Reply


class SMTPError(Exception):
    """Base class of every error triomail raises."""


class SMTPConnectError(SMTPError):
    """The TCP connection could not be opened."""


class SMTPDisconnected(SMTPError):
    """The server closed the connection or the stream broke mid-conversation."""


class SMTPTimeoutError(SMTPError):
    """A stage deadline expired (RFC 5321 §4.5.3.2); the connection has been closed."""

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class SMTPSecurityError(SMTPError):
    """TLS could not be established as configured (fail-closed: never a downgrade)."""


class SMTPCertificateError(SMTPSecurityError):
    """The server's certificate failed verification: a configuration error (R10)."""


class SMTPProtocolError(SMTPError):
    """The server broke the protocol (malformed, oversized or unsolicited reply)."""


class LocalProtocolError(SMTPError, ValueError):
    """The caller asked for something that cannot go on the wire (R13, R14, R16-R19)."""


class SMTPResponseError(SMTPError):
    """The server answered a command with an unexpected reply."""

    def __init__(self, command: str, reply: Reply) -> None:
        super().__init__(f"{command} refused: {reply}")
        self.command = command
        self.reply = reply

    @property
    def code(self) -> int:
        return self.reply.code


class SMTPAuthenticationError(SMTPResponseError):
    """AUTH failed; :attr:`permanent` tells 535/534/538 apart from 454/432 (R35)."""

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500
