"""One SMTP connection over a trio stream: the thin I/O layer around the sans-IO core.

Theory of operation
-------------------
:func:`connect` opens TCP (or implicit TLS, handshaking before the greeting, R8), reads
the greeting, sends EHLO, upgrades with STARTTLS when asked and then forgets everything
it learnt in plaintext (R7), and authenticates. Security is decided by the mode the
caller chose, never by what the server offers: ``starttls`` without a 220 to STARTTLS,
or with bytes queued behind that 220, ends the connection before AUTH or MAIL (R3-R6).

Every exchange runs under an absolute deadline (``trio.fail_after``, R26) and through
:meth:`SMTPConnection._io`, which is the one place where trio and ssl errors become
:class:`~triomail.SMTPError`. When anything goes wrong mid-command -- timeout,
cancellation, a broken stream, a protocol violation, a 421 -- the connection is marked
broken and its stream closed at once; it is never used again (R24, R27, R40). The one
exception is a failed body write: the stream stays open for a single short read of the
server's reason (R46) before it is closed.

:meth:`SMTPConnection.send` runs one transaction. SMTP refusals and lost connections are
*values* on the :class:`~triomail.SendResult` (R37): transient before the final dot was
written, unknown after it. Only the caller's own mistakes (a malformed address, a header
with CRLF) raise, and they raise before any byte is written (R13).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import select
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import Message
from functools import partial
from typing import Literal, TypeVar

import trio

from .._core.errors import (
    LocalProtocolError,
    SMTPAuthenticationError,
    SMTPCertificateError,
    SMTPConnectError,
    SMTPDisconnected,
    SMTPError,
    SMTPProtocolError,
    SMTPResponseError,
    SMTPSecurityError,
    SMTPTimeoutError,
)
from .._core.frozen import fast_constructor
from .._core.message import envelope_of, flatten, message_id_of, needs_utf8_headers
from .._core.protocol import (
    Canonical,
    Capabilities,
    canonicalize,
    check_argument,
    dot_stuff,
    encode_command,
    format_path,
    utf8_addr_xtext,
    xtext,
)
from .._core.reply import Reply, ReplyParser
from .._core.results import (
    Outcome,
    RecipientResult,
    SendResult,
    outcome_of,
    transaction_result,
)
from .._core.sasl import SASLMechanism, XOAuth2, choose_mechanism
from .._core.timeouts import Timeouts

__all__ = ["SMTPConnection", "TLSMode", "connect", "default_ssl_context"]

log = logging.getLogger("triomail")

TLSMode = Literal["implicit", "starttls", "none"]
TokenSource = str | Callable[[], Awaitable[str]]

_RECEIVE_SIZE = 65536
# Write at most this much of a message per send_all, each under its own deadline (R46).
_DATA_CHUNK = 256 * 1024
# RCPTs per pipelined write: a bounded group cannot deadlock against a small window (R29).
_RCPT_GROUP = 100
# smtplib's _MAXCHALLENGE: an endless 334 loop ends here (R35).
_MAX_CHALLENGES = 5
# RFC 4954 §4: the AUTH line may be at most 12288 octets with its initial response.
_MAX_AUTH_LINE = 12288
# After a failed body write, how long to wait for the server's reason (R46).
_EARLY_REPLY_SECONDS = 1.0
_HANDSHAKE = "TLS handshake"

_T = TypeVar("_T")


def default_ssl_context() -> ssl.SSLContext:
    """A verifying client context: CERT_REQUIRED, host name check, TLS >= 1.2 (R2)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Keep truncation detection (R11), as trio.open_ssl_over_tcp_stream does.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


@dataclass(frozen=True, slots=True)
class DSN:
    """RFC 3461 delivery status notification parameters, sent only if advertised (R33)."""

    notify: Sequence[str] | None = None  # ("NEVER",) or any of SUCCESS, FAILURE, DELAY
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    orcpt: bool = False  # send ORCPT=rfc822;<recipient> for each recipient

    def __post_init__(self) -> None:
        # The caller's mistakes are refused here, before any byte is written (R13, R33).
        if self.notify is not None:
            if isinstance(self.notify, str):
                raise LocalProtocolError("DSN notify must be a sequence, e.g. ('FAILURE',)")
            words = [w.upper() for w in self.notify]
            if not words or not set(words) <= _NOTIFY_WORDS:
                raise LocalProtocolError(
                    f"DSN notify must be NEVER or any of SUCCESS, FAILURE, DELAY: {self.notify!r}"
                )
            if "NEVER" in words and len(words) > 1:  # RFC 3461 §4.1
                raise LocalProtocolError("DSN notify NEVER cannot be combined with others")
        if self.ret is not None and self.ret not in ("FULL", "HDRS"):
            raise LocalProtocolError(f"DSN ret must be 'FULL' or 'HDRS', not {self.ret!r}")
        if self.envid is not None and not (
            self.envid.isascii() and self.envid.isprintable() and 0 < len(self.envid) <= 100
        ):
            # RFC 3461 §4.4: printable US-ASCII, at most 100 characters.
            raise LocalProtocolError(f"DSN envid must be printable ASCII: {self.envid!r}")


_NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message checked and encoded, ready for any connection (local checks done)."""

    sender: str
    recipients: tuple[str, ...]
    canonical: Canonical
    needs_smtputf8: bool
    message_id: str | None
    # For an EmailMessage, the 7-bit form to use when the server lacks 8BITMIME (R18).
    canonical_7bit: Canonical | None = None
    #: The caller's label, copied onto the :class:`SendResult`.
    tag: object = field(default=None, compare=False)


def prepare(
    message: Message | bytes | str,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    smtputf8: bool = True,
    eight_bit: bool = True,
    tag: object = None,
) -> PreparedMessage:
    """Check and encode a message without I/O; raises :class:`LocalProtocolError`.

    ``smtputf8``/``eight_bit`` say what the server offers, so an ``EmailMessage`` is
    serialised the way that server can take.
    """
    message_id = None
    canonical_7bit = None
    if isinstance(recipients, str):
        raise LocalProtocolError("recipients must be a sequence of addresses, not one string")
    if isinstance(message, Message):
        if sender is None or recipients is None:
            envelope = envelope_of(message)
            sender = envelope.sender if sender is None else sender
            recipients = envelope.recipients if recipients is None else recipients
        recipients = tuple(recipients)
        message_id = message_id_of(message)
        # UTF-8 addresses in headers can only be written raw (RFC 6532); whether the
        # server takes that is decided per server by _plan (553 5.6.7, R32).
        utf8 = needs_utf8_headers(message)
        canonical = canonicalize(flatten(message, utf8=utf8, eight_bit=eight_bit or utf8))
        if canonical.eight_bit and not utf8:
            try:
                canonical_7bit = canonicalize(flatten(message, utf8=False, eight_bit=False))
            except (LocalProtocolError, UnicodeError, LookupError):
                canonical_7bit = None  # not expressible in 7 bit: 554 5.6.3 if needed
        header_utf8 = utf8
    else:
        if sender is None or recipients is None:
            raise LocalProtocolError("raw messages need sender= and recipients=")
        canonical = canonicalize(message)
        header_utf8 = False
        message_id = _raw_message_id(canonical.data)
    if not recipients:
        raise LocalProtocolError("no recipients")
    sender_path = format_path(sender, allow_null=True)
    needs_smtputf8 = header_utf8 or sender_path.needs_smtputf8
    addresses = []
    for recipient in recipients:
        path = format_path(recipient)
        addresses.append(path.address)
        needs_smtputf8 = needs_smtputf8 or path.needs_smtputf8
    return _new_prepared(
        sender_path.address,
        tuple(addresses),
        canonical,
        needs_smtputf8,
        message_id,
        canonical_7bit,
        tag,
    )


_new_prepared = fast_constructor(PreparedMessage)


def _raw_message_id(data: bytes) -> str | None:
    """The Message-ID of raw canonical data, read from its header section only."""
    end = data.find(b"\r\n\r\n")
    head = (data[: end + 2] if end >= 0 else data).lower()  # ends in CRLF (canonical)
    if head.startswith(b"message-id:"):
        start = 0
    else:
        start = head.find(b"\r\nmessage-id:") + 2  # a field name starts a line
        if start == 1:
            return None
    value = data[start + 11 : head.find(b"\r\n", start)].strip()
    return value.decode("utf-8", "replace") or None


def _local_failure(prepared: PreparedMessage, code: int, enhanced: str, text: str) -> SendResult:
    """A result for a message refused before MAIL, by the client's own checks."""
    reply = Reply.from_lines(code, (f"{enhanced} {text}",))
    return SendResult(
        prepared.sender,
        tuple(RecipientResult(r, outcome_of(reply), reply) for r in prepared.recipients),
        reply,
        prepared.message_id,
        error=f"not sent: {text}",
        tag=prepared.tag,
    )


def _is_cert_error(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError)


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
        self._stream = stream
        self._host = host
        self._timeouts = timeouts
        name = local_hostname if local_hostname is not None else _local_name()
        check_argument(name, "local_hostname")
        self._local_hostname = name
        self._ssl_context = ssl_context
        self._parser = ReplyParser()
        self._phase: Literal["plain", "tls"] = "plain"
        self.capabilities = Capabilities()
        self.greeting: Reply | None = None
        self.authenticated = False
        self._broken: str | None = None
        self._closed = False
        self._in_auth = False  # redact the AUTH exchange in the log (R36)
        self._allow_insecure_auth = False  # R9
        self.messages_sent = 0
        self.transactions = 0
        #: True from the final dot until its reply: a loss now is an unknown outcome (R37).
        self.awaiting_final_reply = False

    # ---------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        return self._host

    @property
    def tls_active(self) -> bool:
        return self._phase == "tls"

    @property
    def is_usable(self) -> bool:
        """False once the connection was closed, broken or told 421."""
        return not self._closed and self._broken is None

    def __repr__(self) -> str:
        state = (
            "closed" if self._closed else (f"broken: {self._broken}" if self._broken else "open")
        )
        return f"<SMTPConnection {self._host} {self._phase} {state} sent={self.messages_sent}>"

    # ------------------------------------------------------------------ low level

    async def _io(
        self,
        stage: str,
        seconds: float,
        operation: Callable[[], Awaitable[_T]],
        *,
        keep_open: bool = False,
    ) -> _T:
        """Run one I/O operation under the stage deadline (R26).

        This is the one place where trio and ssl errors become :class:`SMTPError`. Any
        failure marks the connection broken and closes it (R24, R27); a failed *write*
        may ask to ``keep_open`` (as an :class:`SMTPError`) so the caller can still read
        what the server said before it gave up (R46). Cancellation always closes.
        """
        if not self.is_usable:
            raise SMTPDisconnected(f"connection is not usable ({self._broken or 'closed'})")
        try:
            with trio.fail_after(seconds):
                return await operation()
        except BaseException as exc:
            error = self._failure(exc, stage, seconds)
            if error is None or not keep_open:
                await self.abort()
            if error is None:
                raise
            raise error from (None if isinstance(exc, trio.TooSlowError) else exc)

    def _failure(self, exc: BaseException, stage: str, seconds: float) -> SMTPError | None:
        """Mark the connection broken; the error to raise for ``exc`` (None: ``exc`` itself)."""
        if isinstance(exc, trio.TooSlowError):
            self._broken = f"timeout in {stage}"
            return SMTPTimeoutError(f"{stage}: not done within {seconds:g} s", stage=stage)
        if isinstance(exc, trio.BrokenResourceError):
            self._broken = f"broken in {stage}"
            cause = exc.__cause__
            if _is_cert_error(exc):
                return SMTPCertificateError(f"certificate verification failed: {cause}")
            if isinstance(cause, ssl.SSLError) and (
                stage == _HANDSHAKE or not isinstance(cause, ssl.SSLEOFError)
            ):
                return SMTPSecurityError(f"TLS failed during {stage}: {cause}")
            # Includes EOF without close_notify once TLS is up: a lost connection (R11).
            return SMTPDisconnected(f"connection lost during {stage}")
        if isinstance(exc, trio.ClosedResourceError | OSError):
            self._broken = f"closed in {stage}"
            return SMTPDisconnected(f"connection lost during {stage}: {exc}")
        # Cancelled, protocol errors, bugs: a command is in flight, so never reuse.
        self._broken = self._broken or f"{type(exc).__name__} in {stage}"
        return None

    async def _write(self, data: bytes, stage: str, seconds: float) -> None:
        """Write under a deadline; on an SMTPError the stream stays open for the caller
        to read a last reply (R46) and close."""
        if log.isEnabledFor(logging.DEBUG):
            self._log_out(data)
        await self._io(stage, seconds, partial(self._stream.send_all, data), keep_open=True)

    async def _read(self, stage: str, seconds: float) -> Reply:
        """The next reply, whole, within ``seconds`` (not an idle timer, R26). More
        replies may follow when pipelining; :meth:`_command` checks there are none."""
        reply = await self._io(stage, seconds, self._receive_reply)
        if log.isEnabledFor(logging.DEBUG):
            shown = "334 <redacted>" if self._in_auth and reply.code == 334 else str(reply)
            log.debug("%s %s < %s", self._host, self._phase, shown)
        if reply.code == 421:
            # RFC 5321 §3.8: the server is closing; stop using the connection (R40).
            self._broken = "server sent 421"
            await self.abort()
        return reply

    async def _receive_reply(self) -> Reply:
        parser = self._parser
        reply = parser.next_reply()
        while reply is None:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise trio.ClosedResourceError("server closed the connection")
            parser.feed(data)
            reply = parser.next_reply()
        return reply

    async def _command(
        self, line: bytes, stage: str, seconds: float, *, alone: bool = True
    ) -> Reply:
        """One command, one reply under one deadline. With ``alone`` anything more in the
        buffer is a desync (R24): the connection is closed."""
        deadline = trio.current_time() + seconds
        try:
            await self._write(line, stage, seconds)
        except SMTPError:
            await self.abort()
            raise
        reply = await self._read(stage, max(0.0, deadline - trio.current_time()))
        if alone and self._parser.has_unprocessed:
            await self.abort()
            self._check_drained(stage)
        return reply

    def _check_drained(self, stage: str) -> None:
        if self._parser.has_unprocessed:
            self._broken = f"unsolicited data after {stage}"
            raise SMTPProtocolError(
                f"server sent more than one reply to {stage}: {self._parser.unprocessed[:80]!r}"
            )

    def _log_out(self, data: bytes) -> None:
        if self._in_auth and data != b"*\r\n":
            # R36: the AUTH line keeps its mechanism; no payload reaches the log.
            parts = data.split(b" ", 2)
            if parts[0] != b"AUTH":
                data = b"<redacted>"
            elif len(parts) == 3:
                data = parts[0] + b" " + parts[1] + b" <redacted>"
        head = data[:200]
        log.debug("%s %s > %r%s", self._host, self._phase, head, "..." if len(data) > 200 else "")

    async def abort(self) -> None:
        """Close the stream at once, without QUIT (safe in a cancelled scope)."""
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """QUIT under a shielded, short deadline, then close (R11, R48).

        A connection that broke mid-command, or was told 421, is closed without QUIT.
        """
        if self._closed:
            return
        if self._broken is not None:
            await self.abort()
            return
        with trio.move_on_after(self._timeouts.quit, shield=True) as scope:
            # A server may close right after 221, TLS without close_notify (R11); a
            # strange reply to QUIT (R47) changes nothing either.
            with contextlib.suppress(SMTPError):
                await self._command(b"QUIT\r\n", "QUIT", self._timeouts.quit, alone=False)
            if not self._closed:
                self._closed = True
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self._stream.aclose()
        if scope.cancelled_caught:
            await self.abort()

    def is_stale(self) -> bool:
        """True if an idle connection has unsolicited bytes or EOF pending (R24, R45).

        A pooled connection that got a 421 or was closed while idle must not be reused;
        this peeks at the socket without blocking.
        """
        if not self.is_usable:
            return True
        if self._parser.has_unprocessed:
            return True
        stream = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return False
        # Readable while idle means data or EOF arrived unasked; poll, don't consume.
        readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
        return bool(readable)

    # ----------------------------------------------------------------- handshake

    async def _start(
        self,
        *,
        tls: TLSMode,
        username: str | None,
        password: str | None,
        oauth_token: TokenSource | None,
        allow_insecure_auth: bool,
    ) -> None:
        t = self._timeouts
        self._allow_insecure_auth = allow_insecure_auth
        if tls == "implicit":
            await self._start_tls()  # R8: the handshake comes before the greeting
        greeting = await self._read("greeting", t.greeting)
        self._check_drained("greeting")  # R25: nothing may precede our first command
        if greeting.code != 220:
            if greeting.code == 554 or greeting.is_transient:
                # §3.1: 554 means no service here; QUIT and report (R25).
                if greeting.code != 421:
                    await self.aclose()
                raise SMTPResponseError("greeting", greeting)
            self._broken = "unexpected greeting"
            raise SMTPProtocolError(f"unexpected greeting: {greeting}")
        self.greeting = greeting
        await self._ehlo()
        if tls == "starttls":
            await self._starttls()
        if username is not None:
            await self._login(username, password, oauth_token)

    async def _ehlo(self) -> None:
        t = self._timeouts
        reply = await self._command(encode_command("EHLO", self._local_hostname), "EHLO", t.ehlo)
        if reply.code == 250:
            self.capabilities = Capabilities.from_ehlo(reply)
            return
        if reply.code in (500, 501, 502, 504, 550):
            # §4.1.4: fall back to HELO; this server has no extensions at all (R4).
            reply = await self._command(
                encode_command("HELO", self._local_hostname), "HELO", t.ehlo
            )
            if reply.code == 250:
                self.capabilities = Capabilities.helo_only()
                return
        # 220/221/354/421/530 to EHLO and the like: close, never crash (R47).
        self._broken = "EHLO refused"
        raise SMTPResponseError("EHLO", reply)

    async def _starttls(self) -> None:
        t = self._timeouts
        if not self.capabilities.starttls:
            # R3/R4: STARTTLS required but not offered; stop before AUTH or MAIL.
            self._broken = "STARTTLS not offered"
            raise SMTPSecurityError(
                "tls='starttls' but the server does not offer STARTTLS"
                + ("" if self.capabilities.esmtp else " (it refused EHLO)")
                + "; refusing to continue in plaintext"
            )
        # R5: STARTTLS is the last command of any group; wait for its reply.
        reply = await self._command(b"STARTTLS\r\n", "STARTTLS", t.starttls, alone=False)
        if reply.code != 220:
            self._broken = "STARTTLS refused"
            raise SMTPSecurityError(f"STARTTLS refused: {reply}; refusing to continue in plaintext")
        if self._parser.has_unprocessed:
            # R6: anything queued behind the 220 was injected before TLS.
            self._broken = "data after STARTTLS"
            raise SMTPSecurityError(
                "bytes received after the 220 to STARTTLS (response injection); aborted"
            )
        await self._start_tls()
        # R7: forget all that was learnt in plaintext, greeting included (R12), and ask again.
        self.capabilities = Capabilities()
        self.greeting = None
        await self._ehlo()

    async def _start_tls(self) -> None:
        context = self._ssl_context or default_ssl_context()
        self._parser = ReplyParser()
        ssl_stream = trio.SSLStream(self._stream, context, server_hostname=self._host)
        self._stream = ssl_stream
        await self._io(_HANDSHAKE, self._timeouts.tls_handshake, ssl_stream.do_handshake)
        version = ssl_stream.version()
        if version in ("SSLv3", "TLSv1", "TLSv1.1"):  # a caller's context may allow them
            self._broken = "old TLS"
            raise SMTPSecurityError(f"server negotiated {version}; TLS 1.2 or later required")
        self._phase = "tls"

    async def _login(
        self,
        username: str,
        password: str | None,
        oauth_token: TokenSource | None,
    ) -> None:
        self._check_auth_allowed()
        advertised = self.capabilities.auth_mechanisms
        mechanism: SASLMechanism | None
        if oauth_token is not None:
            if "XOAUTH2" not in advertised:
                raise SMTPSecurityError("server does not offer XOAUTH2")
            token = oauth_token if isinstance(oauth_token, str) else await oauth_token()
            mechanism = XOAuth2(username, token)
        else:
            if password is None:
                raise LocalProtocolError("username given without password or oauth_token")
            mechanism = choose_mechanism(advertised, username, password)
            if mechanism is None:
                raise SMTPSecurityError(
                    "server offers no usable AUTH mechanism"
                    + (f" (offers {', '.join(sorted(advertised))})" if advertised else "")
                )
        await self.auth(mechanism)

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
        self._in_auth = True
        try:
            reply = await self._auth_exchange(mechanism)
        finally:
            self._in_auth = False
        if reply.code != 235:
            raise SMTPAuthenticationError("AUTH", reply)
        self.authenticated = True

    async def _auth_exchange(self, mechanism: SASLMechanism) -> Reply:
        t = self._timeouts.auth
        initial = mechanism.initial_response()
        line = b"AUTH " + mechanism.name.encode("ascii")
        if initial is not None:
            encoded = base64.b64encode(initial) or b"="  # §4: an empty response is "="
            # §4: a response too long for the AUTH line answers the first 334 instead.
            if len(line) + 1 + len(encoded) + 2 <= _MAX_AUTH_LINE:
                line += b" " + encoded
        reply = await self._command(line + b"\r\n", "AUTH", t)
        challenges = 0
        while reply.code == 334:
            challenges += 1
            try:
                challenge = base64.b64decode(reply.text.strip(), validate=True)
                if challenges > _MAX_CHALLENGES:
                    raise ValueError("too many challenges")
                answer = mechanism.respond(challenge)
            except (binascii.Error, ValueError):
                reply = await self._command(b"*\r\n", "AUTH", t)  # cancel (R35)
                self._broken = "AUTH exchange cancelled"
                await self.abort()
                raise SMTPAuthenticationError("AUTH", reply) from None
            reply = await self._command(base64.b64encode(answer) + b"\r\n", "AUTH", t)
        return reply

    # --------------------------------------------------------------- transactions

    async def noop(self) -> Reply:
        return await self._command(b"NOOP\r\n", "NOOP", self._timeouts.noop)

    async def rset(self) -> Reply:
        reply = await self._command(b"RSET\r\n", "RSET", self._timeouts.rset)
        if reply.code != 250 and self.is_usable:
            # The session state is unknown now; never reuse it.
            self._broken = "RSET failed"
            await self.abort()
        return reply

    def prepare(
        self,
        message: Message | bytes | str,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
    ) -> PreparedMessage:
        """Check and encode ``message`` for this server (no I/O)."""
        caps = self.capabilities
        return prepare(
            message,
            sender=sender,
            recipients=recipients,
            smtputf8=caps.smtputf8,
            eight_bit=caps.eightbitmime or caps.smtputf8,
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
        if not self.is_usable:
            raise SMTPDisconnected(f"connection is not usable ({self._broken or 'closed'})")
        prepared = (
            message
            if isinstance(message, PreparedMessage)
            else self.prepare(message, sender=sender, recipients=recipients)
        )
        plan = self._plan(prepared, dsn=dsn, requiretls=requiretls)
        if isinstance(plan, SendResult):
            return plan
        if self.is_stale():
            await self.abort()
            raise SMTPDisconnected("server closed or wrote to the connection while it was idle")
        return await self._transact(prepared, *plan)

    async def send_many(
        self,
        messages: Iterable[PreparedMessage],
        *,
        chunking: bool | None = None,
        dsn: DSN | None = None,
        requiretls: bool = False,
        on_result: Callable[[int, SendResult], None] | None = None,
    ) -> list[SendResult]:
        """Send prepared messages; one result per message, in order.

        With PIPELINING the end of data of one message shares a write with the envelope
        of the next (about one round trip a message); with CHUNKING (unless
        ``chunking=False``) whole ``BDAT`` transactions are pipelined in bounded windows.
        Each result is what :meth:`send` would report. A list is checked whole before
        the first byte; a generator is consumed lazily (each message prepared just before
        it goes out). See :func:`triomail._client.pipeline.send_pipelined`.
        """
        from .pipeline import send_pipelined

        return await send_pipelined(
            self, messages, chunking=chunking, dsn=dsn, requiretls=requiretls, on_result=on_result
        )

    def _plan(
        self, prepared: PreparedMessage, *, dsn: DSN | None, requiretls: bool
    ) -> SendResult | tuple[bytes, list[bytes], Canonical]:
        """Check the message against this server and build MAIL and RCPT lines (R28-R34)."""
        caps = self.capabilities
        canonical = prepared.canonical
        if canonical.eight_bit and not (caps.eightbitmime or caps.smtputf8):
            if prepared.canonical_7bit is not None and not prepared.canonical_7bit.eight_bit:
                canonical = prepared.canonical_7bit
            else:
                # R18: never put 8-bit octets on the wire of a 7-bit server.
                return _local_failure(
                    prepared, 554, "5.6.3", "8-bit message and the server lacks 8BITMIME"
                )
        if prepared.needs_smtputf8 and not caps.smtputf8:
            # R32: no silent downgrade of UTF-8 addresses.
            return _local_failure(
                prepared, 553, "5.6.7", "UTF-8 address and the server lacks SMTPUTF8"
            )
        if requiretls and not (self.tls_active and caps.requiretls):
            # R34 / RFC 8689 §4: refuse, report 5.7.30.
            return _local_failure(prepared, 550, "5.7.30", "REQUIRETLS support required")
        params = []
        if "SIZE" in caps.extensions:
            limit = caps.size_limit
            if limit is not None and len(canonical.data) > limit:
                # R30: a permanent failure before MAIL.
                return _local_failure(
                    prepared,
                    552,
                    "5.3.4",
                    f"message of {len(canonical.data)} octets exceeds SIZE {limit}",
                )
            params.append(f"SIZE={len(canonical.data)}")
        if canonical.eight_bit and caps.eightbitmime:
            params.append("BODY=8BITMIME")
        if prepared.needs_smtputf8:
            params.append("SMTPUTF8")
        if dsn is not None and caps.dsn:  # R28: never unadvertised parameters
            if dsn.ret:
                params.append(f"RET={dsn.ret}")
            if dsn.envid:
                params.append(f"ENVID={xtext(dsn.envid)}")
        if requiretls:
            params.append("REQUIRETLS")
        mail = encode_command("MAIL", f"FROM:<{prepared.sender}>", *params)
        rcpt_params: list[str] = []
        if dsn is not None and caps.dsn and dsn.notify:
            rcpt_params.append("NOTIFY=" + ",".join(n.upper() for n in dsn.notify))
        rcpts = []
        for recipient in prepared.recipients:
            extra = list(rcpt_params)
            if dsn is not None and dsn.orcpt and caps.dsn:
                if recipient.isascii():
                    extra.append(f"ORCPT=rfc822;{xtext(recipient)}")
                else:
                    extra.append(f"ORCPT=utf-8;{utf8_addr_xtext(recipient)}")
            rcpts.append(encode_command("RCPT", f"TO:<{recipient}>", *extra))
        return mail, rcpts, canonical

    async def _transact(
        self, prepared: PreparedMessage, mail: bytes, rcpts: list[bytes], canonical: Canonical
    ) -> SendResult:
        t = self._timeouts
        replies: list[Reply | None] = [None] * len(prepared.recipients)
        mail_ok = False
        self.transactions += 1
        self.awaiting_final_reply = False

        def result(outcome: Outcome, reply: Reply | None, error: str | None = None) -> SendResult:
            return transaction_result(prepared, replies, outcome, reply, error, mail_ok)

        async def lost(exc: SMTPError, outcome: Outcome) -> SendResult:
            await self.abort()
            return result(outcome, None, f"{type(exc).__name__}: {exc}")

        pipelining = self.capabilities.pipelining
        group = _RCPT_GROUP if pipelining else 1
        try:
            # ---- envelope: MAIL, RCPT..., DATA; one write when PIPELINING (RFC 2920)
            if pipelining:
                with_data = len(rcpts) <= group
                first = mail + b"".join(rcpts[:group]) + (b"DATA\r\n" if with_data else b"")
                await self._write(first, "MAIL", t.mail)
                mail_reply = _final_or_refusal(await self._read("MAIL", t.mail), "MAIL")
            else:
                mail_reply = _final_or_refusal(await self._command(mail, "MAIL", t.mail), "MAIL")
            if not mail_reply.is_positive:
                if pipelining and self.is_usable:
                    await self._drain_group(len(rcpts[:group]) + with_data)
                await self._reset_after_failure()
                return result(outcome_of(mail_reply), mail_reply)
            mail_ok = True
            for start in range(0, len(rcpts), group):
                lines = rcpts[start : start + group]
                if pipelining and start:
                    last = start + group >= len(rcpts)
                    await self._write(
                        b"".join(lines) + (b"DATA\r\n" if last else b""), "RCPT", t.rcpt
                    )
                for i, line in enumerate(lines, start):
                    reply = await (
                        self._read("RCPT", t.rcpt)
                        if pipelining
                        else self._command(line, "RCPT", t.rcpt)
                    )
                    replies[i] = _final_or_refusal(reply, "RCPT")
                    if reply.code == 421:  # _read closed the connection (R40)
                        return result(Outcome.TRANSIENT, reply, "server closing (421)")
            accepted = any(r is not None and r.is_positive for r in replies)
            if pipelining:
                data_reply = await self._read("DATA", t.data_init)
                self._check_drained("DATA")
            elif accepted:
                data_reply = await self._command(b"DATA\r\n", "DATA", t.data_init)
            else:
                # R41: nobody accepted, so no DATA; RSET and report per recipient.
                await self._reset_after_failure()
                return result(Outcome.PERMANENT, None)
            if data_reply.code != 354:
                # R47: no body after anything but 354; a 250 here would claim a delivery.
                if data_reply.is_positive:
                    raise SMTPProtocolError(f"DATA answered {data_reply}, not 354")
                await self._reset_after_failure()
                return result(outcome_of(data_reply), data_reply)
            if not accepted:
                # R29: DATA got 354 although every RCPT failed: end the data at once.
                await self._write(b".\r\n", "DATA", t.data_block)
                end = await self._read("end of data", t.data_done)
                self._check_drained("end of data")
                return result(Outcome.PERMANENT, end)
        except SMTPError as exc:
            return await lost(exc, Outcome.TRANSIENT)
        # ---- content: R39 before the final dot is written, R37 after it.
        payload = dot_stuff(canonical)
        try:
            for offset in range(0, len(payload), _DATA_CHUNK):
                # One deadline per chunk (R46); slicing all of it returns the same bytes.
                await self._write(
                    payload[offset : offset + _DATA_CHUNK], "data block", t.data_block
                )
        except SMTPError as exc:
            early = await self._early_reply()
            if early is not None:
                await self.abort()
                return result(outcome_of(early), early, "server replied before the end of data")
            return await lost(exc, Outcome.TRANSIENT)
        # Between the final dot and its reply lies RFC 1047's synchronisation gap.
        self.awaiting_final_reply = True
        try:
            final = _final_or_refusal(await self._read("end of data", t.data_done), "end of data")
            self._check_drained("end of data")
        except SMTPError as exc:
            log.warning(
                "%s: no reply to the final dot; message %s may have been delivered",
                self._host,
                prepared.message_id or "",
            )
            return await lost(exc, Outcome.UNKNOWN)
        self.awaiting_final_reply = False
        if final.is_positive:
            self.messages_sent += 1
        return result(outcome_of(final), final)

    async def _drain_group(self, count: int) -> None:
        """Read the replies still due for a pipelined group (R29: check all of them)."""
        for _ in range(count):
            reply = await self._read("pipelined group", self._timeouts.rcpt)
            if reply.code == 354:
                # DATA accepted although MAIL was refused: the state is unknown; close.
                self._broken = "354 to DATA after a refused MAIL"
                await self.abort()
            if not self.is_usable:
                return

    async def _reset_after_failure(self) -> None:
        """RSET after a failed transaction so the session is clean for reuse (R45).

        A connection already closed (421) stays closed; a failed RSET closes it.
        """
        if self.is_usable:
            with contextlib.suppress(SMTPError):
                await self.rset()

    async def _early_reply(self) -> Reply | None:
        """After a failed body write: a refusal the server sent before giving up (R46).

        The write left the stream open for this one read; the caller closes it.
        """
        broken, self._broken = self._broken, None
        try:
            reply = await self._read("early reply", _EARLY_REPLY_SECONDS)
        except SMTPError:
            return None
        finally:
            self._broken = self._broken or broken
        return reply if not reply.is_positive else None


def _final_or_refusal(reply: Reply, stage: str) -> Reply:
    """MAIL, RCPT and the final dot are answered 2xx, 4xx or 5xx; a 3xx is a desync."""
    if 300 <= reply.code < 400:
        raise SMTPProtocolError(f"unexpected {reply} in reply to {stage}")
    return reply


@functools.lru_cache(maxsize=1)
def _local_name() -> str:
    """The EHLO name: the FQDN in A-label form, or an address literal (R32)."""
    name = socket.getfqdn()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        name = "localhost"
    if "." not in name or any(c in name for c in " \r\n\t\x00\x7f"):
        return "[127.0.0.1]"
    return name


def _default_port(tls: TLSMode) -> int:
    return 465 if tls == "implicit" else (587 if tls == "starttls" else 25)


@asynccontextmanager
async def connect(
    host: str,
    port: int | None = None,
    *,
    tls: TLSMode | None = None,
    ssl_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    oauth_token: TokenSource | None = None,
    local_hostname: str | None = None,
    timeouts: Timeouts = Timeouts(),
    allow_insecure_auth: bool = False,
) -> AsyncIterator[SMTPConnection]:
    """Open an SMTP session; QUIT and close it when the block ends.

    ``tls`` is ``"implicit"`` (the default for port 465), ``"starttls"`` (the default
    otherwise, and required: never a silent downgrade, R1) or ``"none"`` (explicit
    plaintext). Deadlines come from ``timeouts``.
    """
    conn = await open_connection(
        host,
        port,
        tls=tls,
        ssl_context=ssl_context,
        username=username,
        password=password,
        oauth_token=oauth_token,
        local_hostname=local_hostname,
        timeouts=timeouts,
        allow_insecure_auth=allow_insecure_auth,
    )
    try:
        yield conn
    finally:
        await conn.aclose()


async def open_connection(
    host: str,
    port: int | None = None,
    *,
    tls: TLSMode | None = None,
    ssl_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    oauth_token: TokenSource | None = None,
    local_hostname: str | None = None,
    timeouts: Timeouts = Timeouts(),
    allow_insecure_auth: bool = False,
) -> SMTPConnection:
    """Like :func:`connect`, but the caller must ``await conn.aclose()``."""
    if tls is None:
        tls = "implicit" if port == 465 else "starttls"
    if tls not in ("implicit", "starttls", "none"):
        raise ValueError(f"tls must be 'implicit', 'starttls' or 'none', not {tls!r}")
    if port is None:
        port = _default_port(tls)
    check_argument(host, "host")
    try:
        with trio.fail_after(timeouts.connect):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise SMTPTimeoutError(f"connecting to {host}:{port} timed out", stage="connect") from None
    except OSError as exc:
        raise SMTPConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
    return await start_session(
        stream,
        host=host,
        tls=tls,
        ssl_context=ssl_context,
        username=username,
        password=password,
        oauth_token=oauth_token,
        local_hostname=local_hostname,
        timeouts=timeouts,
        allow_insecure_auth=allow_insecure_auth,
    )


async def start_session(
    stream: trio.abc.Stream,
    *,
    host: str,
    tls: TLSMode,
    ssl_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    oauth_token: TokenSource | None = None,
    local_hostname: str | None = None,
    timeouts: Timeouts = Timeouts(),
    allow_insecure_auth: bool = False,
) -> SMTPConnection:
    """Run greeting, EHLO, STARTTLS and AUTH over an already-open stream.

    ``host`` is the name the certificate must match (R2). On failure the stream is
    closed and the error raised.
    """
    try:
        if local_hostname is None and not _local_name.cache_info().currsize:
            # The first look-up of our FQDN may block on DNS: keep it off the trio thread.
            await trio.to_thread.run_sync(_local_name)
        conn = SMTPConnection(
            stream,
            host=host,
            timeouts=timeouts,
            local_hostname=local_hostname,
            ssl_context=ssl_context,
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)  # R13: a bad EHLO name; nothing written
        raise
    try:
        await conn._start(
            tls=tls,
            username=username,
            password=password,
            oauth_token=oauth_token,
            allow_insecure_auth=allow_insecure_auth,
        )
    except BaseException:
        # QUIT if the session is still sound (AUTH refused); after a TLS failure or any
        # broken state, close without another byte (R3, R10).
        await conn.aclose()
        raise
    return conn
