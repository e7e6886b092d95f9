"""One SMTP session: greeting, EHLO, STARTTLS and AUTH, and the SMTPConnection facade.

Theory of operation
-------------------
:meth:`SMTPConnection.start` reads the greeting, sends EHLO, upgrades with STARTTLS when
asked and then forgets everything it learnt in plaintext (R7), and authenticates. With
implicit TLS the handshake comes before the greeting (R8). Security is decided by the
mode the caller chose, never by what the server offers: ``starttls`` without a 220 to
STARTTLS, or with bytes queued behind that 220, ends the connection before AUTH or MAIL
(R3-R6).

Every exchange goes through the :class:`~triomail._client.transport.Transport`, where
errors are mapped and deadlines run (R26); a connection that fails mid-command is broken
and never used again (R24, R27, R40). Sending is delegated to ``lockstep`` (``send``) and
``pipeline`` (``send_many``), drivers over ``_core.transaction``. Refusals and losses are
*values* on the :class:`~triomail.SendResult` (R37); only the caller's own mistakes
raise, before any byte is written (R13).

The module is a few lines over our usual 400 because :class:`SMTPConnection` is the
public facade: its docstrings are the reference for every parameter of ``send`` and
``send_many``, and splitting the class would only scatter them.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Callable, Iterable, Sequence
from email.message import Message

import trio

from .._core.capabilities import Capabilities
from .._core.commands import check_argument, encode_command
from .._core.errors import (
    LocalProtocolError,
    SMTPDisconnected,
    SMTPError,
    SMTPProtocolError,
    SMTPResponseError,
    SMTPSecurityError,
)
from .._core.plan import plan
from .._core.prepare import DSN, PreparedMessage, Signer, prepare
from .._core.reply import Reply
from .._core.results import SendResult
from .._core.sasl import SASLMechanism
from .._core.timeouts import Timeouts
from .._core.transaction import Transaction
from .auth import authenticate, authenticate_with_any, choose
from .batch import Gate
from .lockstep import reset, send_each, send_one
from .options import (
    Pipeline,
    SessionOptions,
    default_ssl_context,
    local_name,
    pipeline_mode,
)
from .pipeline import send_pipelined
from .transport import Transport

__all__ = ["SMTPConnection"]


class SMTPConnection:
    """An open SMTP session. Create it with :func:`connect`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        host: str,
        timeouts: Timeouts = Timeouts(),
        local_hostname: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        name = local_hostname if local_hostname is not None else local_name()
        check_argument(name, "local_hostname")
        self._io = Transport(stream, host)
        self._timeouts = timeouts
        self._local_hostname = name
        self._ssl_context = ssl_context
        self.capabilities = Capabilities()
        self.greeting: Reply | None = None
        self.authenticated = False
        self._allow_insecure_auth = False  # R9

    # ---------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        return self._io.host

    @property
    def tls_active(self) -> bool:
        return self._io.phase == "tls"

    @property
    def pipeline(self) -> Pipeline:
        """How :meth:`send_many` pipelines by default: ``"cross"`` until the server
        refuses commands pipelined behind an end of data, ``"within"`` from then on.
        A pool sets it on a new connection to a server known to refuse."""
        return self._io.pipeline

    @pipeline.setter
    def pipeline(self, mode: Pipeline) -> None:
        self._io.set_pipeline(pipeline_mode(mode))

    @property
    def is_usable(self) -> bool:
        """False once the connection was closed, broken or told 421."""
        return self._io.usable

    @property
    def messages_sent(self) -> int:
        """Messages the server accepted (a 2xx to their end of data) on this connection."""
        return self._io.messages_sent

    @property
    def transactions(self) -> int:
        """Transactions started (MAIL written) on this connection."""
        return self._io.transactions

    @property
    def awaiting_final_reply(self) -> bool:
        """True from a final dot until its reply: a loss now is an unknown outcome (R37)."""
        return self._io.awaiting_final_reply

    def __repr__(self) -> str:
        io = self._io
        state = "closed" if io.closed else (f"broken: {io.broken}" if io.broken else "open")
        return f"<SMTPConnection {io.host} {io.phase} {state} sent={io.messages_sent}>"

    # ------------------------------------------------------------------ closing

    async def abort(self) -> None:
        """Close the stream at once, without QUIT (safe in a cancelled scope)."""
        await self._io.abort()

    async def aclose(self) -> None:
        """QUIT under a shielded, short deadline, then close (R11, R48).

        A connection that broke mid-command, or was told 421, is closed without QUIT.
        """
        io = self._io
        if io.closed:
            return
        if io.broken is not None:
            await io.abort()
            return
        seconds = self._timeouts.quit
        with trio.move_on_after(seconds, shield=True) as scope:
            # A server may close right after 221, TLS without close_notify (R11); a
            # strange reply to QUIT (R47) changes nothing either.
            with contextlib.suppress(SMTPError):
                await io.command(b"QUIT\r\n", "QUIT", seconds, alone=False)
            await io.close()
        if scope.cancelled_caught:
            await io.abort()

    def is_stale(self) -> bool:
        """True if an idle connection has unsolicited bytes or EOF pending (R24, R45).

        A pooled connection that got a 421 or was closed while idle must not be reused;
        this peeks at the socket without blocking.
        """
        return self._io.is_stale()

    # ----------------------------------------------------------------- handshake

    async def start(self, options: SessionOptions) -> None:
        """Greeting, EHLO, STARTTLS and AUTH as ``options`` say (``options.tls`` set).

        :func:`~triomail.start_session` calls this; a pool that opens its own streams
        may too. On failure the caller closes the connection.
        """
        t = self._timeouts
        io = self._io
        self._allow_insecure_auth = options.allow_insecure_auth
        if options.tls == "implicit":
            await io.start_tls(self._tls_context(), t.tls_handshake)  # R8: before the greeting
        greeting = await io.receive("greeting", t.greeting)
        io.check_drained("greeting")  # R25: nothing may precede our first command
        if greeting.code != 220:
            if greeting.code == 554 or greeting.is_transient:
                # §3.1: 554 means no service here; QUIT and report (R25).
                if greeting.code != 421:
                    await self.aclose()
                raise SMTPResponseError("greeting", greeting)
            io.broken = "unexpected greeting"
            raise SMTPProtocolError(f"unexpected greeting: {greeting}")
        self.greeting = greeting
        self.capabilities = await _ehlo(io, self._local_hostname, t.ehlo)
        if options.tls == "starttls":
            await self._starttls()
        if options.username is not None:
            await self._login(options)

    def _tls_context(self) -> ssl.SSLContext:
        # Built only when TLS is used: loading the CA store costs milliseconds.
        return self._ssl_context or default_ssl_context()

    async def _starttls(self) -> None:
        io = self._io
        t = self._timeouts
        if not self.capabilities.starttls:
            # R3/R4: STARTTLS required but not offered; stop before AUTH or MAIL.
            io.broken = "STARTTLS not offered"
            raise SMTPSecurityError(
                "tls='starttls' but the server does not offer STARTTLS"
                + ("" if self.capabilities.esmtp else " (it refused EHLO)")
                + "; refusing to continue in plaintext"
            )
        # R5: STARTTLS is the last command of any group; wait for its reply.
        reply = await io.command(b"STARTTLS\r\n", "STARTTLS", t.starttls, alone=False)
        if reply.code != 220:
            io.broken = "STARTTLS refused"
            raise SMTPSecurityError(f"STARTTLS refused: {reply}; refusing to continue in plaintext")
        if io.parser.has_unprocessed:
            # R6: anything queued behind the 220 was injected before TLS.
            io.broken = "data after STARTTLS"
            raise SMTPSecurityError(
                "bytes received after the 220 to STARTTLS (response injection); aborted"
            )
        await io.start_tls(self._tls_context(), t.tls_handshake)
        # R7: forget all that was learnt in plaintext, greeting included (R12), and ask again.
        self.capabilities = Capabilities()
        self.greeting = None
        self.capabilities = await _ehlo(io, self._local_hostname, t.ehlo)

    async def _login(self, options: SessionOptions) -> None:
        self._check_auth_allowed()
        mechanisms = await choose(self.capabilities, self.tls_active, options)
        await authenticate_with_any(self._io, mechanisms, self._timeouts.auth)
        self.authenticated = True

    def _check_auth_allowed(self) -> None:
        if self.authenticated:
            raise LocalProtocolError("already authenticated (RFC 4954 §4: AUTH only once)")
        if not self.tls_active and not self._allow_insecure_auth:
            # R9: credentials only over TLS.
            raise SMTPSecurityError(
                "refusing to send credentials without TLS (allow_insecure_auth=True to override)"
            )

    async def auth(self, mechanism: SASLMechanism) -> None:
        """Run one AUTH exchange (RFC 4954); raises :class:`SMTPAuthenticationError`.

        Refused without TLS unless the session was opened with ``allow_insecure_auth``
        (R9). The exchange is redacted in the debug log (R36).
        """
        self._check_auth_allowed()
        await authenticate(self._io, mechanism, self._timeouts.auth)
        self.authenticated = True

    # --------------------------------------------------------------- transactions

    async def noop(self) -> Reply:
        return await self._io.command(b"NOOP\r\n", "NOOP", self._timeouts.noop)

    async def rset(self) -> Reply:
        return await reset(self._io, self._timeouts.rset)

    def prepare(
        self,
        message: Message | bytes | str,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        dkim: Signer | None = None,
    ) -> PreparedMessage:
        """Check and encode ``message`` for this server (no I/O): :func:`~triomail.prepare`
        with what the server offers (SMTPUTF8, 8BITMIME); ``dkim`` signs it."""
        caps = self.capabilities
        return prepare(
            message,
            sender=sender,
            recipients=recipients,
            smtputf8=caps.smtputf8,
            eight_bit=caps.eightbitmime or caps.smtputf8,
            dkim=dkim,
        )

    async def send(
        self,
        message: Message | bytes | str | PreparedMessage,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        dsn: DSN | None = None,
        requiretls: bool = False,
    ) -> SendResult:
        """Send one message; every recipient's outcome is on the result (R37).

        ``message`` is an ``EmailMessage`` (envelope from its headers unless given) or
        raw ``bytes``/``str`` with ``sender`` and ``recipients``. Raises only for the
        caller's mistakes (:class:`LocalProtocolError`, before any byte is written) and
        for a connection that is already closed (:class:`SMTPDisconnected`).
        """
        self._io.check_usable()
        prepared = (
            message
            if isinstance(message, PreparedMessage)
            else self.prepare(message, sender=sender, recipients=recipients)
        )
        return await self._send(prepared, dsn=dsn, requiretls=requiretls, pipelining=True)

    async def _send(
        self, prepared: PreparedMessage, *, dsn: DSN | None, requiretls: bool, pipelining: bool
    ) -> SendResult:
        """:meth:`send`, with ``pipelining=False`` never writing two commands at once."""
        io = self._io
        io.check_usable()
        caps = self.capabilities
        planned = plan(prepared, caps, tls_active=self.tls_active, dsn=dsn, requiretls=requiretls)
        if isinstance(planned, SendResult):
            return planned
        if io.is_stale():
            await io.abort()
            raise SMTPDisconnected("server closed or wrote to the connection while it was idle")
        txn = Transaction(0, prepared, *planned)
        return await send_one(io, self._timeouts, txn, pipelining=pipelining and caps.pipelining)

    async def send_many(
        self,
        messages: Iterable[PreparedMessage],
        *,
        chunking: bool | None = None,
        dsn: DSN | None = None,
        requiretls: bool = False,
        on_result: Callable[[int, SendResult], None] | None = None,
        pipeline: Pipeline | None = None,
        gate: Gate | None = None,
    ) -> list[SendResult]:
        """Send prepared messages; one result per message, in order.

        With PIPELINING the end of data of one message shares a write with the envelope
        of the next (about one round trip a message); with CHUNKING (unless
        ``chunking=False``) whole ``BDAT`` transactions are pipelined in bounded windows;
        ``chunking=True`` requires CHUNKING (:class:`LocalProtocolError` if not
        advertised). Without PIPELINING this is :meth:`send` per message. Each result is
        what :meth:`send` would report; ``on_result(index, result)`` is called as each
        is known (useful if the batch may be cancelled).

        ``pipeline`` (default :attr:`pipeline`, the fastest mode the server accepts):
        ``"cross"`` writes the next envelope behind an end of data; if the server
        refuses that (Haraka answers ``503``), those messages were never started and
        are sent again on this connection at once, in ``"within"`` mode from then on
        (it waits for the end-of-data reply: two round trips a message). ``"off"``
        sends each command alone.

        A list is checked whole before the first byte is written, so this raises only
        what ``send`` raises before writing: :class:`LocalProtocolError` for a message no
        server could take, and :class:`SMTPDisconnected` if the connection is closed or
        went stale while idle. Any other iterable (a generator preparing each message,
        say) is consumed lazily, each message planned just before it is written, with no
        pause between messages; a message then found unsendable gets a failed result
        instead of an exception, and if the connection is lost the rest of the iterable
        is consumed into "never started" results. An exception raised by the iterable
        itself ends the batch mid-way: the connection is left unusable and the results
        so far reach only ``on_result``.

        ``gate(message)``, if given, is called before each message's content is
        written, the part that can deliver it (a journal commits the message there, see
        docs/pool.md); it returns ``None`` to let it go at once, or an awaitable to
        await first. If it raises, that message is not sent and its result says why.
        In ``"cross"`` mode its envelope is already out and answered by 354, so the
        batch stops there: the connection is closed (the server discards that
        transaction) and the messages not answered get the results of a lost
        connection.
        """
        io = self._io
        io.check_usable()
        caps = self.capabilities
        if chunking and not caps.chunking:
            raise LocalProtocolError("chunking=True but the server does not advertise CHUNKING")
        mode = io.pipeline if pipeline is None else pipeline_mode(pipeline)
        if not caps.pipelining or mode != "cross":
            within = mode == "within" and caps.pipelining
            send = functools.partial(self._send, dsn=dsn, requiretls=requiretls, pipelining=within)
            # Each group's replies waited for: no delayed ACK for them (transport).
            io.ack_each_read(within or io.pipeline != "cross")
            try:
                return await send_each(io, send, messages, on_result, gate)
            finally:
                io.ack_each_read(io.pipeline != "cross")
        return await send_pipelined(
            io,
            self._timeouts,
            caps,
            messages,
            tls_active=self.tls_active,
            chunking=chunking,
            dsn=dsn,
            requiretls=requiretls,
            on_result=on_result,
            gate=gate,
        )


async def _ehlo(io: Transport, name: str, seconds: float) -> Capabilities:
    """EHLO, or HELO if the server has no ESMTP (RFC 5321 §4.1.4, R4); what it offers."""
    reply = await io.command(encode_command("EHLO", name), "EHLO", seconds)
    if reply.code == 250:
        return Capabilities.from_ehlo(reply)
    if reply.code in (500, 501, 502, 504, 550):
        # §4.1.4: fall back to HELO; this server has no extensions at all (R4).
        reply = await io.command(encode_command("HELO", name), "HELO", seconds)
        if reply.code == 250:
            return Capabilities.helo_only()
    # 220/221/354/421/530 to EHLO and the like: close, never crash (R47).
    io.broken = "EHLO refused"
    raise SMTPResponseError("EHLO", reply)
