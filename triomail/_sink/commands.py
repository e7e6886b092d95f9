"""The server side of one SMTP conversation, sans-IO: the capture server's state machine.

Theory of operation
===================

This module is **one state machine** (hence its size): :class:`ServerMachine` plays
the server of one connection (RFC 5321 §4) and does no I/O, so it can be tested with
plain calls. The I/O half, :mod:`triomail._sink.session`, drives it in a loop:

- ``receive_data(bytes)`` hands it what the client sent;
- ``next_event()`` runs the conversation as far as the input allows and returns what
  the I/O side must do before asking again (an :data:`Event`);
- ``data_to_send()`` returns the replies written so far.

The events:

- :attr:`Signal.NEED_DATA`: send the replies, then read and ``receive_data()``; if
  the client stays silent for the idle timeout, call ``timed_out()`` instead
  (RFC 5321 §4.5.3.2.7). End of input ends the conversation without more replies.
- :class:`Pause`: send the replies, then wait (an injected fault's delay).
- :attr:`Signal.START_TLS`: send the replies, then do the server TLS handshake
  (RFC 3207, or RFC 8314 implicit TLS before the greeting); close if it fails.
- :class:`Captured`: keep the message and report the queue id (None: no room) with
  ``stored()``; the end-of-data reply depends on it.
- :attr:`Signal.CLOSE`: send the replies, then close politely (TLS close_notify).
- :attr:`Signal.ABORT`: send the replies already due, then close at once.

Replies are only written when the machine needs input (or before a pause, TLS or a
close). Pipelined commands (RFC 2920) thus get their replies in order and in one
write, and a client that sent more than it may before a reply it had to wait for is
caught with ``554 5.5.0``: those bytes are already in the input buffer.

The state has two parts. What the client has established (EHLO, TLS, AUTH, the open
transaction) lives in attributes. Where the conversation stands (reading a command,
an AUTH response, a BDAT chunk or message text; paused; waiting for TLS) is where
one generator, :meth:`ServerMachine._converse`, is suspended: each ``yield`` is a
point where it waits for the I/O side. So a command that needs more input before it
can answer (``AUTH LOGIN``, ``BDAT``) reads top to bottom as the RFC describes it,
and most handlers are plain methods that only reply. Grammar and content checks live
in :mod:`triomail._sink.syntax`; fault rules in :mod:`triomail._sink.faults`.
"""

from __future__ import annotations

import enum
import hmac
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeVar

from .config import SinkConfig
from .faults import Fault, FaultBook
from .message import CapturedMessage
from .syntax import (
    TOO_BIG,
    Verdict,
    decode_sasl,
    format_reply,
    judge_message,
    parse_command_line,
    parse_mail_arguments,
    split_plain,
)

__all__ = ["EXTENSIONS", "Captured", "Event", "Pause", "ServerMachine", "Signal"]

#: Extensions the sink implements and advertises by default, in EHLO order.
EXTENSIONS = (
    "PIPELINING",  # RFC 2920
    "SIZE",  # RFC 1870
    "8BITMIME",  # RFC 6152
    "SMTPUTF8",  # RFC 6531
    "DSN",  # RFC 3461
    "ENHANCEDSTATUSCODES",  # RFC 2034
    "CHUNKING",  # RFC 3030
    "STARTTLS",  # RFC 3207, only while TLS is configured and not yet active
    "AUTH",  # RFC 4954, only when credentials are configured (and TLS is up)
)

# RFC 2920 §3.1: these may only be the last command of a pipelined group.
_GROUP_END = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "HELP", "STARTTLS"})
_RCPT_PATH = re.compile(r"TO:<([^>]*)>", re.IGNORECASE)
_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?: +(LAST))?", re.IGNORECASE)
_END_OF_DATA = b"\r\n.\r\n"
_MALFORMED_AUTH = Verdict(501, "5.5.2", "Error: malformed authentication response")


class Signal(enum.Enum):
    """Events without a payload; see the module docstring for what each asks."""

    NEED_DATA = enum.auto()
    START_TLS = enum.auto()
    CLOSE = enum.auto()
    ABORT = enum.auto()


@dataclass(frozen=True, slots=True)
class Pause:
    """Send the replies, then wait this long before asking for the next event."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Captured:
    """A message was accepted: store it and report the queue id with ``stored()``."""

    message: CapturedMessage


Event: TypeAlias = Signal | Pause | Captured
_T = TypeVar("_T")
# The conversation and its parts: generators that yield events and return a _T.
_Flow: TypeAlias = Generator[Event, None, _T]


class _Close(Exception):
    """Send the pending replies, then close the connection."""


class _Abort(Exception):
    """Close the connection abruptly, without another reply."""


class _Transaction:
    """One MAIL transaction (RFC 5321 §3.3)."""

    __slots__ = (
        "bdat", "chunks", "failed", "mail_from", "mail_options", "number", "params",
        "rcpt_options", "rcpt_to", "size",
    )  # fmt: skip

    def __init__(
        self, number: int, mail_from: str, options: list[str], params: dict[str, str | None]
    ) -> None:
        self.number = number
        self.mail_from = mail_from
        self.mail_options = options
        self.params = params
        self.rcpt_to: list[str] = []
        self.rcpt_options: list[list[str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.bdat = False
        self.failed = False

    @property
    def eight_bit_ok(self) -> bool:
        body = self.params.get("BODY")
        return "SMTPUTF8" in self.params or (body is not None and body.upper() == "8BITMIME")


class ServerMachine:
    """The server side of one SMTP connection, without I/O (see the module docstring)."""

    def __init__(self, config: SinkConfig, faults: FaultBook, peer: tuple[str, int]) -> None:
        self._config = config
        self._faults = faults
        self._peer = peer
        # RFC 5321 §4.1.1.4 dot-stuffing can grow a message by at most a third, so
        # this bounds what DATA buffers before switching to counting only.
        self._wire_limit = config.max_message_size * 4 // 3 + 1024
        forbid = config.forbid_unauth_pipelining
        self._forbid_pipelining = config.strict if forbid is None else forbid
        # What the I/O side gave and will be given.
        self._buf = bytearray()
        self._out = bytearray()
        self._idle_expired = False
        self._queue_id: str | None = None
        # What the session knows about the client; STARTTLS forgets all but _tls.
        self._tls = False
        self._greeted = False
        self._helo = ""
        self._ext: frozenset[str] = frozenset()  # what the last EHLO advertised
        self._enhanced = False
        self._user: str | None = None
        self._txn: _Transaction | None = None
        # The connection's course: its MAIL number for faults, messages so far, a
        # refused greeting, and a DATA whose text comes next (maybe cut by a fault).
        self._mail_number = 0
        self._delivered = 0
        self._rejected = False
        self._data_pending = False
        self._data_drop: int | None = None
        self._handlers: dict[str, Callable[[str], _Flow[None] | None]] = {
            "EHLO": self._ehlo, "HELO": self._helo_cmd, "STARTTLS": self._starttls,
            "AUTH": self._auth, "MAIL": self._mail, "RCPT": self._rcpt, "DATA": self._data,
            "BDAT": self._bdat, "RSET": self._rset, "NOOP": self._noop, "VRFY": self._vrfy,
            "EXPN": self._expn, "HELP": self._help, "QUIT": self._quit,
        }  # fmt: skip
        self._flow = self._converse()

    # --- the interface for the I/O side ----------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add input from the client (read after :attr:`Signal.NEED_DATA`)."""
        self._buf += data

    def timed_out(self) -> None:
        """The client sent nothing for the idle timeout (instead of ``receive_data``)."""
        self._idle_expired = True

    def stored(self, queue_id: str | None) -> None:
        """Answer a :class:`Captured` event: the queue id, or None if not stored."""
        self._queue_id = queue_id

    def next_event(self) -> Event:
        """Run the conversation until the I/O side must act; after CLOSE or ABORT,
        the same event again."""
        return next(self._flow)

    def data_to_send(self) -> bytes:
        """The replies written since the last call (send them before acting)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    # --- the conversation ------------------------------------------------------------

    def _converse(self) -> _Flow[None]:
        final = Signal.CLOSE
        try:
            if self._config.implicit_tls:
                yield from self._start_tls()  # RFC 8314 §3.3: TLS before the greeting
            yield from self._greet()
            while True:
                if self._data_pending:
                    yield from self._receive_data()
                else:
                    yield from self._dispatch((yield from self._read_line()))
        except _Close:
            pass
        except _Abort:
            final = Signal.ABORT
        while True:
            yield final

    def _greet(self) -> _Flow[None]:
        fault = self._faults.match("CONNECT", None) if self._faults else None
        if fault is not None:
            yield from self._fault_before(fault)
            if self._fault_reply(fault):
                # RFC 5321 §3.1: after a 554 (or other refusal) greeting the server
                # answers everything but QUIT with 503.
                self._rejected = fault.code is not None and fault.code != 220
                return
        self._out += f"220 {self._config.hostname} ESMTP triomail sink\r\n".encode()
        self._fault_after(fault)

    def _start_tls(self) -> _Flow[None]:
        yield Signal.START_TLS  # the I/O side closes if the handshake fails
        self._tls = True

    # --- input -------------------------------------------------------------------

    def _fill(self) -> _Flow[None]:
        """Wait for more input (the I/O side sends the pending replies first)."""
        yield Signal.NEED_DATA
        if self._idle_expired:
            # RFC 5321 §4.5.3.2.7 server timeout; text as Postfix's.
            self._reply(421, "4.4.2", f"{self._config.hostname} Error: timeout exceeded")
            raise _Close

    def _read_line(self) -> _Flow[bytes | None]:
        """Return the next line with its terminator, or None if it was too long."""
        limit = self._config.max_line_length
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line if len(line) <= limit else None
            if len(self._buf) > limit:
                # Discard through the next LF without keeping it (bounded memory).
                self._buf.clear()
                while True:
                    yield from self._fill()
                    end = self._buf.find(b"\n")
                    if end >= 0:
                        del self._buf[: end + 1]
                        return None
                    self._buf.clear()
            yield from self._fill()

    def _read_chunk(self, size: int, *, keep: bool) -> _Flow[bytes]:
        """Read exactly ``size`` octets of BDAT data (kept only if ``keep``)."""
        parts: list[bytes] = []
        while size:
            if not self._buf:
                yield from self._fill()
            take = min(size, len(self._buf))
            if keep:
                parts.append(bytes(self._buf[:take]))
            del self._buf[:take]
            size -= take
        return b"".join(parts)

    # --- output ------------------------------------------------------------------

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        # RFC 2034 §3: enhanced codes only once advertised (so not before EHLO).
        self._out += format_reply(code, enhanced if self._enhanced else None, text)

    def _say(self, verdict: Verdict) -> None:
        self._reply(verdict.code, verdict.enhanced, verdict.text)

    def _check_sync(self, verb: str, fault: Fault | None = None) -> None:
        """Close on input that arrived before a reply the client had to wait for (RFC
        2920 §3.1: behind a group's last command, or without PIPELINING), answering
        the command with 554 as Postfix's ``smtpd_forbid_unauth_pipelining`` does; a
        fault's ``forbid_pipelined`` makes ``verb`` such a command."""
        if not self._buf or verb == "QUIT":
            return
        forbidden = fault is not None and fault.forbid_pipelined
        if forbidden or (
            self._forbid_pipelining and (verb in _GROUP_END or "PIPELINING" not in self._ext)
        ):
            self._reply(554, "5.5.0", "Error: SMTP protocol synchronization")
            raise _Close

    # --- faults ------------------------------------------------------------------

    def _fault_before(self, fault: Fault) -> _Flow[None]:
        if fault.delay:
            yield Pause(fault.delay)
        if fault.drop == "before_reply":
            raise _Abort

    def _fault_reply(self, fault: Fault) -> bool:
        """Give the fault's reply, if it has one; return whether it did."""
        if fault.raw is not None:
            self._out += fault.raw
        elif fault.code is not None:
            if fault.text is not None:
                text = fault.text
            else:
                text = (
                    f"{fault.code // 100}.0.0 Injected fault"
                    if self._enhanced
                    else "Injected fault"
                )
            self._out += format_reply(fault.code, None, text)
        else:
            return False
        self._fault_after(fault)
        if fault.code == 421:
            raise _Close  # RFC 5321 §3.8: 421 means the server closes
        return True

    def _fault_after(self, fault: Fault | None) -> None:
        if fault is not None and fault.drop == "after_reply":
            raise _Abort

    # --- commands ----------------------------------------------------------------

    def _dispatch(self, line: bytes | None) -> _Flow[None]:
        parsed = parse_command_line(line)
        if isinstance(parsed, Verdict):
            self._say(parsed)
            return
        verb, arg = parsed
        if self._rejected:
            if verb == "QUIT":
                self._quit("")
            self._reply(503, "5.5.1", "Error: connection refused, send QUIT")
            return
        handler = self._handlers.get(verb)
        if handler is None:
            self._reply(500, "5.5.2", "Error: command not recognized")
            return
        if verb != "BDAT":  # BDAT's chunk follows it; checked once the chunk is read
            self._check_sync(verb)
        if verb == "MAIL":
            self._mail_number = self._faults.number_mail()
        if verb == "BDAT":  # consumes its chunk before any reply, faults included
            yield from self._bdat(arg)
            return
        fault = None
        if self._faults:
            number = self._mail_number if verb == "MAIL" else self._txn_number()
            recipient = None
            if verb == "RCPT" and (match := _RCPT_PATH.match(arg)):
                recipient = match[1]
            fault = self._faults.match(verb, number, recipient)
        if fault is not None:
            self._check_sync(verb, fault)
            yield from self._fault_before(fault)
            if self._fault_reply(fault):
                return
        flow = handler(arg)
        if flow is not None:
            yield from flow
        if fault is not None:
            self._fault_after(fault)
            if fault.drop == "during_data" and self._data_pending:
                self._data_drop = fault.after_bytes

    def _txn_number(self) -> int | None:
        return None if self._txn is None else self._txn.number

    def _extensions(self) -> list[str]:
        c = self._config
        lines = []
        for name in EXTENSIONS:
            if name in c.hide_extensions:
                continue
            if name == "SIZE":
                lines.append(f"SIZE {c.max_message_size}")
            elif name == "STARTTLS":
                if c.tls_context is not None and not self._tls:
                    lines.append(name)
            elif name == "AUTH":
                if c.auth and (self._tls or c.allow_insecure_auth):
                    lines.append("AUTH " + " ".join(c.auth_mechanisms))
            else:
                lines.append(name)
        return lines + list(c.extra_extensions)

    def _ehlo(self, arg: str) -> None:
        if not arg or " " in arg:
            self._reply(501, "5.5.4", "Syntax: EHLO hostname")
            return
        lines = self._extensions()
        self._txn = None  # RFC 5321 §4.1.4: EHLO implies RSET
        self._greeted, self._helo = True, arg
        self._ext = frozenset(line.split(" ")[0].upper() for line in lines)
        self._enhanced = "ENHANCEDSTATUSCODES" in self._ext
        greeting = f"{self._config.hostname} Hello {arg}"
        self._out += format_reply(250, None, "\n".join([greeting, *lines]))

    def _helo_cmd(self, arg: str) -> None:
        if not arg or " " in arg:
            self._reply(501, "5.5.4", "Syntax: HELO hostname")
            return
        self._txn = None
        self._greeted, self._helo = True, arg
        self._ext, self._enhanced = frozenset(), False  # no extensions after HELO
        self._out += format_reply(250, None, self._config.hostname)

    def _starttls(self, arg: str) -> _Flow[None]:
        if arg:
            self._reply(501, "5.5.4", "Syntax: STARTTLS")
        elif self._tls:
            self._reply(503, "5.5.1", "Error: TLS already active")
        elif not self._greeted:
            self._reply(503, "5.5.1", "Error: send EHLO first")
        elif "STARTTLS" not in self._ext:
            self._reply(502, "5.5.1", "Error: command not implemented")
        elif self._buf:
            # RFC 3207 §4.2 and RFC 2920 §3.1: nothing may follow STARTTLS before the
            # handshake (plaintext command injection, CVE-2011-0411).
            self._reply(554, "5.5.0", "Error: pipelined data after STARTTLS")
            raise _Close
        else:
            self._reply(220, "2.0.0", "Ready to start TLS")
            yield from self._start_tls()
            # RFC 3207 §4.2: discard all knowledge obtained from the client.
            self._greeted, self._helo, self._ext, self._enhanced = False, "", frozenset(), False
            self._txn, self._user = None, None

    def _auth(self, arg: str) -> _Flow[None]:
        c = self._config
        if not self._greeted:
            self._reply(503, "5.5.1", "Error: send EHLO first")
        elif "AUTH" not in self._ext:
            if c.auth and not self._tls and c.tls_context is not None:
                # RFC 3207 §4 / RFC 4954 §4: credentials only after STARTTLS.
                self._reply(530, "5.7.0", "Must issue a STARTTLS command first")
            else:
                self._reply(503, "5.5.1", "Error: authentication not enabled")
        elif self._user is not None:
            self._reply(503, "5.5.1", "Error: already authenticated")
        elif self._txn is not None:
            self._reply(503, "5.5.1", "Error: MAIL transaction in progress")
        else:
            mechanism, _, initial = arg.partition(" ")
            mechanism = mechanism.upper()
            if mechanism not in c.auth_mechanisms:
                self._reply(504, "5.5.4", "Error: unsupported authentication mechanism")
            elif mechanism == "PLAIN":
                yield from self._auth_plain(initial)
            else:
                yield from self._auth_login(initial)

    def _auth_plain(self, initial: str) -> _Flow[None]:
        response = yield from self._sasl_response(initial, "")
        if response is None:
            return
        parts = split_plain(response)
        if parts is None:
            self._say(_MALFORMED_AUTH)
            return
        authzid, user, password = parts
        self._check_credentials(user, password, authzid in ("", user))

    def _auth_login(self, initial: str) -> _Flow[None]:
        raw_user = yield from self._sasl_response(initial, "VXNlcm5hbWU6")
        if raw_user is None:
            return
        raw_password = yield from self._sasl_response("", "UGFzc3dvcmQ6")
        if raw_password is None:
            return
        try:
            user, password = raw_user.decode("utf-8"), raw_password.decode("utf-8")
        except UnicodeDecodeError:
            self._say(_MALFORMED_AUTH)
            return
        self._check_credentials(user, password, True)

    def _sasl_response(self, initial: str, challenge: str) -> _Flow[bytes | None]:
        """The decoded response: ``initial`` if given, else one asked for with 334.

        Returns None once it has replied with an error (RFC 4954 §4).
        """
        if initial:
            response = decode_sasl(initial)
        else:
            self._check_sync("AUTH-RESPONSE")
            self._out += f"334 {challenge}\r\n".encode()
            line = yield from self._read_line()
            if line == b"*\r\n":  # RFC 4954 §4: the client cancels; the server MUST send 501
                self._reply(501, "5.7.0", "Error: authentication aborted")
                return None
            ok = line is not None and line.endswith(b"\r\n")
            response = decode_sasl(line[:-2]) if line is not None and ok else None
        if response is None:
            self._say(_MALFORMED_AUTH)
        return response

    def _check_credentials(self, user: str, password: str, authz_ok: bool) -> None:
        expected = self._config.auth.get(user)
        ok = expected is not None and hmac.compare_digest(
            expected.encode("utf-8"), password.encode("utf-8")
        )
        if ok and authz_ok:
            self._user = user
            self._reply(235, "2.7.0", "Authentication successful")
        else:
            self._reply(535, "5.7.8", "Error: authentication failed")

    def _mail(self, arg: str) -> None:
        c = self._config
        if not self._greeted:
            self._reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self._txn is not None:
            self._reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if c.require_tls and not self._tls:
            self._reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if c.require_auth and self._user is None:
            self._reply(530, "5.7.0", "Authentication required")  # RFC 4954 §6
            return
        limit = c.messages_per_connection
        if limit is not None and self._delivered >= limit:
            self._reply(421, "4.7.0", f"{c.hostname} Error: too many messages in one session")
            raise _Close
        parsed = self._mail_arguments(arg, "MAIL", utf8=True)
        if parsed is None:
            return
        address, options, values = parsed
        if not address.isascii() and "SMTPUTF8" not in values:
            self._reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")  # RFC 6531 §3.5
            return
        self._txn = _Transaction(self._mail_number, address, options, values)
        self._reply(250, "2.1.0", "Ok")

    def _rcpt(self, arg: str) -> None:
        c = self._config
        txn = self._txn
        if txn is None:
            self._reply(503, "5.5.1", "Error: need MAIL command")
            return
        if txn.bdat:
            self._reply(503, "5.5.1", "Error: RCPT after BDAT")
            return
        parsed = self._mail_arguments(arg, "RCPT", utf8="SMTPUTF8" in txn.params)
        if parsed is None:
            return
        address, options, _ = parsed
        if len(txn.rcpt_to) >= c.max_recipients:
            self._reply(452, "4.5.3", "Error: too many recipients")  # RFC 5321 §4.5.3.1.10
            return
        txn.rcpt_to.append(address)
        txn.rcpt_options.append(options)
        self._reply(250, "2.1.5", "Ok")

    def _mail_arguments(
        self, arg: str, command: Literal["MAIL", "RCPT"], *, utf8: bool
    ) -> tuple[str, list[str], dict[str, str | None]] | None:
        """Path and parameters, checked against what EHLO advertised; None once refused."""
        max_size = self._config.max_message_size
        parsed = parse_mail_arguments(arg, command, self._ext, utf8=utf8, max_size=max_size)
        if isinstance(parsed, Verdict):
            self._say(parsed)
            return None
        return parsed

    def _transfer_error(self, txn: _Transaction | None) -> Verdict | None:
        if txn is None:
            return Verdict(503, "5.5.1", "Error: need MAIL command")
        if not txn.rcpt_to:
            # RFC 2920 §3.1 / RFC 5321 §3.3: no valid recipients.
            return Verdict(554, "5.5.1", "Error: no valid recipients")
        return None

    def _data(self, arg: str) -> None:
        txn = self._txn
        error = self._transfer_error(txn)
        if arg:
            self._reply(501, "5.5.4", "Syntax: DATA")
        elif error is not None:
            self._say(error)
        elif txn is not None and txn.bdat:
            self._reply(503, "5.5.1", "Error: DATA after BDAT")  # RFC 3030 §3
        else:
            self._out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
            self._data_pending = True

    def _receive_data(self) -> _Flow[None]:
        """Read message text up to <CRLF>.<CRLF> (RFC 5321 §4.1.1.4), bounded."""
        self._data_pending = False
        drop_after, self._data_drop = self._data_drop, None
        buf = self._buf
        buf[0:0] = b"\r\n"  # the CRLF that ended "DATA" starts the first line
        start = discarded = 0
        while True:
            if drop_after is not None and discarded + len(buf) - 2 >= drop_after:
                raise _Abort
            end = buf.find(_END_OF_DATA, start)
            if end >= 0:
                break
            if len(buf) > self._wire_limit:  # too big: keep counting, stop storing
                discarded += len(buf) - 4
                del buf[:-4]
            start = max(0, len(buf) - 4)
            yield from self._fill()
        wire = b"" if discarded else bytes(buf[2 : end + 2])
        del buf[: end + len(_END_OF_DATA)]
        yield from self._end_of_message(wire, "DATA", oversize=discarded > 0)

    def _bdat(self, arg: str) -> _Flow[None]:
        args = _BDAT_ARGS.fullmatch(arg)
        if args is None:
            # Without a valid size the next command cannot be found (RFC 3030 §2).
            self._reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
            raise _Close
        size, last = int(args[1]), args[2] is not None
        txn = self._txn
        fault = self._faults.match("BDAT", self._txn_number()) if self._faults else None
        error = self._transfer_error(txn)
        if "CHUNKING" not in self._ext:
            error = Verdict(502, "5.5.1", "Error: CHUNKING not offered")
        elif txn is not None and txn.failed:
            error = Verdict(503, "5.5.1", "Error: earlier BDAT failed, send RSET")  # RFC 3030 §2
        too_big = txn is not None and txn.size + size > self._config.max_message_size
        if fault is not None and fault.drop == "during_data":
            yield from self._read_chunk(min(size, fault.after_bytes), keep=False)
            raise _Abort
        # RFC 3030 §2: the chunk is always read, even when it is rejected.
        chunk = yield from self._read_chunk(size, keep=error is None and not too_big)
        self._check_sync("BDAT", fault)
        if error is not None or txn is None:
            self._say(error or Verdict(503, "5.5.1", "Error: need MAIL command"))
            return
        txn.bdat = True
        if too_big:
            txn.failed = True
            self._say(TOO_BIG)
            return
        txn.chunks.append(chunk)
        txn.size += size
        if last:
            data = b"".join(txn.chunks)
            yield from self._end_of_message(data, "BDAT", oversize=False, fault=fault)
            return
        if fault is not None:
            yield from self._fault_before(fault)
            if fault.code is not None and fault.code >= 400:
                txn.failed = True
            if self._fault_reply(fault):
                return
        self._reply(250, "2.0.0", f"Ok: {size} octets received")
        self._fault_after(fault)

    def _end_of_message(
        self,
        content: bytes,
        transfer: Literal["DATA", "BDAT"],
        *,
        oversize: bool,
        fault: Fault | None = None,
    ) -> _Flow[None]:
        """Check, store and answer a complete message; ends the transaction."""
        txn = self._txn
        assert txn is not None
        self._txn = None
        data, verdict = judge_message(
            content,
            transfer,
            oversize=oversize,
            max_size=self._config.max_message_size,
            eight_bit_ok=txn.eight_bit_ok,
            strict=self._config.strict,
        )
        self._check_sync(".")  # only bites without PIPELINING
        if self._faults:
            fault = self._faults.match(".", txn.number) or fault
            self._check_sync(".", fault)
        refuse = transfer == "DATA" and (
            self._config.refuse_pipelined_after_data
            or (fault is not None and fault.refuse_pipelined)
        )
        if fault is not None:
            if fault.delay:
                yield Pause(fault.delay)
            # A 2xx fault, or a reply lost after queueing (RFC 1047), still stores.
            accepted = verdict is None and (
                fault.drop == "before_reply" or (fault.code is not None and fault.code < 300)
            )
            if accepted:
                yield from self._store(txn, data, transfer)
            if fault.drop == "before_reply":
                raise _Abort
            if fault.replaces_reply:
                self._fault_reply(fault)
                if refuse:
                    self._refuse_pipelined()
                return
        if verdict is not None:
            self._say(verdict)
        else:
            queue_id = yield from self._store(txn, data, transfer)
            if queue_id is None:
                self._reply(452, "4.3.1", "Error: insufficient system storage")
            else:
                self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        self._fault_after(fault)
        if refuse:
            self._refuse_pipelined()

    def _refuse_pipelined(self) -> None:
        """Answer each whole line already behind the end of data with 503, as Haraka
        does since its SMTP-smuggling hardening (advisory GHSA-rp4q-8m6x-c43c)."""
        buf = self._buf
        while (end := buf.find(b"\n")) >= 0:
            del buf[: end + 1]
            self._reply(503, "5.5.0", "Bad sequence of commands - pipelined after end of DATA")

    def _store(
        self, txn: _Transaction, data: bytes, transfer: Literal["DATA", "BDAT"]
    ) -> _Flow[str | None]:
        self._queue_id = None
        yield Captured(
            CapturedMessage(
                mail_from=txn.mail_from,
                rcpt_to=txn.rcpt_to,
                mail_options=txn.mail_options,
                rcpt_options=txn.rcpt_options,
                data=data,
                tls=self._tls,
                authenticated_as=self._user,
                peer=self._peer,
                helo=self._helo,
                transfer=transfer,
            )
        )
        if self._queue_id is not None:
            self._delivered += 1
        return self._queue_id

    def _rset(self, arg: str) -> None:
        if arg:
            self._reply(501, "5.5.4", "Syntax: RSET")
            return
        self._txn = None
        self._reply(250, "2.0.0", "Ok")

    def _noop(self, arg: str) -> None:
        self._reply(250, "2.0.0", "Ok")  # RFC 5321 §4.1.1.9: any argument is ignored

    def _vrfy(self, arg: str) -> None:
        if not arg:
            self._reply(501, "5.5.4", "Syntax: VRFY address")
            return
        # RFC 5321 §3.5.3: 252 when the server will not verify but accepts mail.
        self._reply(252, "2.0.0", "Cannot VRFY user, but will accept message")

    def _expn(self, arg: str) -> None:
        self._reply(502, "5.5.1", "Error: command not implemented")

    def _help(self, arg: str) -> None:
        self._reply(214, "2.0.0", "Commands: " + " ".join(sorted(self._handlers)))

    def _quit(self, arg: str) -> None:
        if arg:
            self._reply(501, "5.5.4", "Syntax: QUIT")
            return
        self._reply(221, "2.0.0", "Bye")
        raise _Close
