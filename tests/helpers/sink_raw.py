"""A raw-bytes SMTP client for the capture server's tests (``tests/sink/``).

It writes exactly the bytes it is given (no stuffing, no normalisation) and parses
replies strictly, so tests can check what the sink does with any input.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trio

from triomail.testing import SMTPSink

TIMEOUT = 5.0

_OPEN: list[RawClient] = []


async def close_all() -> None:
    """Close every client opened so far (from an async autouse fixture)."""
    while _OPEN:
        await trio.aclose_forcefully(_OPEN.pop().stream)


@dataclass(frozen=True)
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawClient:
    """Talks to a sink over one stream; ``received`` logs every byte read."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.received = bytearray()
        _OPEN.append(self)

    @classmethod
    async def connect(
        cls, sink: SMTPSink, *, ehlo: str | None = "client.example", implicit_tls: bool = False
    ) -> RawClient:
        stream: trio.abc.Stream = await trio.open_tcp_stream(sink.host, sink.port)
        if implicit_tls:
            ssl_stream = trio.SSLStream(
                stream, sink.client_ssl_context(), server_hostname="localhost"
            )
            with trio.fail_after(TIMEOUT):
                await ssl_stream.do_handshake()
            stream = ssl_stream
        client = cls(stream)
        greeting = await client.reply()
        assert greeting.code == 220, greeting
        if ehlo is not None:
            reply = await client.cmd(f"EHLO {ehlo}")
            assert reply.code == 250, reply
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bytes:
        with trio.fail_after(TIMEOUT):
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
        self.received += data
        return bytes(data)

    async def reply(self) -> Reply:
        """Read one complete (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                data = await self._more()
                if not data:
                    raise EOFError(f"connection closed; partial reply {bytes(self.buf)!r}")
                self.buf += data
                continue
            line = bytes(self.buf[:end]).decode("utf-8")
            del self.buf[: end + 2]
            assert len(line) >= 3 and line[:3].isdigit(), line
            assert line[3:4] in ("", " ", "-"), line
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), lines)

    async def replies(self, count: int) -> list[Reply]:
        return [await self.reply() for _ in range(count)]

    async def cmd(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        raw = line.encode("utf-8") if isinstance(line, str) else line
        await self.send(raw + b"\r\n")
        return await self.reply()

    async def bdat(self, chunk: bytes, *, last: bool = False) -> Reply:
        """Send one BDAT command with its chunk, exactly (RFC 3030)."""
        await self.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
        return await self.reply()

    async def closed(self) -> bool:
        """True once the server closed the connection (after any pending replies)."""
        if self.buf:
            return False
        data = await self._more()
        self.buf += data
        return not data

    async def starttls(self, context: ssl.SSLContext) -> None:
        reply = await self.cmd("STARTTLS")
        assert reply.code == 220, reply
        assert not self.buf
        ssl_stream = trio.SSLStream(self.stream, context, server_hostname="localhost")
        with trio.fail_after(TIMEOUT):
            await ssl_stream.do_handshake()
        self.stream = ssl_stream

    async def transaction(
        self, body: bytes, *, sender: str = "a@example.org", rcpt: str = "b@example.net"
    ) -> Reply:
        """MAIL, RCPT, DATA, then ``body`` verbatim (it must include the terminator)."""
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).code == 250
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).code == 250
        assert (await self.cmd("DATA")).code == 354
        await self.send(body)
        return await self.reply()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
