"""Message content: canonical form and DATA transparency (sans-IO).

Theory of operation
-------------------
:func:`canonicalize` turns any message (``str`` or ``bytes``) into canonical form: CR and
LF only as CRLF pairs, a final CRLF (R16, the SMTP smuggling defence), no NUL (R17), no
8-bit octets unless allowed (R18), no line over 998 octets plus CRLF (R19).
:func:`dot_stuff` then adds the DATA transparency dots (RFC 5321 §4.5.2) and the
terminator, so ``\\r\\n.\\r\\n`` can appear exactly once, at the end. BDAT (RFC 3030)
takes the canonical bytes as they are (R20).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import LocalProtocolError
from .frozen import fast_constructor

__all__ = [
    "MAX_DATA_LINE",
    "Canonical",
    "canonicalize",
    "dot_stuff",
    "iter_lines",
    "new_canonical",
    "stuffed_parts",
    "unstuff",
]

# RFC 5321 §4.5.3.1.6: 1000 octets including CRLF.
MAX_DATA_LINE = 998
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
#: Up to this size, ``canonicalize`` splits the message at CRLF (fewer instructions).
_SPLIT_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Canonical:
    """A message in canonical form: CRLF line endings, ending in CRLF unless empty (R16)."""

    data: bytes
    eight_bit: bool

    def __len__(self) -> int:
        return len(self.data)


def canonicalize(message: str | bytes | bytearray | memoryview) -> Canonical:
    """Return the message with every line ending as CRLF and a final CRLF (R16-R19).

    Raises :class:`LocalProtocolError` for NUL (R17) or a line over 998 octets (R19). A
    ``str`` is encoded as UTF-8. Whether 8-bit octets may be sent depends on the server,
    so :attr:`Canonical.eight_bit` reports them for the caller to check (R18).
    """
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    # A bare CR or LF becomes CRLF (aiosmtplib and qmail do the same), and the last line
    # is terminated. An empty message stays empty: its wire form is just ".\r\n", whose
    # CRLF is the one ending the DATA command (RFC 5321 §4.1.1.4).
    if len(data) <= _SPLIT_LIMIT:
        # Without its CRLFs a canonical message has no CR or LF left, and its last piece
        # is empty: a split, a join and two memchr cost less than counting CR, LF and
        # CRLF (the pieces are short-lived; larger messages are counted instead).
        pieces = data.split(b"\r\n")
        rest = b"".join(pieces)
        canonical = not pieces[-1] and b"\r" not in rest and b"\n" not in rest
    else:
        crlf = data.count(b"\r\n")
        canonical = data.endswith(b"\r\n") and data.count(b"\r") == crlf == data.count(b"\n")
    if not canonical:
        data = _LINE_ENDING.sub(b"\r\n", data)
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
    if b"\x00" in data:
        raise LocalProtocolError("message contains a NUL octet (RFC 5322 text excludes it)")
    if _has_long_line(data):
        raise LocalProtocolError(
            f"message has a line longer than {MAX_DATA_LINE} octets; re-encode it "
            "(quoted-printable or base64) instead of sending it split"
        )
    return new_canonical(data, not data.isascii())


new_canonical = fast_constructor(Canonical)


def _has_long_line(data: bytes) -> bool:
    """Whether CRLF-terminated ``data`` has a line over :data:`MAX_DATA_LINE` octets.

    A line fits if its LF comes within ``MAX_DATA_LINE + 2`` octets of its start (text,
    CR, LF). So the last LF in that window is looked for: none means the line there is
    too long; otherwise every line up to it fits, and the next window starts after it.
    About one ``rfind`` per kilobyte, and no split into lines.
    """
    window = MAX_DATA_LINE + 2
    start = 0
    size = len(data)
    while size - start > window:  # the rest is one window at most: its lines fit
        last = data.rfind(b"\n", start, start + window)
        if last < 0:
            return True
        start = last + 1
    return False


def dot_stuff(canonical: Canonical) -> bytes:
    """Add RFC 5321 §4.5.2 transparency dots and the ``.\\r\\n`` terminator."""
    body, end = stuffed_parts(canonical)
    return body + end


def stuffed_parts(canonical: Canonical) -> tuple[bytes, bytes]:
    """:func:`dot_stuff` as (body, terminator), ``body + terminator == dot_stuff(c)``.

    Kept in two parts so that a message needing no transparency dots is not copied just
    to append the terminator (the write that carries it joins the parts anyway).
    """
    data = canonical.data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if data[:1] == b".":
        data = b"." + data
    return data, b".\r\n"


def unstuff(wire: bytes) -> bytes:
    """The receiver's inverse of :func:`dot_stuff` (for tests and the sink)."""
    if not wire.endswith(b".\r\n"):
        raise ValueError("no end-of-data marker")
    body = wire[:-3]
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def iter_lines(data: bytes) -> Iterable[bytes]:
    """The lines of canonical data, without their CRLF."""
    return data.split(b"\r\n")[:-1]
