"""What the capture server records for each accepted message."""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from functools import cached_property
from typing import Literal

__all__ = ["CapturedMessage"]

_PARSER = BytesParser(EmailMessage, policy=email.policy.default)


@dataclass(frozen=True, eq=True)
class CapturedMessage:
    """One message as the sink accepted it.

    Attributes:
        mail_from: the reverse-path without angle brackets (``""`` for ``<>``).
        rcpt_to: the accepted forward-paths, in order.
        mail_options: the ``MAIL`` parameters as sent, e.g. ``["SIZE=120", "BODY=8BITMIME"]``.
        rcpt_options: the ``RCPT`` parameters, one list per entry of ``rcpt_to``.
        data: the message exactly as received: after removing dot-stuffing (RFC 5321
            §4.5.2) for ``DATA``, the concatenated chunks for ``BDAT`` (RFC 3030).
            ``DATA`` content keeps the CRLF that ends its last line.
        tls: whether the transaction ran over TLS (STARTTLS or implicit).
        authenticated_as: the AUTH user name, or None.
        peer: the client's address and port.
        helo: the EHLO/HELO argument.
        transfer: ``"DATA"`` or ``"BDAT"``.
    """

    mail_from: str
    rcpt_to: list[str]
    mail_options: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    tls: bool = False
    authenticated_as: str | None = None
    peer: tuple[str, int] = ("", 0)
    helo: str = ""
    transfer: Literal["DATA", "BDAT"] = "DATA"

    # Parsed lazily: the sink may take thousands of messages a second and most
    # callers only look at a few. cached_property stores into the instance
    # __dict__ directly, which a frozen (non-slotted) dataclass allows.
    @cached_property
    def message(self) -> EmailMessage:
        """``data`` parsed with :data:`email.policy.default` (parsed on first use)."""
        return _PARSER.parsebytes(self.data)

    @property
    def subject(self) -> str | None:
        """The decoded Subject header, or None."""
        value = self.message["Subject"]
        return None if value is None else str(value)
