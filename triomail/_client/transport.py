"""The one I/O boundary: the only code that touches the stream or (with .sockets) its socket.

Theory of operation
-------------------
Everything above this module speaks in :class:`~triomail.Reply` values and
:class:`~triomail.SMTPError`; everything below it is trio, :mod:`ssl` and the OS. So:

* **Errors.** Every failed operation goes through :meth:`Transport.failure`, which
  asks the one translation table (``exceptions.map_failure``) and marks the transport
  broken; it is never used again (R24, R27, R40). A failed read, and any cancellation,
  closes the stream at once; a failed *write* leaves it open so the caller can still
  read why the server gave up (R46) and then close it.

* **Deadlines** (R26): every operation runs under a :class:`~.deadline.Deadline` (one
  per command, or one per pipelined batch) and arms it for its stage.

* **The fast path.** A plain TCP stream is driven through its socket: ``os.write`` (no
  deadline is needed for a write the kernel takes at once, the usual case),
  ``wait_readable`` and ``os.read``, with no per-call wrapper and no failed ``recv``
  before each wait. Before waiting, a read first yields to the other tasks and tries
  the socket (*early try*): when the process is busy the reply is there by then and no
  epoll registration or wake-up is needed. When it is not (a slow link), the next
  :data:`EAGER_PAUSE` reads wait for the socket at once. TLS and other streams use the
  stream's own methods.

* **Acknowledging at once** where the client waits for every group (``pipeline``
  ``within`` or ``off``): see :mod:`.sockets`. The cross path asks the kernel nothing.

* **Counters.** Messages delivered, transactions started and whether a final reply is
  owed (R37: a loss now is an unknown outcome) live here, with the stream whose loss
  they describe.

A 421 read here marks the transport broken and closes it (RFC 5321 §3.8, R40).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from .._core.errors import SMTPDisconnected, SMTPError, SMTPProtocolError, SMTPSecurityError
from .._core.parser import ReplyParser
from .._core.reply import Reply
from .deadline import Deadline
from .exceptions import HANDSHAKE, map_failure
from .options import Pipeline
from .sockets import QUICKACK, ack_now, has_pending, tcp_socket
from .transcript import log_in, log_out

__all__ = ["EAGER_PAUSE", "HANDSHAKE", "SALVAGE_SECONDS", "Transport"]

log = logging.getLogger("triomail")

#: Bytes asked of the stream or socket per read.
RECEIVE_SIZE = 65536
#: Reads that wait for the socket at once after an early try found no reply.
EAGER_PAUSE = 32
#: How long to keep reading replies after a write failed (R46).
SALVAGE_SECONDS = 1.0


class Transport:
    """One SMTP stream: bytes out, replies in, deadlines and errors mapped."""

    __slots__ = (
        "awaiting_final_reply",
        "broken",
        "closed",
        "debug",
        "eager_pause",
        "fd",
        "host",
        "in_auth",
        "messages_sent",
        "now",
        "parser",
        "phase",
        "pipeline",
        "quickack",
        "scope",
        "stage",
        "stage_seconds",
        "stream",
        "transactions",
    )

    def __init__(self, stream: trio.abc.Stream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.parser = ReplyParser()
        self.phase = "plain"
        #: How ``send_many`` pipelines on this connection: ``within`` once the server
        #: refused commands behind an end of data (see ``batch``).
        self.pipeline: Pipeline = "cross"
        self.quickack: socket.socket | None = None  # ACK each read at once (header)
        #: Why the transport may not be used again (``None``: it may).
        self.broken: str | None = None
        self.closed = False
        self.in_auth = False  # redact the AUTH exchange in the log (R36)
        self.messages_sent = 0
        self.transactions = 0
        #: True from the final dot until its reply: a loss now is an unknown outcome (R37).
        self.awaiting_final_reply = False
        # See the module header: the socket itself for a plain TCP stream.
        self.fd: int | None = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        self.eager_pause = 0  # reads left that skip the early try of the socket
        self.debug = False  # whether the log shows the conversation (see deadline())
        self.now = trio.lowlevel.current_clock().current_time  # bound once: called per arm
        self.scope: trio.CancelScope | None = None  # the deadline being armed
        self.stage = ""
        self.stage_seconds = 0.0

    @property
    def usable(self) -> bool:
        return not self.closed and self.broken is None

    def check_usable(self) -> None:
        if self.closed or self.broken is not None:
            raise SMTPDisconnected(f"connection is not usable ({self.broken or 'closed'})")

    # ------------------------------------------------------------------ deadlines

    def deadline(self) -> Deadline:
        """``async with transport.deadline():`` runs operations under one deadline."""
        self.debug = log.isEnabledFor(logging.DEBUG)  # asked once per command or batch
        return Deadline(self)

    def arm(self, stage: str, seconds: float) -> None:
        """Point the running deadline at this operation (see the module header)."""
        self.stage = stage
        self.stage_seconds = seconds
        scope = self.scope
        if scope is None:
            raise RuntimeError("I/O outside Transport.deadline()")
        due = self.now() + seconds
        if not due - seconds * 0.01 <= scope.deadline <= due:
            scope.deadline = due

    # ------------------------------------------------------------------ errors

    def failure(self, exc: BaseException, stage: str) -> SMTPError | None:
        """Mark the transport broken; the error to raise for ``exc`` (None: ``exc`` itself)."""
        reason, error = map_failure(exc, stage)
        # A reason already given (a 421, a desync) outlives the error it caused.
        self.broken = reason if error is not None else (self.broken or reason)
        return error

    async def abort(self) -> None:
        """Close the stream at once, without QUIT (safe in a cancelled scope)."""
        self.closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    async def close(self) -> None:
        """Close the stream politely (TLS close_notify); a peer already gone is fine."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()

    # ------------------------------------------------------------------ reads

    async def read(self, stage: str, seconds: float, *, rearm: bool = True) -> Reply:
        """The next reply, whole, armed for ``stage`` (R26); under :meth:`deadline`.

        ``rearm=False`` keeps the deadline of the write before it (one per command).
        More replies may follow when pipelining; :meth:`check_drained` says if any did.
        """
        try:
            reply = self.parser.next_reply()
        except BaseException as exc:
            await self._fail(exc, stage)
        if reply is None:
            return await self.wait_reply(stage, seconds, rearm=rearm)
        if self.debug:
            log_in(self.host, self.phase, reply, self.in_auth)
        if reply.code == 421:
            await self._closing()
        return reply

    async def wait_reply(self, stage: str, seconds: float, *, rearm: bool = True) -> Reply:
        """Read until the parser completes a reply: the caller found none complete in
        its buffer (a pipelined batch asks the parser itself first: no coroutine)."""
        parser = self.parser
        try:
            if self.closed or self.broken is not None:
                self.check_usable()
            if rearm:
                self.arm(stage, seconds)
            fd = self.fd
            # The early try (module header): only for a socket, after a checkpoint.
            eager = self.eager_pause == 0
            if not eager:
                self.eager_pause -= 1
            ready = not eager
            reply = None
            while reply is None:
                if fd is None:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                else:
                    if ready:
                        await trio.lowlevel.wait_readable(fd)
                    else:
                        await trio.lowlevel.checkpoint()
                        ready = True
                    try:
                        data = os.read(fd, RECEIVE_SIZE)
                    except BlockingIOError:
                        if eager:
                            eager = False
                            self.eager_pause = EAGER_PAUSE
                        continue
                if not data:
                    raise trio.ClosedResourceError("server closed the connection")
                parser.feed(data)
                if self.quickack is not None:
                    ack_now(self.quickack)
                reply = parser.next_reply()
        except BaseException as exc:
            await self._fail(exc, stage)
        if self.debug:
            log_in(self.host, self.phase, reply, self.in_auth)
        if reply.code == 421:
            await self._closing()
        return reply

    async def _fail(self, exc: BaseException, stage: str) -> NoReturn:
        """A read failed: mark broken, close, raise the mapped error."""
        error = self.failure(exc, stage)
        await self.abort()
        if error is None:
            raise exc
        raise error from exc

    async def _closing(self) -> None:
        # RFC 5321 §3.8: the server is closing; stop using the connection (R40).
        self.broken = "server sent 421"
        await self.abort()

    def check_drained(self, stage: str) -> None:
        """Raise if the server said more than was asked (R24): the replies are out of step."""
        if self.parser.has_unprocessed:
            self.broken = f"unsolicited data after {stage}"
            raise SMTPProtocolError(
                f"server sent more than one reply to {stage}: {self.parser.unprocessed[:80]!r}"
            )

    def set_pipeline(self, mode: Pipeline) -> None:
        """Record how ``send_many`` pipelines here; outside ``cross``, ACK at once."""
        self.pipeline = mode
        self.ack_each_read(mode != "cross")

    def ack_each_read(self, on: bool) -> None:
        """Ask the kernel to acknowledge each read at once (:mod:`.sockets`), or not."""
        self.quickack = tcp_socket(self.stream) if on and QUICKACK else None

    def is_stale(self) -> bool:
        """True if an idle connection has unsolicited bytes or EOF pending (R24, R45).

        This peeks at the socket without blocking.
        """
        if not self.usable or self.parser.has_unprocessed:
            return True
        sock = tcp_socket(self.stream)
        # Readable while idle means data or EOF arrived unasked.
        return sock is not None and has_pending(sock)

    # ------------------------------------------------------------------ writes

    async def write(self, data: bytes, stage: str, seconds: float, *, rearm: bool = True) -> None:
        """One ``send_all`` armed for ``stage`` (R46); under :meth:`deadline`.

        On a stream error the transport is broken but the stream stays open: the caller
        may read a last reply (:meth:`salvage`), then closes it. Anything else closes.
        """
        sent = self.write_now(data, stage)
        if sent < len(data):
            await self.write_rest(data, sent, stage, seconds, rearm=rearm)

    def write_now(self, data: bytes, stage: str) -> int:
        """As much of ``data`` as the socket takes at once, without waiting: one
        ``os.write``, usually all of it, and then no deadline is needed (0 for a stream
        without the fast path). A pipelined batch calls this first: no coroutine."""
        if self.closed or self.broken is not None:
            self.check_usable()
        if self.debug:
            log_out(self.host, self.phase, data, self.in_auth)
        fd = self.fd
        if fd is None:
            return 0
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            error = self.failure(exc, stage)
            if error is None:
                raise
            raise error from exc

    async def write_rest(
        self, data: bytes, sent: int, stage: str, seconds: float, *, rearm: bool = True
    ) -> None:
        """The rest of a write :meth:`write_now` began, waiting for room under the
        deadline (R46). Errors as for :meth:`write`."""
        try:
            if rearm:
                self.arm(stage, seconds)
            fd = self.fd
            if fd is None:
                await self.stream.send_all(data)
                return
            view = memoryview(data)[sent:]
            while view:
                await trio.lowlevel.wait_writable(fd)
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view) :]
        except BaseException as exc:
            error = self.failure(exc, stage)
            if error is None:
                await self.abort()
                raise
            raise error from exc

    async def salvage(self, read: Callable[[], Awaitable[object]]) -> None:
        """After a failed write, let ``read`` take what the server said before it gave
        up, for at most :data:`SALVAGE_SECONDS` (R46); the transport stays broken."""
        broken, self.broken = self.broken, None
        try:
            with trio.move_on_after(SALVAGE_SECONDS):
                await read()
        except SMTPError:
            pass
        finally:
            self.broken = broken

    # ------------------------------------------------------------------ one exchange

    async def command(
        self, line: bytes, stage: str, seconds: float, *, alone: bool = True
    ) -> Reply:
        """One command, one reply under one deadline. With ``alone`` anything more in the
        buffer is a desync (R24): the connection is closed."""
        async with self.deadline():
            self.arm(stage, seconds)  # one deadline for the line and its reply
            try:
                await self.write(line, stage, seconds, rearm=False)
            except SMTPError:
                await self.abort()
                raise
            reply = await self.read(stage, seconds, rearm=False)
        if alone and self.parser.has_unprocessed:
            await self.abort()
            self.check_drained(stage)
        return reply

    async def receive(self, stage: str, seconds: float) -> Reply:
        """One reply under its own deadline."""
        async with self.deadline():
            return await self.read(stage, seconds)

    async def start_tls(self, context: ssl.SSLContext, seconds: float) -> None:
        """Wrap the stream in TLS and handshake under a deadline (R2, R8, R11).

        Bytes buffered in plaintext are dropped with the old parser; from now on the
        stream, not the raw socket, carries every byte.
        """
        self.check_usable()
        self.parser = ReplyParser()
        ssl_stream = trio.SSLStream(self.stream, context, server_hostname=self.host)
        self.stream = ssl_stream
        self.fd = None
        async with self.deadline():
            self.arm(HANDSHAKE, seconds)
            try:
                await ssl_stream.do_handshake()
            except BaseException as exc:
                error = self.failure(exc, HANDSHAKE)
                await self.abort()
                if error is None:
                    raise
                raise error from exc
        version = ssl_stream.version()
        if version in ("SSLv3", "TLSv1", "TLSv1.1"):  # a caller's context may allow them
            self.broken = "old TLS"
            raise SMTPSecurityError(f"server negotiated {version}; TLS 1.2 or later required")
        self.phase = "tls"
