"""What a rendered row is: canonical message bytes and the envelope to send them with.

Kept apart from the rest of the template package (no Jinja2) because the render
process's record codec (:mod:`..records`) and the feed need it without compiling
anything.
"""

from __future__ import annotations

from dataclasses import dataclass


class TemplateError(Exception):
    """The template cannot be used at all (syntax, missing attachment, bad header)."""


class RowError(Exception):
    """This row cannot become a message; the batch goes on without it."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """One message ready for the wire: canonical CRLF bytes and its envelope."""

    data: bytes
    sender: str
    recipients: tuple[str, ...]
    message_id: str
    #: True if an address has a non-ASCII local part (RFC 6531, raw UTF-8 headers).
    smtputf8: bool
    #: :func:`canonical_eight_bit` of ``data`` if it was computed already (the render
    #: process does); ``None``: not computed.
    eight_bit: bool | None = None


def canonical_eight_bit(data: bytes) -> bool | None:
    """For canonical CRLF text without NUL: whether it has 8-bit octets; else ``None``.

    The renderer writes such text; ``None`` sends the message through the full check.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf or b"\x00" in data:
        return None
    return not data.isascii()
