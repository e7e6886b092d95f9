"""Server replies from bytes: the sans-IO :class:`ReplyParser`.

Theory of operation
-------------------
``feed()`` adds what the transport read; ``next_reply()`` returns one complete reply or
``None`` when it needs more bytes. Lines are held to the RFC 5321 §4.2 grammar (R21):
three digits, the first 2-5, then ``-``, a space or the end of the line; every line of a
reply carries the same code; lines end in CRLF. Anything else is a
:class:`SMTPProtocolError`, after which the connection must be discarded.

Memory is bounded whatever the server sends (R22): a line longer than
:data:`MAX_LINE_LENGTH`, a reply longer than :data:`MAX_REPLY_LENGTH` or with more than
:data:`MAX_REPLY_LINES` lines fails as soon as the limit is crossed, even before a CRLF
arrives.

Bytes past the last complete reply stay in the buffer and are visible as
:attr:`ReplyParser.unprocessed`. The connection checks it where the protocol says nothing
may be pending: after the 220 to STARTTLS (response injection, R6) and after each reply
when not pipelining (desync, R24).
"""

from __future__ import annotations

from .errors import SMTPProtocolError
from .reply import Reply

__all__ = ["MAX_LINE_LENGTH", "MAX_REPLY_LENGTH", "MAX_REPLY_LINES", "ReplyParser"]

# smtplib's _MAXLINE and aiosmtplib's MAX_LINE_LENGTH; RFC 5321 §4.5.3.1.5 asks for >= 512.
MAX_LINE_LENGTH = 8192
# aiosmtplib 5.1.2 caps a whole reply at 32 KiB.
MAX_REPLY_LENGTH = 32 * 1024
# An EHLO reply has a few dozen lines; nothing legitimate comes near this.
MAX_REPLY_LINES = 256

# Single-line replies already parsed, by their exact octets (without CRLF). A server says
# "250 2.1.5 Ok" thousands of times; a Reply is immutable, so one value serves them all.
# Only short lines are kept, and the table is emptied when full (unique texts such as
# "250 2.0.0 Ok: queued as ..." would otherwise fill it): memory stays bounded (R22).
_CACHE: dict[bytes, Reply] = {}
_CACHE_LINE = 128
_CACHE_SIZE = 512


class ReplyParser:
    """Turns bytes from the server into :class:`Reply` values (sans-IO)."""

    __slots__ = ("_buffer", "_code", "_lines", "_pos", "_scan", "_start")

    def __init__(self) -> None:
        # Bytes are kept as received and consumed by moving offsets, not by deleting
        # them: a read usually holds a whole group of replies, and slicing a line out
        # of ``bytes`` for the reply cache is one allocation (a bytearray needs two
        # and a memmove per reply). ``_start`` is the first byte of the reply being
        # parsed, so ``unprocessed`` is exactly the bytes past the last complete reply.
        self._buffer = b""
        self._start = 0
        self._pos = 0  # start of the next line to parse
        self._scan = 0  # where to resume looking for CRLF: keeps parsing linear
        self._code = 0
        self._lines: list[str] = []

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes read from the transport."""
        start = self._start
        if start == len(self._buffer):
            self._buffer = bytes(data)  # all consumed (the usual case): no copy of bytes
        else:
            # What is left is part of a reply (bounded below) or replies not asked for.
            self._buffer = self._buffer[start:] + data
        self._pos -= start
        self._scan -= start
        self._start = 0

    @property
    def unprocessed(self) -> bytes:
        """Bytes received past the last complete reply (including an incomplete reply)."""
        return self._buffer[self._start :]

    @property
    def has_unprocessed(self) -> bool:
        return len(self._buffer) > self._start

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or ``None`` if more bytes are needed.

        Raises :class:`~triomail.SMTPProtocolError` on a grammar or size violation.
        """
        buf = self._buffer
        start = self._start
        if self._pos == start and not self._lines:
            if start == len(buf):
                return None  # the usual question after the last buffered reply
            # At a reply boundary: a line seen before is that same reply again.
            end = buf.find(b"\r\n", self._scan)
            if 0 <= end - start <= _CACHE_LINE:
                cached = _CACHE.get(buf[start:end])
                if cached is not None:
                    self._start = self._pos = self._scan = end + 2
                    return cached
        while True:
            line_start = self._pos
            end = buf.find(b"\r\n", self._scan)
            if end < 0:
                pending = len(buf) - line_start
                if buf.endswith(b"\r"):
                    pending -= 1  # its LF may be in the next read
                if pending > MAX_LINE_LENGTH:
                    raise SMTPProtocolError(f"reply line longer than {MAX_LINE_LENGTH} octets")
                if len(buf) - start > MAX_REPLY_LENGTH:
                    raise SMTPProtocolError(f"reply longer than {MAX_REPLY_LENGTH} octets")
                self._scan = max(line_start, len(buf) - 1)  # a CR may be the last byte
                return None
            if end - line_start > MAX_LINE_LENGTH:
                raise SMTPProtocolError(f"reply line longer than {MAX_LINE_LENGTH} octets")
            line = buf[line_start:end]
            self._pos = self._scan = end + 2
            if end + 2 - start > MAX_REPLY_LENGTH:
                raise SMTPProtocolError(f"reply longer than {MAX_REPLY_LENGTH} octets")
            code, last, text = _parse_line(line)
            if self._lines and code != self._code:
                raise SMTPProtocolError(
                    f"reply code changed from {self._code} to {code} within one reply"
                )
            self._code = code
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise SMTPProtocolError(f"reply has more than {MAX_REPLY_LINES} lines")
            if last:
                reply = Reply.from_lines(code, tuple(self._lines))
                if line_start == start and end - start <= _CACHE_LINE:  # a single-line reply
                    if len(_CACHE) >= _CACHE_SIZE:
                        _CACHE.clear()
                    _CACHE[line] = reply
                self._start = end + 2
                self._lines = []
                return reply


def _parse_line(line: bytes) -> tuple[int, bool, str]:
    """Split one reply line (without CRLF) into code, is-last and text (R21, R23)."""
    if (
        len(line) < 3
        or not (0x32 <= line[0] <= 0x35)
        or not (0x30 <= line[1] <= 0x39)
        or not (0x30 <= line[2] <= 0x39)
    ):
        raise SMTPProtocolError(f"malformed reply line: {_show(line)}")
    if len(line) == 3:
        return int(line[:3]), True, ""
    sep = line[3]
    if sep not in (0x20, 0x2D):  # " " or "-"
        raise SMTPProtocolError(f"malformed reply line: {_show(line)}")
    if b"\n" in line or b"\r" in line:
        raise SMTPProtocolError(f"bare CR or LF in reply line: {_show(line)}")
    # R23: never crash on 8-bit text.
    return int(line[:3]), sep == 0x20, line[4:].decode("utf-8", "replace")


def _show(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")
