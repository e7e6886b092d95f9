"""A scripted fake SMTP server that plays exact bytes (test harness, not a real server).

Modelled on Exim's ``test/src/server.c`` and the EAST fake-mail-server: a test writes
the server's side of the conversation as a list of steps, the harness plays it against
the client and records every byte the client wrote. Any deviation (a line that does not
match, a timeout, an early EOF) fails the script with the expected step, what arrived,
and the whole transcript.

Three ways to run a script:

- :func:`play` on any :class:`trio.abc.Stream` (e.g. one end of
  :func:`trio.testing.memory_stream_pair` or :func:`trio.testing.lockstep_stream_pair`);
  it raises :class:`ScriptError` on a mismatch and does not close the stream.
- :func:`scripted_stream`, the same supervision as :func:`scripted_server` (below) over
  an in-memory stream pair: plain memory, lockstep, or :func:`bounded_stream_pair`
  (small windows, a slow reader), for exact virtual time with ``MockClock``.
- :func:`scripted_server`, an async context manager listening on ``127.0.0.1`` (port
  0). It plays the script on the first connection, counts (and closes) any further
  ones, closes the connection gracefully when the script ends, and when the ``async
  with`` block exits waits (up to ``finish_timeout``) for the script to finish, then
  raises the script's failure, if any::

      async with scripted_server(
          [
              send_lines("220 fake ESMTP"),
              expect(b"EHLO "),
              ehlo_reply("PIPELINING", "STARTTLS"),
              expect_line(b"STARTTLS\\r\\n"),
              send_lines("220 go ahead"),
              starttls(),
              expect(b"EHLO "),
              ehlo_reply("PIPELINING"),
              expect_line(b"QUIT\\r\\n"),
              send_lines("221 bye"),
          ],
          server_ssl_context=server_ssl_ctx,
      ) as srv:
          await client_under_test(srv.host, srv.port)
      assert srv.transcript.buffered_at_starttls == b""
      assert srv.transcript.wire_after_starttls.startswith(b"\\x16\\x03")

Time: every wait uses Trio's clock, so with ``MockClock(autojump_threshold=0)`` sleeps,
dribbles and timeouts take no real time. ``recv_timeout`` (default 30 s) bounds every
read step, so a client that waits for a reply the script will never send turns into a
clear "timed out waiting for ..." failure instead of a hang.

Back-pressure: memory streams from ``memory_stream_pair()`` buffer without limit, so
``never_read()`` only stalls the client on TCP (pass ``recv_buffer_size=`` for a small
window) or on ``lockstep_stream_pair()``.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio
from trio.testing import memory_stream_pair

Phase = Literal["plain", "tls"]
Direction = Literal["S", "C", "*"]

#: A client line longer than this without CRLF fails the step instead of buffering on.
MAX_LINE = 1 << 20
DEFAULT_RECV_TIMEOUT = 30.0
QUIT_REPLY = b"221 2.0.0 Bye\r\n"


def _b(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _short(data: bytes, limit: int = 300) -> str:
    if len(data) <= limit:
        return repr(data)
    return f"{data[: limit // 2]!r} ...({len(data)} bytes)... {data[-limit // 2 :]!r}"


# -- transcript ---------------------------------------------------------------------------


@dataclass(eq=False)
class Transcript:
    """Everything that happened on one connection.

    ``writes``: each chunk received from the client, in order, as ``(phase, bytes)``
    (plaintext; in the ``"tls"`` phase the decrypted bytes). One chunk is what one
    ``receive_some`` returned, which on loopback is normally one client write.
    ``wire``: the raw bytes received from the client, including TLS records.
    ``events``: the conversation as ``(direction, phase, bytes)``; ``"S"`` server sent,
    ``"C"`` client bytes consumed by a step, ``"*"`` a note from the harness.
    ``bodies``: what ``expect_data()`` (including the final ``.\\r\\n``) and
    ``read_bytes(n)`` read, in order.
    ``buffered_at_starttls``: ``None`` if no TLS handshake happened; otherwise the
    plaintext bytes the client had already sent past the last consumed line when the
    server started the handshake (``b""`` for a well-behaved client; they are discarded,
    never fed to TLS).
    ``tls_error``: why an ``expect_failure`` handshake failed. ``eof``: the client closed.
    """

    writes: list[tuple[Phase, bytes]] = field(default_factory=list)
    wire: bytearray = field(default_factory=bytearray)
    events: list[tuple[Direction, Phase, bytes]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    phase: Phase = "plain"
    buffered_at_starttls: bytes | None = None
    starttls_wire_offset: int | None = None
    tls_error: str | None = None
    eof: bool = False

    def data(self, phase: Phase | None = None) -> bytes:
        """All bytes the client wrote (in *phase* only, if given), concatenated."""
        return b"".join(d for p, d in self.writes if phase is None or p == phase)

    def lines(self, phase: Phase | None = None, *, keepends: bool = False) -> list[bytes]:
        """:meth:`data` split on CRLF; a trailing unterminated fragment is kept as is."""
        data = self.data(phase)
        parts = data.split(b"\r\n")
        last = parts.pop()
        out = [p + b"\r\n" for p in parts] if keepends else parts
        if last:
            out.append(last)
        return out

    @property
    def wire_after_starttls(self) -> bytes:
        """Raw bytes the client sent after the last plaintext line the script consumed
        before the TLS handshake (for STARTTLS: everything after ``STARTTLS\\r\\n``)."""
        if self.starttls_wire_offset is None:
            return b""
        return bytes(self.wire[self.starttls_wire_offset :])

    def note(self, text: str) -> None:
        self.events.append(("*", self.phase, text.encode()))

    def render(self) -> str:
        out = []
        for direction, phase, data in self.events:
            tag = "[tls] " if phase == "tls" else ""
            if direction == "*":
                out.append(f"    {tag}-- {data.decode()}")
            else:
                arrow = "S>" if direction == "S" else "C<"
                out.append(f"    {tag}{arrow} {_short(data)}")
        return "\n".join(out) if out else "    (nothing happened)"


class ScriptError(AssertionError):
    """The client did not do what the script expected (or the script was misused)."""

    def __init__(
        self, message: str, *, transcript: Transcript, step_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.transcript = transcript
        self.step_index = step_index


class _Fail(Exception):
    """Raised by a step; turned into a ScriptError with context by the player."""


# -- the connection the steps act on ------------------------------------------------------


class _Tap(trio.abc.Stream):
    """Pass-through stream that records every raw byte received into ``transcript.wire``."""

    def __init__(self, inner: trio.abc.Stream, transcript: Transcript) -> None:
        self.inner = inner
        self.transcript = transcript

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.transcript.wire += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Conn:
    def __init__(
        self,
        stream: trio.abc.Stream,
        transcript: Transcript,
        server_ssl_context: ssl.SSLContext | None,
        recv_timeout: float,
        finished: trio.Event,
    ) -> None:
        self.tap = _Tap(stream, transcript)
        self.stream: trio.abc.Stream = self.tap
        self.t = transcript
        self.ssl_context = server_ssl_context
        self.recv_timeout = recv_timeout
        self.finished = finished
        self.buf = bytearray()
        self.tls_failed = False
        self.closed = False
        self.step_index = 0

    def timeout(self, timeout: float | None) -> float:
        return self.recv_timeout if timeout is None else timeout

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise _Fail("script error: send after close()/abort()")
        self.t.events.append(("S", self.t.phase, data))
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Fail(f"could not send {_short(data)}: the client is gone ({exc!r})") from exc

    async def receive_chunk(self) -> bytes | None:
        """One chunk from the client (recorded), or None at EOF (recorded)."""
        if self.closed:
            raise _Fail("script error: read after close()/abort()")
        try:
            chunk = bytes(await self.stream.receive_some(65536))
        except trio.BrokenResourceError as exc:
            # Ragged TLS EOF (no close_notify) or a TCP reset: the client is gone.
            self.t.note(f"client connection broke: {exc.__cause__ or exc!r}")
            chunk = b""
        if not chunk:
            if not self.t.eof:
                self.t.eof = True
                self.t.note("client closed (EOF)")
            return None
        self.t.writes.append((self.t.phase, chunk))
        self.buf += chunk
        return chunk

    def consume(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.t.events.append(("C", self.t.phase, data))
        return data

    async def read_until(
        self, marker: bytes, what: str, timeout: float | None, *, or_first: bytes = b""
    ) -> bytes:
        """Consume up to and including ``marker``, or just ``or_first`` if the buffer
        starts with it (checked again as bytes arrive)."""
        t = self.timeout(timeout)
        try:
            with trio.fail_after(t):
                while True:
                    if or_first and self.buf.startswith(or_first):
                        return self.consume(len(or_first))
                    idx = self.buf.find(marker)
                    if idx >= 0:
                        return self.consume(idx + len(marker))
                    if len(self.buf) > MAX_LINE:
                        raise _Fail(f"{what}: over {MAX_LINE} bytes without {marker!r}")
                    if await self.receive_chunk() is None:
                        raise _Fail(
                            f"{what}: the client closed the connection; unterminated "
                            f"bytes: {_short(bytes(self.buf))}"
                        )
        except trio.TooSlowError:
            raise _Fail(
                f"{what}: timed out after {t}s; the client sent (unconsumed): "
                f"{_short(bytes(self.buf))}"
            ) from None

    async def read_exact(self, n: int, what: str, timeout: float | None) -> bytes:
        t = self.timeout(timeout)
        try:
            with trio.fail_after(t):
                while len(self.buf) < n:
                    if await self.receive_chunk() is None:
                        raise _Fail(f"{what}: EOF after {len(self.buf)} of {n} bytes")
        except trio.TooSlowError:
            raise _Fail(f"{what}: timed out after {t}s with {len(self.buf)} of {n} bytes") from None
        return self.consume(n)

    async def close(self, *, forceful: bool) -> None:
        self.closed = True
        if forceful:
            raw = self.tap.inner
            if isinstance(raw, trio.SocketStream):
                # SO_LINGER with a zero timeout makes close() send a RST.
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(raw)
            return
        with trio.move_on_after(5, shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.aclose()
            return
        await trio.aclose_forcefully(self.tap.inner)


# -- steps --------------------------------------------------------------------------------


class Step:
    """Base class of script steps (the helper functions below build them)."""

    async def run(self, conn: _Conn) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Send(Step):
    data: bytes

    async def run(self, conn: _Conn) -> None:
        await conn.send(self.data)


@dataclass(frozen=True)
class Expect(Step):
    prefix: bytes
    exact: bool = False
    timeout: float | None = None

    async def run(self, conn: _Conn) -> None:
        what = f"expected line {'==' if self.exact else 'starting with'} {self.prefix!r}"
        line = await conn.read_until(b"\r\n", what, self.timeout)
        ok = line == self.prefix if self.exact else line.startswith(self.prefix)
        if not ok:
            raise _Fail(f"{what}\n      got {line!r}")


@dataclass(frozen=True)
class ExpectData(Step):
    timeout: float | None = None

    async def run(self, conn: _Conn) -> None:
        what = "expected DATA content ending in CRLF.CRLF"
        # An empty body is just ".\r\n" (the DATA line's CRLF came first); a body that
        # is not empty never starts with it (a lone "." line is stuffed to "..").
        body = await conn.read_until(b"\r\n.\r\n", what, self.timeout, or_first=b".\r\n")
        conn.t.bodies.append(body)


@dataclass(frozen=True)
class ReadBytes(Step):
    n: int
    timeout: float | None = None

    async def run(self, conn: _Conn) -> None:
        conn.t.bodies.append(await conn.read_exact(self.n, f"read_bytes({self.n})", self.timeout))


@dataclass(frozen=True)
class StartTLS(Step):
    expect_failure: bool = False
    timeout: float | None = None

    async def run(self, conn: _Conn) -> None:
        if conn.ssl_context is None:
            raise _Fail("script error: starttls() needs server_ssl_context=")
        t = conn.t
        buffered = bytes(conn.buf)
        conn.buf.clear()
        if t.buffered_at_starttls is None:
            t.buffered_at_starttls = buffered
            t.starttls_wire_offset = len(t.wire) - len(buffered)
        t.note(f"TLS handshake; client bytes buffered (discarded): {buffered!r}")
        ssl_stream = trio.SSLStream(conn.stream, conn.ssl_context, server_side=True)
        limit = conn.timeout(self.timeout)
        try:
            with trio.fail_after(limit):
                await ssl_stream.do_handshake()
        except trio.TooSlowError:
            raise _Fail(f"TLS handshake timed out after {limit}s") from None
        except trio.BrokenResourceError as exc:
            reason = repr(exc.__cause__ or exc)
            if not self.expect_failure:
                raise _Fail(f"TLS handshake failed: {reason}") from exc
            t.tls_error = reason
            conn.tls_failed = True
            t.note(f"TLS handshake failed as expected: {reason}")
            return
        if self.expect_failure:
            raise _Fail("expected the TLS handshake to fail, but it succeeded")
        conn.stream = ssl_stream
        t.phase = "tls"
        t.note(f"TLS established: {ssl_stream.version()}")


@dataclass(frozen=True)
class Sleep(Step):
    seconds: float

    async def run(self, conn: _Conn) -> None:
        conn.t.note(f"sleep {self.seconds}s")
        await trio.sleep(self.seconds)


@dataclass(frozen=True)
class Dribble(Step):
    data: bytes
    every: float = 10.0
    chunk: int = 1

    async def run(self, conn: _Conn) -> None:
        conn.t.note(f"dribble {self.chunk} byte(s) every {self.every}s:")
        for i in range(0, len(self.data), self.chunk):
            if i:
                await trio.sleep(self.every)
            await conn.send(self.data[i : i + self.chunk])


@dataclass(frozen=True)
class Close(Step):
    async def run(self, conn: _Conn) -> None:
        conn.t.note("server closes the connection")
        await conn.close(forceful=False)


@dataclass(frozen=True)
class Abort(Step):
    async def run(self, conn: _Conn) -> None:
        conn.t.note("server aborts the connection (RST)")
        await conn.close(forceful=True)


@dataclass(frozen=True)
class Truncate(Step):
    async def run(self, conn: _Conn) -> None:
        conn.t.note("server closes TCP without a TLS close_notify (truncation)")
        conn.closed = True
        await trio.aclose_forcefully(conn.tap.inner)


@dataclass(frozen=True)
class ExpectEOF(Step):
    timeout: float | None = None
    allow_quit: bool = True
    quit_reply: bytes | None = QUIT_REPLY

    async def run(self, conn: _Conn) -> None:
        limit = conn.timeout(self.timeout)
        allowed = b"QUIT\r\n" if self.allow_quit and not conn.tls_failed else b""
        got = bytearray(conn.buf)
        conn.buf.clear()
        replied = False
        try:
            with trio.fail_after(limit):
                while True:
                    if not conn.tls_failed and not allowed.startswith(got):
                        raise _Fail(
                            "expected the client to close the connection"
                            + (" (optionally after QUIT)" if allowed else "")
                            + f", but it wrote {_short(bytes(got))}"
                        )
                    if got and got == allowed and not replied:
                        conn.t.events.append(("C", conn.t.phase, bytes(got)))
                        replied = True
                        if self.quit_reply:
                            with contextlib.suppress(_Fail):
                                await conn.send(self.quit_reply)
                    if await conn.receive_chunk() is None:
                        break
                    got += conn.buf
                    conn.buf.clear()
        except trio.TooSlowError:
            raise _Fail(
                f"expected the client to close the connection within {limit}s; "
                f"it wrote {_short(bytes(got))} and kept it open"
            ) from None
        if conn.tls_failed and got:
            conn.t.note(f"after the failed handshake the client sent {_short(bytes(got))}")


@dataclass(frozen=True)
class NeverRead(Step):
    async def run(self, conn: _Conn) -> None:
        conn.t.note("server stops reading (script complete)")
        conn.finished.set()
        await trio.sleep_forever()


@dataclass(frozen=True)
class ExpectNothing(Step):
    seconds: float

    async def run(self, conn: _Conn) -> None:
        if conn.buf:
            raise _Fail(
                f"expected no client bytes for {self.seconds}s, but it had already "
                f"written {_short(bytes(conn.buf))}"
            )
        with trio.move_on_after(self.seconds):
            if await conn.receive_chunk() is None:
                return
            raise _Fail(
                f"expected no client bytes for {self.seconds}s, got {_short(bytes(conn.buf))}"
            )


# -- step constructors (the public vocabulary) --------------------------------------------


def send(data: bytes | str) -> Send:
    """Write *data* exactly as given (no CRLF added)."""
    return Send(_b(data))


def send_lines(*lines: bytes | str) -> Send:
    """Write each line followed by CRLF, all in a single write."""
    return Send(b"".join(_b(line) + b"\r\n" for line in lines))


def reply(code: int, *texts: str) -> Send:
    """A (multi-line) reply in one write: ``reply(250, "a", "b")`` is
    ``250-a\\r\\n250 b\\r\\n``."""
    texts = texts or ("",)
    return send_lines(
        *(f"{code}{'-' if i < len(texts) - 1 else ' '}{t}" for i, t in enumerate(texts))
    )


def ehlo_reply(*capabilities: str, domain: str = "scripted.test") -> Send:
    """The 250 reply to EHLO: ``domain`` then each capability line."""
    return reply(250, domain, *capabilities)


def expect(prefix: bytes | str, *, timeout: float | None = None) -> Expect:
    """Read one CRLF-terminated line; it must start with *prefix* (case-sensitive)."""
    return Expect(_b(prefix), timeout=timeout)


def expect_line(line: bytes | str, *, timeout: float | None = None) -> Expect:
    """Read one line; it must equal *line* exactly (CRLF appended if *line* lacks it)."""
    data = _b(line)
    return Expect(data if data.endswith(b"\r\n") else data + b"\r\n", exact=True, timeout=timeout)


def expect_data(*, timeout: float | None = None) -> ExpectData:
    """Read DATA content up to and including ``\\r\\n.\\r\\n`` into ``transcript.bodies``."""
    return ExpectData(timeout=timeout)


def read_bytes(n: int, *, timeout: float | None = None) -> ReadBytes:
    """Read exactly *n* bytes (a BDAT chunk) into ``transcript.bodies``."""
    return ReadBytes(n, timeout=timeout)


def starttls(*, expect_failure: bool = False, timeout: float | None = None) -> StartTLS:
    """Server-side TLS handshake on the connection; the transcript switches to "tls".
    With ``expect_failure=True`` the handshake must fail (e.g. the client rejects the
    certificate); the reason goes to ``transcript.tls_error``."""
    return StartTLS(expect_failure=expect_failure, timeout=timeout)


def sleep(seconds: float) -> Sleep:
    """``trio.sleep`` (instant under an autojumping MockClock)."""
    return Sleep(seconds)


def dribble(data: bytes | str, every: float = 10.0, *, chunk: int = 1) -> Dribble:
    """Write *data* *chunk* bytes at a time, sleeping *every* seconds in between."""
    return Dribble(_b(data), every=every, chunk=chunk)


def close() -> Close:
    """Close the connection gracefully (TLS close_notify, then FIN)."""
    return Close()


def abort() -> Abort:
    """Close the connection abruptly (RST on TCP; no close_notify)."""
    return Abort()


def truncate() -> Truncate:
    """Close the transport under the TLS layer (FIN, no close_notify): a truncation, as
    when a server or an attacker cuts a TLS session short. Without TLS it is ``close()``."""
    return Truncate()


def expect_eof(
    *,
    timeout: float | None = None,
    allow_quit: bool = True,
    quit_reply: bytes | None = QUIT_REPLY,
) -> ExpectEOF:
    """The client must close the connection within *timeout*. The only bytes it may
    write first are ``QUIT\\r\\n`` (if *allow_quit*), which gets *quit_reply*. After a
    failed ``starttls(expect_failure=True)`` any bytes (TLS alerts) are accepted."""
    return ExpectEOF(timeout=timeout, allow_quit=allow_quit, quit_reply=quit_reply)


def never_read() -> NeverRead:
    """Stop reading for good (the script counts as complete); the client's writes back
    up once the transport's buffers are full."""
    return NeverRead()


def expect_nothing(seconds: float) -> ExpectNothing:
    """The client must not write anything for *seconds* (closing is allowed)."""
    return ExpectNothing(seconds)


# -- players ------------------------------------------------------------------------------


def _script_listing(script: Sequence[Step], at: int | None) -> str:
    return "\n".join(
        f"  {'->' if i == at else '  '} {i}: {step!r}" for i, step in enumerate(script)
    )


async def _run_script(conn: _Conn, script: Sequence[Step]) -> None:
    for i, step in enumerate(script):
        conn.step_index = i
        try:
            await step.run(conn)
        except _Fail as exc:
            raise ScriptError(
                f"scripted server: step {i} {step!r} failed:\n  {exc}\n"
                f"unconsumed client bytes: {_short(bytes(conn.buf))}\n"
                f"script:\n{_script_listing(script, i)}\n"
                f"transcript:\n{conn.t.render()}",
                transcript=conn.t,
                step_index=i,
            ) from None
    conn.step_index = len(script)


async def play(
    stream: trio.abc.Stream,
    script: Sequence[Step],
    *,
    transcript: Transcript,
    server_ssl_context: ssl.SSLContext | None = None,
    recv_timeout: float = DEFAULT_RECV_TIMEOUT,
    finished: trio.Event | None = None,
) -> None:
    """Play *script* as the server side of *stream*, recording into *transcript*.

    Raises :class:`ScriptError` on the first deviation. Does not close *stream* (unless
    the script does). *finished* is set when the script completes (or reaches
    ``never_read()``).
    """
    event = finished if finished is not None else trio.Event()
    conn = _Conn(stream, transcript, server_ssl_context, recv_timeout, event)
    await _run_script(conn, script)
    event.set()


class ScriptedServer:
    """Handle returned by :func:`scripted_server`.

    ``host``/``port``: where to connect. ``transcript``: the first connection's
    :class:`Transcript`. ``connections``: how many connections were accepted (extra ones
    are closed at once, so ``connections == 1`` shows the client did not retry).
    ``failure``: the :class:`ScriptError`, once the script failed.
    """

    def __init__(self, host: str, port: int, script: Sequence[Step]) -> None:
        self.host = host
        self.port = port
        self.script = list(script)
        self.transcript = Transcript()
        self.connections = 0
        self.failure: ScriptError | None = None
        self.finished = trio.Event()
        self._conn: _Conn | None = None

    def __repr__(self) -> str:
        return f"<ScriptedServer {self.host}:{self.port} connections={self.connections}>"

    def _incomplete_error(self, finish_timeout: float) -> ScriptError:
        if self._conn is None:
            what = "no client connected"
            at = None
        else:
            at = self._conn.step_index
            what = f"still at step {at} {self.script[at]!r}"
        return ScriptError(
            f"scripted server: the script did not complete within {finish_timeout}s "
            f"after the test body finished: {what}\n"
            f"script:\n{_script_listing(self.script, at)}\n"
            f"transcript:\n{self.transcript.render()}",
            transcript=self.transcript,
            step_index=at,
        )

    async def _handle(
        self,
        stream: trio.abc.Stream,
        server_ssl_context: ssl.SSLContext | None,
        recv_timeout: float,
    ) -> None:
        conn = _Conn(stream, self.transcript, server_ssl_context, recv_timeout, self.finished)
        self._conn = conn
        try:
            try:
                await _run_script(conn, self.script)
            except ScriptError as exc:
                self.failure = exc
                # Make sure the client notices instead of waiting for the next reply.
                await conn.close(forceful=True)
            else:
                if not conn.closed:
                    await conn.close(forceful=False)
            self.finished.set()
        finally:
            if not conn.closed:
                with trio.move_on_after(1, shield=True):
                    await trio.aclose_forcefully(conn.tap.inner)

    async def _serve(
        self,
        listener: trio.SocketListener,
        server_ssl_context: ssl.SSLContext | None,
        recv_timeout: float,
        nursery: trio.Nursery,
    ) -> None:
        async with listener:
            first = await listener.accept()
            self.connections += 1
            nursery.start_soon(self._handle, first, server_ssl_context, recv_timeout)
            while True:
                extra = await listener.accept()
                self.connections += 1
                self.transcript.note(f"extra connection #{self.connections} closed at once")
                await trio.aclose_forcefully(extra)


@contextlib.asynccontextmanager
async def scripted_server(
    script: Sequence[Step],
    *,
    server_ssl_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    recv_timeout: float = DEFAULT_RECV_TIMEOUT,
    finish_timeout: float = 5.0,
    recv_buffer_size: int | None = None,
) -> AsyncIterator[ScriptedServer]:
    """Serve *script* on ``127.0.0.1:<free port>`` for the duration of the block.

    ``implicit_tls=True`` prepends ``starttls()`` (TLS handshake before the greeting;
    for an implicit-TLS handshake that must fail, put ``starttls(expect_failure=True)``
    first yourself). ``recv_buffer_size`` sets ``SO_RCVBUF`` on the accepted socket
    (small values make ``never_read()`` back the client up quickly).

    When the block ends normally, waits up to *finish_timeout* for the script to
    complete, then raises its :class:`ScriptError` (or one saying it did not complete).
    If the block raised, that exception propagates, chained as the cause of the
    script's failure if the script failed too.
    """
    if implicit_tls:
        script = [starttls(), *script]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    if recv_buffer_size is not None:
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer_size)
    host, port = listener.socket.getsockname()[:2]
    server = ScriptedServer(host, port, script)

    async def serve(nursery: trio.Nursery) -> None:
        await server._serve(listener, server_ssl_context, recv_timeout, nursery)

    async with _supervised(server, serve, finish_timeout):
        yield server


@contextlib.asynccontextmanager
async def scripted_stream(
    script: Sequence[Step],
    *,
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = memory_stream_pair,
    server_ssl_context: ssl.SSLContext | None = None,
    recv_timeout: float = DEFAULT_RECV_TIMEOUT,
    finish_timeout: float = 5.0,
) -> AsyncIterator[tuple[trio.abc.Stream, ScriptedServer]]:
    """Like :func:`scripted_server`, over an in-memory stream pair instead of TCP.

    Yields ``(client_stream, server)``: hand ``client_stream`` to the client under test
    (e.g. ``triomail.start_session``); ``server`` has the transcript and the failure.
    *pair* makes the two ends: :func:`trio.testing.memory_stream_pair` (default, buffers
    without limit), :func:`trio.testing.lockstep_stream_pair` (no buffer: every
    ``receive_some`` returns bytes of one ``send_all`` only, so ``transcript.writes`` are
    exactly the client's writes) or :func:`bounded_stream_pair` (small windows). With a
    MockClock every wait is virtual. The script ends as with :func:`scripted_server`:
    the server end is closed gracefully when it completes.
    """
    client_stream, server_stream = pair()
    server = ScriptedServer("memory", 0, script)

    async def serve(nursery: trio.Nursery) -> None:
        server.connections = 1
        await server._handle(server_stream, server_ssl_context, recv_timeout)

    async with _supervised(server, serve, finish_timeout):
        yield client_stream, server


@contextlib.asynccontextmanager
async def _supervised(
    server: ScriptedServer,
    serve: Callable[[trio.Nursery], Awaitable[None]],
    finish_timeout: float,
) -> AsyncIterator[None]:
    """Run *serve* alongside the ``async with`` body; report the script's failure."""
    body_exc: BaseException | None = None
    incomplete = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, nursery)
        try:
            yield
        except GeneratorExit:
            raise
        except BaseException as exc:
            body_exc = exc
        else:
            with trio.move_on_after(finish_timeout if finish_timeout >= 0 else math.inf):
                await server.finished.wait()
            incomplete = not server.finished.is_set()
        nursery.cancel_scope.cancel()
    if body_exc is not None:
        if server.failure is not None and isinstance(body_exc, Exception):
            raise server.failure from body_exc
        raise body_exc
    if server.failure is not None:
        raise server.failure
    if incomplete:
        raise server._incomplete_error(finish_timeout)


# -- a transport with small windows -------------------------------------------------------


class _BoundedPipe:
    """One direction of :func:`bounded_stream_pair`: at most *capacity* bytes in flight."""

    def __init__(self, capacity: int, max_read: int | None, read_delay: float) -> None:
        self.capacity = capacity
        self.max_read = max_read
        self.read_delay = read_delay
        self.buffer = bytearray()
        self.sender_closed = False
        self.receiver_closed = False
        self.lot = trio.lowlevel.ParkingLot()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        await trio.lowlevel.checkpoint()
        while True:
            if self.sender_closed:
                raise trio.ClosedResourceError("send side closed")
            if self.receiver_closed:
                raise trio.BrokenResourceError("the other end closed")
            room = self.capacity - len(self.buffer)
            if room > 0 and view:
                self.buffer += view[:room]
                view = view[room:]
                self.lot.unpark_all()
            if not view:
                return
            await self.lot.park()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.read_delay:
            await trio.sleep(self.read_delay)
        else:
            await trio.lowlevel.checkpoint()
        while not self.buffer:
            if self.receiver_closed:
                raise trio.ClosedResourceError("receive side closed")
            if self.sender_closed:
                return b""
            await self.lot.park()
        n = min(x for x in (max_bytes, self.max_read, len(self.buffer)) if x is not None)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.lot.unpark_all()
        return data


class _PipeSendStream(trio.abc.SendStream):
    def __init__(self, pipe: _BoundedPipe) -> None:
        self.pipe = pipe

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.pipe.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.pipe.sender_closed = True
        self.pipe.lot.unpark_all()
        await trio.lowlevel.checkpoint()


class _PipeReceiveStream(trio.abc.ReceiveStream):
    def __init__(self, pipe: _BoundedPipe) -> None:
        self.pipe = pipe

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.pipe.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.pipe.receiver_closed = True
        self.pipe.buffer.clear()
        self.pipe.lot.unpark_all()
        await trio.lowlevel.checkpoint()


def bounded_stream_pair(
    capacity: int = 4096,
    *,
    server_max_read: int | None = None,
    server_read_delay: float = 0.0,
) -> tuple[
    trio.StapledStream[_PipeSendStream, _PipeReceiveStream],
    trio.StapledStream[_PipeSendStream, _PipeReceiveStream],
]:
    """``(client, server)`` streams whose each direction holds at most *capacity* bytes,
    like TCP with small windows: ``send_all`` blocks while the peer does not read, so a
    client that writes without reading can deadlock against a server that answers each
    line. The server reads at most *server_max_read* bytes per ``receive_some``, after
    *server_read_delay* seconds (a slow reader)."""
    up = _BoundedPipe(capacity, server_max_read, server_read_delay)
    down = _BoundedPipe(capacity, None, 0.0)
    client = trio.StapledStream(_PipeSendStream(up), _PipeReceiveStream(down))
    server = trio.StapledStream(_PipeSendStream(down), _PipeReceiveStream(up))
    return client, server
