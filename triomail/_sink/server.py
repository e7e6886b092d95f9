"""The capture server: a real, strict, bounded SMTP server for tests and development.

Theory of operation
===================

``async with SMTPSink(...) as sink`` opens loopback listeners and a nursery inside the
caller's trio run; leaving the block ends every session. Nothing here imports the
triomail client: the sink must be able to judge the client, so it shares no code.

Each accepted connection gets one :class:`~triomail._sink.session.Session`, driven
by one task. The session is only the I/O half: the SMTP conversation itself is the
sans-IO state machine in :mod:`triomail._sink.commands`, which takes the bytes read
and says what to write and do next. The package, along the data flow:

``server`` (this module: listeners, TLS certificate, storage) → ``session`` (one
connection's reads, writes and timeouts) → ``commands`` (the protocol) → ``syntax``
(grammar and content checks); ``faults`` holds the fault rules, ``config`` the
settings every session shares, ``message`` what is captured, ``cli`` the command.

- **Input** is a single buffer. Commands are taken from it line by line; only when
  no complete line is left are the queued replies written and more read. Pipelined
  commands (RFC 2920) thus get ordered replies in one write, and a client that sent
  more than it may before a reply it had to wait for (after EHLO, DATA, STARTTLS,
  ..., or anything at all without PIPELINING) is caught with ``554 5.5.0``,
  because those bytes are already in the buffer.
- **DATA** content is scanned for ``<CRLF>.<CRLF>`` only (RFC 5321 §4.1.1.4), so
  the smuggling endings ``<LF>.<LF>``, ``<CR>.<CR>``, ... are just content, and
  content with a bare CR or LF is then refused with ``550 5.5.2`` as Postfix's
  ``smtpd_forbid_bare_newline`` does. Dot-stuffing is removed per RFC 5321 §4.5.2.
  **BDAT** chunks are read by octet count (RFC 3030) and concatenated.
- **STARTTLS** (RFC 3207) wraps the same socket in a server-side
  :class:`trio.SSLStream`; input buffered before the handshake is an error, and
  everything learned from the client (EHLO, AUTH) is forgotten afterwards.
- **Limits**: line length, message size (also advertised with SIZE), recipients
  per transaction, concurrent connections, stored messages and idle time are all
  bounded; oversized DATA is counted, not stored.
- **Faults** (:class:`~triomail._sink.faults.Fault`) are looked up per command first:
  a rule can replace, delay or drop any reply.
- **Delivery**: the state machine builds a :class:`CapturedMessage`; the sink appends
  it to ``messages``, may write ``<dir>/<stamp>-<n>.eml`` and calls ``on_message``:
  synchronous and small, so thousands of messages a second stay cheap.

The certificate for STARTTLS and implicit TLS is a throwaway one from ``trustme``
(imported only when TLS is wanted); :meth:`SMTPSink.client_ssl_context` returns a
client context that trusts it and nothing else.

The module is a few lines over our usual 400 because :class:`SMTPSink` is the public
face of the testing API and documents each of its options where it takes them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from .config import SinkConfig
from .faults import Fault, FaultBook
from .message import CapturedMessage
from .session import Session

if TYPE_CHECKING:
    import trustme

__all__ = ["SMTPSink"]

_MECHANISMS = ("PLAIN", "LOGIN")


class SMTPSink:
    """An SMTP server that captures what it receives; use as ``async with``.

    All arguments are keyword-only.

    Args:
        host, port: where to listen; port 0 (the default) picks a free port.
        hostname: the name the server gives in its greeting and replies.
        tls: offer STARTTLS. ``None`` (default) means yes when ``ssl_context`` is
            given or ``trustme`` (``triomail[testing]``) is installed to make a
            throwaway certificate.
        implicit_tls: speak TLS from the first byte (RFC 8314) instead of STARTTLS.
        ssl_context: a server context to use instead of the throwaway certificate.
        auth: user name to password; enables AUTH PLAIN and LOGIN (RFC 4954).
        auth_mechanisms: which of ``PLAIN`` and ``LOGIN`` to offer.
        allow_insecure_auth: offer AUTH before TLS (otherwise ``530 5.7.0``).
        require_tls, require_auth: refuse MAIL (``530 5.7.0``) until TLS / AUTH.
        faults: fault-injection rules, see :class:`~triomail.testing.Fault`.
        hide_extensions: EHLO keywords not to advertise (e.g. ``"PIPELINING"``);
            the sink then also refuses to be used as if they were.
        extra_extensions: EHLO lines to advertise in addition (not implemented).
        max_line_length: longest command line in octets incl. CRLF (``500 5.5.6``).
        max_message_size: advertised with SIZE; larger messages get ``552 5.3.4``.
        max_recipients: per transaction; more get ``452 4.5.3``.
        max_connections: concurrent connections; more get ``421`` at connect.
        idle_timeout: seconds without input before ``421 4.4.2`` and close
            (None or 0: never).
        messages_per_connection: after this many messages in one connection the
            next MAIL gets ``421 4.7.0`` and the connection is closed.
        strict: also reject NUL, undeclared 8-bit data, message lines over 1000
            octets and unstuffed leading dots. Bare CR/LF, sequence and syntax
            errors are always rejected.
        refuse_pipelined_after_data: Haraka's hardening: ``503 5.5.0`` to every
            command pipelined behind an end of data (``Fault(".",
            refuse_pipelined=True)`` for one).
        forbid_unauth_pipelining: Postfix's parameter (default: as ``strict``): input
            pipelined where RFC 2920 does not allow it (behind EHLO, DATA, NOOP, ...,
            or without PIPELINING) gets ``554 5.5.0`` and a close (``Fault(command,
            forbid_pipelined=True)`` for any command).
        out_dir: also write each message as ``.eml`` (the exact ``data``) here.
        store: keep messages in :attr:`messages`.
        max_stored: with ``store``, at most this many; then ``452 4.3.1``.
        on_message: called with each accepted message, inside the trio run; an
            exception it raises stops the sink.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "localhost",
        tls: bool | None = None,
        implicit_tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        auth: Mapping[str, str] | None = None,
        auth_mechanisms: Iterable[str] = _MECHANISMS,
        allow_insecure_auth: bool = False,
        require_tls: bool = False,
        require_auth: bool = False,
        faults: Iterable[Fault] = (),
        hide_extensions: Iterable[str] = (),
        extra_extensions: Iterable[str] = (),
        max_line_length: int = 2048,
        max_message_size: int = 10 * 1024 * 1024,
        max_recipients: int = 100,
        max_connections: int = 64,
        idle_timeout: float | None = 300.0,
        messages_per_connection: int | None = None,
        strict: bool = True,
        refuse_pipelined_after_data: bool = False,
        forbid_unauth_pipelining: bool | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        store: bool = True,
        max_stored: int | None = 10_000,
        on_message: Callable[[CapturedMessage], object] | None = None,
    ) -> None:
        if tls is None:
            tls = ssl_context is not None or _trustme_installed()
        if implicit_tls and not tls:
            raise ValueError("implicit_tls needs tls")
        mechanisms = tuple(m.upper() for m in auth_mechanisms)
        if not set(mechanisms) <= set(_MECHANISMS) or not mechanisms:
            raise ValueError(f"auth_mechanisms must be taken from {_MECHANISMS}")
        if require_tls and not tls:
            raise ValueError("require_tls needs tls")
        if require_auth and not auth:
            raise ValueError("require_auth needs auth")
        if auth and not tls and not allow_insecure_auth:
            raise ValueError("auth without TLS needs allow_insecure_auth=True")
        if max_line_length < 512:  # RFC 5321 §4.5.3.1.4
            raise ValueError("max_line_length must be at least 512")
        if max_message_size < 1 or max_recipients < 1 or max_connections < 1:
            raise ValueError("limits must be positive")
        self._ca: trustme.CA | None = None
        if tls and ssl_context is None:
            self._ca, ssl_context = _throwaway_certificate(host)
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        directory = None if out_dir is None else Path(out_dir)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self._config = SinkConfig(
            hostname=hostname,
            tls_context=ssl_context if tls else None,
            implicit_tls=implicit_tls,
            auth=dict(auth or {}),
            auth_mechanisms=mechanisms,
            allow_insecure_auth=allow_insecure_auth,
            require_tls=require_tls,
            require_auth=require_auth,
            hide_extensions=frozenset(name.upper() for name in hide_extensions),
            extra_extensions=tuple(extra_extensions),
            max_line_length=max_line_length,
            max_message_size=max_message_size,
            max_recipients=max_recipients,
            max_connections=max_connections,
            idle_timeout=idle_timeout or 0.0,
            messages_per_connection=messages_per_connection,
            strict=strict,
            refuse_pipelined_after_data=refuse_pipelined_after_data,
            forbid_unauth_pipelining=forbid_unauth_pipelining,
            out_dir=directory,
            store=store,
            max_stored=max_stored,
            on_message=on_message,
        )
        self._faults = FaultBook(tuple(faults))
        self._messages: list[CapturedMessage] = []
        self._received = 0
        self._serial = 0
        self._active = 0
        self._arrived = trio.Event()
        self._stamp = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self._cm: AbstractAsyncContextManager[SMTPSink] | None = None

    # --- context manager -----------------------------------------------------------

    async def __aenter__(self) -> SMTPSink:
        if self._cm is not None:
            raise RuntimeError("an SMTPSink can only be entered once")
        self._cm = self._serving()
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[SMTPSink]:
        listeners = await trio.open_tcp_listeners(self._requested_port, host=self._host)
        if self._requested_port == 0:
            # A name with several addresses would get one random port each.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self._port = listeners[0].socket.getsockname()[1]
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._handle, listeners)
                try:
                    yield self
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The caller's own exception comes back wrapped by our nursery; give it
            # back unwrapped so `pytest.raises` and `except` work as written.
            if body_error is not None and list(group.exceptions) == [body_error]:
                raise body_error from None
            raise

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._active >= self._config.max_connections:
            with trio.move_on_after(1.0):
                try:
                    line = f"421 {self._config.hostname} Error: too many connections\r\n"
                    await stream.send_all(line.encode())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return  # trio.serve_listeners closes the stream
        self._active += 1
        try:
            session = Session(stream, _peer(stream), self._config, self._faults, self._deliver)
            await session.run()
        finally:
            self._active -= 1

    def _deliver(self, message: CapturedMessage) -> str | None:
        s = self._config
        if s.store and s.max_stored is not None and len(self._messages) >= s.max_stored:
            return None
        self._serial += 1
        self._received += 1
        if s.store:
            self._messages.append(message)
        if s.out_dir is not None:
            # Synchronous on purpose: a small write into the page cache costs less
            # than a round trip to a worker thread, and keeps arrival order.
            path = s.out_dir / f"{self._stamp}-{self._serial:06d}.eml"
            with open(path, "xb") as file:
                file.write(message.data)
        if s.on_message is not None:
            s.on_message(message)
        self._arrived.set()
        self._arrived = trio.Event()
        return f"{self._stamp[-6:].upper()}{self._serial:06X}"

    # --- public API ----------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the sink listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The bound port (available once entered)."""
        if self._port is None:
            raise RuntimeError("the sink is not running yet; use `async with SMTPSink() as sink`")
        return self._port

    @property
    def messages(self) -> list[CapturedMessage]:
        """Messages accepted so far, in order (the live list; see :meth:`clear`)."""
        return self._messages

    @property
    def received(self) -> int:
        """How many messages were accepted since start or :meth:`clear`."""
        return self._received

    @property
    def ca(self) -> trustme.CA | None:
        """The throwaway certificate authority, or None without generated TLS."""
        return self._ca

    @property
    def active_connections(self) -> int:
        """Connections currently open."""
        return self._active

    def client_ssl_context(self) -> ssl.SSLContext:
        """A new client context (verification on) that trusts the sink's certificate."""
        if self._ca is None:
            if self._config.tls_context is not None:
                why = "it serves TLS with the ssl_context it was given"
            elif _trustme_installed():
                why = "TLS is off (tls=False)"
            else:
                why = (
                    "TLS is off because trustme is not installed: "
                    "pip install 'triomail[testing]' (or trustme), or pass tls=False"
                )
            raise RuntimeError(f"this sink has no generated certificate: {why}")
        context = ssl.create_default_context()
        self._ca.configure_trust(context)
        return context

    # A timeout of its own (not only the caller's fail_after): a test that forgot one
    # fails with what arrived instead of hanging.
    async def wait_for_messages(
        self,
        count: int = 1,
        *,
        timeout: float | None = 10.0,  # noqa: ASYNC109
    ) -> list[CapturedMessage]:
        """Wait until ``count`` messages were accepted; return :attr:`messages`.

        After ``timeout`` seconds (None: no limit) raise :exc:`TimeoutError` saying how
        many arrived and which, so a failing test fails instead of hanging.
        """
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while self._received < count:
                await self._arrived.wait()
        if self._received >= count:
            return self._messages
        arrived = ", ".join(f"{m.subject!r} to {m.rcpt_to}" for m in self._messages[-5:])
        raise TimeoutError(
            f"waited {timeout:g} s for {count} message(s); {self._received} arrived"
            + (f" (the last: {arrived})" if arrived else "")
        )

    def clear(self) -> None:
        """Forget the messages received so far (and reset :attr:`received`)."""
        self._messages = []
        self._received = 0

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else "not started"
        return f"<SMTPSink {where} received={self._received} active={self._active}>"


def _trustme_installed() -> bool:
    """True if ``trustme`` (``triomail[testing]``) can make a throwaway certificate."""
    return importlib.util.find_spec("trustme") is not None


def _throwaway_certificate(host: str) -> tuple[trustme.CA, ssl.SSLContext]:
    try:
        import trustme
    except ImportError as exc:  # pragma: no cover - trustme is a test dependency
        raise RuntimeError(
            "TLS in the sink needs trustme: pip install 'triomail[testing]'"
        ) from exc
    names = ["localhost", "127.0.0.1", "::1"]
    if host not in names and host not in ("", "0.0.0.0", "::"):
        names.append(host)
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return ca, context


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("", 0)
    return (str(address[0]), int(address[1]))
