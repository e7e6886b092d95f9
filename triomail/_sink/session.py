"""One server-side SMTP session of the capture server (see :mod:`triomail._sink.server`).

A :class:`Session` owns one stream, one input buffer and one output buffer. It reads
a command line, answers into the output buffer, and only writes the output buffer
when it needs more input (or before a delay, a close or TLS). Pipelined commands
(RFC 2920) therefore get their replies in order and in one write, which is also
what keeps the sink cheap per message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import math
import re
from collections.abc import Awaitable, Callable
from typing import Literal

import trio

from .config import SinkConfig
from .faults import Fault, FaultBook
from .message import CapturedMessage
from .syntax import (
    Verdict,
    check_content,
    find_unstuffed_dot,
    format_reply,
    parse_esmtp_params,
    parse_path_argument,
    unstuff,
)

__all__ = ["Session"]

_RECEIVE_SIZE = 65536
_HANDSHAKE_TIMEOUT = 30.0
# RFC 2920 §3.1: these may only be the last command of a pipelined group.
_GROUP_END = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "HELP", "STARTTLS"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RCPT_PATH = re.compile(r"TO:<([^>]*)>", re.IGNORECASE)
_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?: +(LAST))?", re.IGNORECASE)
_END_OF_DATA = b"\r\n.\r\n"


class _Drop(Exception):
    """Close the connection abruptly, without another reply."""


class _Close(Exception):
    """Send the pending replies, then close the connection."""


class _PeerGone(Exception):
    """The client closed its side."""


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


class Session:
    """Serve one connection; :meth:`run` returns when it is closed."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: tuple[str, int],
        settings: SinkConfig,
        faults: FaultBook,
        deliver: Callable[[CapturedMessage], str | None],
    ) -> None:
        self._stream = stream
        self._peer = peer
        self._settings = settings
        self._faults = faults
        self._deliver = deliver
        self._idle = math.inf if settings.idle_timeout <= 0 else settings.idle_timeout
        # RFC 5321 §4.1.1.4 dot-stuffing can grow a message by at most a third, so
        # this bounds what DATA buffers before switching to counting only.
        self._wire_limit = settings.max_message_size * 4 // 3 + 1024
        self._buf = bytearray()
        self._out = bytearray()
        self._tls = False
        self._greeted = False
        self._helo = ""
        self._ext: frozenset[str] = frozenset()
        self._enhanced = False
        self._user: str | None = None
        self._txn: _Transaction | None = None
        self._mail_number = 0
        self._delivered = 0
        self._rejected = False
        self._data_pending = False
        self._data_drop: int | None = None
        self._handlers: dict[str, Callable[[str], Awaitable[None]]] = {
            "EHLO": self._ehlo, "HELO": self._helo_cmd, "STARTTLS": self._starttls,
            "AUTH": self._auth, "MAIL": self._mail, "RCPT": self._rcpt, "DATA": self._data,
            "BDAT": self._bdat, "RSET": self._rset, "NOOP": self._noop, "VRFY": self._vrfy,
            "EXPN": self._expn, "HELP": self._help, "QUIT": self._quit,
        }  # fmt: skip

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until QUIT, EOF, an error or a fault; always closes the stream."""
        broken = (trio.BrokenResourceError, trio.ClosedResourceError)
        try:
            try:
                await self._serve()
            except _Close:
                with contextlib.suppress(*broken):
                    await self._flush()
                    with trio.move_on_after(1.0):
                        await self._stream.aclose()  # TLS: sends close_notify
            except _Drop:
                # Replies already due (earlier pipelined commands) still go out.
                with contextlib.suppress(*broken):
                    await self._flush()
            except (_PeerGone, *broken):
                pass
        finally:
            # Also on cancellation (the sink is closing); no TLS close_notify here.
            await trio.aclose_forcefully(self._stream)

    async def _serve(self) -> None:
        if self._settings.implicit_tls:
            await self._start_tls()  # RFC 8314 §3.3: TLS before the greeting
        await self._greet()
        while True:
            if self._data_pending:
                await self._receive_data()
            else:
                await self._dispatch(await self._read_line())

    async def _greet(self) -> None:
        fault = self._faults.match("CONNECT", None) if self._faults else None
        if fault is not None:
            await self._fault_before(fault)
            if await self._fault_reply(fault):
                # RFC 5321 §3.1: after a 554 (or other refusal) greeting the server
                # answers everything but QUIT with 503.
                self._rejected = fault.code is not None and fault.code != 220
                return
        self._out += f"220 {self._settings.hostname} ESMTP triomail sink\r\n".encode()
        await self._fault_after(fault)

    # --- I/O -----------------------------------------------------------------------

    async def _flush(self) -> None:
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            await self._stream.send_all(data)

    async def _fill(self) -> None:
        """Send pending replies, then wait (at most the idle timeout) for input."""
        await self._flush()
        with trio.move_on_after(self._idle):
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise _PeerGone
            self._buf += data
            return
        # RFC 5321 §4.5.3.2.7 server timeout; text as Postfix's.
        self._reply(421, "4.4.2", f"{self._settings.hostname} Error: timeout exceeded")
        raise _Close

    async def _read_line(self) -> bytes | None:
        """Return the next line with its terminator, or None if it was too long."""
        limit = self._settings.max_line_length
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
                    await self._fill()
                    end = self._buf.find(b"\n")
                    if end >= 0:
                        del self._buf[: end + 1]
                        return None
                    self._buf.clear()
            await self._fill()

    async def _read_chunk(self, size: int, *, keep: bool) -> bytes:
        """Read exactly ``size`` octets of BDAT data (kept only if ``keep``)."""
        parts: list[bytes] = []
        while size:
            if not self._buf:
                await self._fill()
            take = min(size, len(self._buf))
            if keep:
                parts.append(bytes(self._buf[:take]))
            del self._buf[:take]
            size -= take
        return b"".join(parts)

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        # RFC 2034 §3: enhanced codes only once advertised (so not before EHLO).
        self._out += format_reply(code, enhanced if self._enhanced else None, text)

    def _say(self, verdict: Verdict) -> None:
        self._reply(verdict.code, verdict.enhanced, verdict.text)

    def _check_sync(self, verb: str) -> None:
        """Reject input that arrived before a reply the client had to wait for."""
        if not self._buf or not self._settings.strict or verb == "QUIT":
            return
        if verb in _GROUP_END or "PIPELINING" not in self._ext:
            self._reply(554, "5.5.0", "Error: SMTP protocol synchronization")
            raise _Close

    # --- faults --------------------------------------------------------------------

    async def _fault_before(self, fault: Fault) -> None:
        if fault.delay:
            await self._flush()
            await trio.sleep(fault.delay)
        if fault.drop == "before_reply":
            raise _Drop

    async def _fault_reply(self, fault: Fault) -> bool:
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
        await self._fault_after(fault)
        if fault.code == 421:
            raise _Close  # RFC 5321 §3.8: 421 means the server closes
        return True

    async def _fault_after(self, fault: Fault | None) -> None:
        if fault is not None and fault.drop == "after_reply":
            await self._flush()
            raise _Drop

    # --- commands ------------------------------------------------------------------

    def _parse_line(self, line: bytes | None) -> tuple[str, str] | Verdict:
        if line is None:
            return Verdict(500, "5.5.6", "Error: line too long")
        if not line.endswith(b"\r\n"):
            # RFC 5321 §2.3.8; Postfix smtpd_forbid_bare_newline does the same.
            return Verdict(500, "5.5.2", "Error: bare <LF> received")
        body = line[:-2]
        if b"\r" in body:
            return Verdict(500, "5.5.2", "Error: bare <CR> received")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return Verdict(500, "5.5.2", "Error: invalid UTF-8 in command")
        if _CONTROL.search(text):
            return Verdict(500, "5.5.2", "Error: control character in command")
        verb, _, arg = text.partition(" ")
        return verb.upper(), arg

    async def _dispatch(self, line: bytes | None) -> None:
        parsed = self._parse_line(line)
        if isinstance(parsed, Verdict):
            self._say(parsed)
            return
        verb, arg = parsed
        if self._rejected:
            if verb == "QUIT":
                await self._quit("")
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
            await self._bdat(arg)
            return
        fault = None
        if self._faults:
            number = self._mail_number if verb == "MAIL" else self._txn_number()
            recipient = None
            if verb == "RCPT" and (match := _RCPT_PATH.match(arg)):
                recipient = match[1]
            fault = self._faults.match(verb, number, recipient)
        if fault is not None:
            await self._fault_before(fault)
            if await self._fault_reply(fault):
                return
        await handler(arg)
        if fault is not None:
            await self._fault_after(fault)
            if fault.drop == "during_data" and self._data_pending:
                self._data_drop = fault.after_bytes

    def _txn_number(self) -> int | None:
        return None if self._txn is None else self._txn.number

    def _extensions(self) -> list[str]:
        s = self._settings
        lines = [
            "PIPELINING", f"SIZE {s.max_message_size}", "8BITMIME", "SMTPUTF8", "DSN",
            "ENHANCEDSTATUSCODES", "CHUNKING",
        ]  # fmt: skip
        if s.tls_context is not None and not self._tls:
            lines.append("STARTTLS")
        if s.auth and (self._tls or s.allow_insecure_auth):
            lines.append("AUTH " + " ".join(s.auth_mechanisms))
        lines = [line for line in lines if line.split(" ")[0] not in s.hide_extensions]
        return lines + list(s.extra_extensions)

    async def _ehlo(self, arg: str) -> None:
        if not arg or " " in arg:
            self._reply(501, "5.5.4", "Syntax: EHLO hostname")
            return
        lines = self._extensions()
        self._txn = None  # RFC 5321 §4.1.4: EHLO implies RSET
        self._greeted, self._helo = True, arg
        self._ext = frozenset(line.split(" ")[0].upper() for line in lines)
        self._enhanced = "ENHANCEDSTATUSCODES" in self._ext
        greeting = f"{self._settings.hostname} Hello {arg}"
        self._out += format_reply(250, None, "\n".join([greeting, *lines]))

    async def _helo_cmd(self, arg: str) -> None:
        if not arg or " " in arg:
            self._reply(501, "5.5.4", "Syntax: HELO hostname")
            return
        self._txn = None
        self._greeted, self._helo = True, arg
        self._ext, self._enhanced = frozenset(), False  # no extensions after HELO
        self._out += format_reply(250, None, self._settings.hostname)

    async def _starttls(self, arg: str) -> None:
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
            await self._flush()
            await self._start_tls()
            # RFC 3207 §4.2: discard all knowledge obtained from the client.
            self._greeted, self._helo, self._ext, self._enhanced = False, "", frozenset(), False
            self._txn, self._user = None, None

    async def _start_tls(self) -> None:
        context = self._settings.tls_context
        assert context is not None
        stream = trio.SSLStream(self._stream, context, server_side=True)
        self._stream = stream
        with trio.move_on_after(min(self._idle, _HANDSHAKE_TIMEOUT)) as scope:
            await stream.do_handshake()
        if scope.cancelled_caught:
            raise _Drop
        self._tls = True

    async def _auth(self, arg: str) -> None:
        s = self._settings
        if not self._greeted:
            self._reply(503, "5.5.1", "Error: send EHLO first")
        elif "AUTH" not in self._ext:
            if s.auth and not self._tls and s.tls_context is not None:
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
            if mechanism not in s.auth_mechanisms:
                self._reply(504, "5.5.4", "Error: unsupported authentication mechanism")
            elif mechanism == "PLAIN":
                await self._auth_plain(initial)
            else:
                await self._auth_login(initial)

    async def _auth_plain(self, initial: str) -> None:
        # RFC 4616: [authzid] NUL authcid NUL passwd; RFC 4954 §4: "=" is empty.
        response = self._b64(initial) if initial else await self._sasl("")
        if response is None:
            return
        parts = response.split(b"\0")
        if len(parts) != 3:
            self._reply(501, "5.5.2", "Error: malformed authentication response")
            return
        try:
            authzid, user, password = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            self._reply(501, "5.5.2", "Error: malformed authentication response")
            return
        self._check_credentials(user, password, authzid in ("", user))

    async def _auth_login(self, initial: str) -> None:
        raw_user = self._b64(initial) if initial else await self._sasl("VXNlcm5hbWU6")
        if raw_user is None:
            return
        raw_password = await self._sasl("UGFzc3dvcmQ6")
        if raw_password is None:
            return
        try:
            user, password = raw_user.decode("utf-8"), raw_password.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(501, "5.5.2", "Error: malformed authentication response")
            return
        self._check_credentials(user, password, True)

    def _check_credentials(self, user: str, password: str, authz_ok: bool) -> None:
        expected = self._settings.auth.get(user)
        ok = expected is not None and hmac.compare_digest(
            expected.encode("utf-8"), password.encode("utf-8")
        )
        if ok and authz_ok:
            self._user = user
            self._reply(235, "2.7.0", "Authentication successful")
        else:
            self._reply(535, "5.7.8", "Error: authentication failed")

    def _b64(self, text: str | bytes) -> bytes | None:
        if text in ("=", b"="):
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._reply(501, "5.5.2", "Error: malformed authentication response")
            return None

    async def _sasl(self, challenge: str) -> bytes | None:
        """Send a 334 challenge; return the decoded response or None (replied)."""
        self._check_sync("AUTH-RESPONSE")
        self._out += f"334 {challenge}\r\n".encode()
        line = await self._read_line()
        if line is None or not line.endswith(b"\r\n"):
            self._reply(501, "5.5.2", "Error: malformed authentication response")
            return None
        response = line[:-2]
        if response == b"*":  # RFC 4954 §4: the client cancels; the server MUST send 501
            self._reply(501, "5.7.0", "Error: authentication aborted")
            return None
        return self._b64(response)

    async def _mail(self, arg: str) -> None:
        s = self._settings
        if not self._greeted:
            self._reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self._txn is not None:
            self._reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if s.require_tls and not self._tls:
            self._reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if s.require_auth and self._user is None:
            self._reply(530, "5.7.0", "Authentication required")  # RFC 4954 §6
            return
        limit = s.messages_per_connection
        if limit is not None and self._delivered >= limit:
            self._reply(421, "4.7.0", f"{s.hostname} Error: too many messages in one session")
            raise _Close
        path = parse_path_argument(arg, "FROM", utf8=True)
        if isinstance(path, Verdict):
            self._say(path)
            return
        address, param_text = path
        params = parse_esmtp_params(param_text, "MAIL", self._ext, max_size=s.max_message_size)
        if isinstance(params, Verdict):
            self._say(params)
            return
        options, values = params
        if not address.isascii() and "SMTPUTF8" not in values:
            self._reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")  # RFC 6531 §3.5
            return
        self._txn = _Transaction(self._mail_number, address, options, values)
        self._reply(250, "2.1.0", "Ok")

    async def _rcpt(self, arg: str) -> None:
        s = self._settings
        txn = self._txn
        if txn is None:
            self._reply(503, "5.5.1", "Error: need MAIL command")
            return
        if txn.bdat:
            self._reply(503, "5.5.1", "Error: RCPT after BDAT")
            return
        path = parse_path_argument(arg, "TO", utf8="SMTPUTF8" in txn.params)
        if isinstance(path, Verdict):
            self._say(path)
            return
        address, param_text = path
        params = parse_esmtp_params(param_text, "RCPT", self._ext, max_size=s.max_message_size)
        if isinstance(params, Verdict):
            self._say(params)
            return
        if len(txn.rcpt_to) >= s.max_recipients:
            self._reply(452, "4.5.3", "Error: too many recipients")  # RFC 5321 §4.5.3.1.10
            return
        txn.rcpt_to.append(address)
        txn.rcpt_options.append(params[0])
        self._reply(250, "2.1.5", "Ok")

    def _transfer_error(self, txn: _Transaction | None) -> Verdict | None:
        if txn is None:
            return Verdict(503, "5.5.1", "Error: need MAIL command")
        if not txn.rcpt_to:
            # RFC 2920 §3.1 / RFC 5321 §3.3: no valid recipients.
            return Verdict(554, "5.5.1", "Error: no valid recipients")
        return None

    async def _data(self, arg: str) -> None:
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

    async def _receive_data(self) -> None:
        """Read message text up to <CRLF>.<CRLF> (RFC 5321 §4.1.1.4), bounded."""
        self._data_pending = False
        drop_after, self._data_drop = self._data_drop, None
        buf = self._buf
        buf[0:0] = b"\r\n"  # the CRLF that ended "DATA" starts the first line
        start = discarded = 0
        while True:
            if drop_after is not None and discarded + len(buf) - 2 >= drop_after:
                await self._flush()
                raise _Drop
            end = buf.find(_END_OF_DATA, start)
            if end >= 0:
                break
            if len(buf) > self._wire_limit:  # too big: keep counting, stop storing
                discarded += len(buf) - 4
                del buf[:-4]
            start = max(0, len(buf) - 4)
            await self._fill()
        wire = b"" if discarded else bytes(buf[2 : end + 2])
        del buf[: end + len(_END_OF_DATA)]
        await self._end_of_message(wire, "DATA", oversize=discarded > 0)

    async def _bdat(self, arg: str) -> None:
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
        too_big = txn is not None and txn.size + size > self._settings.max_message_size
        if fault is not None and fault.drop == "during_data":
            await self._read_chunk(min(size, fault.after_bytes), keep=False)
            await self._flush()
            raise _Drop
        # RFC 3030 §2: the chunk is always read, even when it is rejected.
        chunk = await self._read_chunk(size, keep=error is None and not too_big)
        self._check_sync("BDAT")
        if error is not None or txn is None:
            self._say(error or Verdict(503, "5.5.1", "Error: need MAIL command"))
            return
        txn.bdat = True
        if too_big:
            txn.failed = True
            self._reply(552, "5.3.4", "Error: message file too big")
            return
        txn.chunks.append(chunk)
        txn.size += size
        if last:
            data = b"".join(txn.chunks)
            await self._end_of_message(data, "BDAT", oversize=False, fault=fault)
            return
        if fault is not None:
            await self._fault_before(fault)
            if fault.code is not None and fault.code >= 400:
                txn.failed = True
            if await self._fault_reply(fault):
                return
        self._reply(250, "2.0.0", f"Ok: {size} octets received")
        await self._fault_after(fault)

    async def _end_of_message(
        self,
        content: bytes,
        transfer: Literal["DATA", "BDAT"],
        *,
        oversize: bool,
        fault: Fault | None = None,
    ) -> None:
        """Check, store and answer a complete message; ends the transaction."""
        txn = self._txn
        assert txn is not None
        self._txn = None
        s = self._settings
        data = unstuff(content) if transfer == "DATA" else content
        verdict: Verdict | None
        if oversize or len(data) > s.max_message_size:
            verdict = Verdict(552, "5.3.4", "Error: message file too big")
        else:
            verdict = check_content(data, eight_bit_ok=txn.eight_bit_ok, strict=s.strict)
        if verdict is None and s.strict and transfer == "DATA" and find_unstuffed_dot(content):
            verdict = Verdict(550, "5.5.2", 'Error: line starts with an unstuffed "."')
        self._check_sync(".")  # only bites without PIPELINING
        if self._faults:
            fault = self._faults.match(".", txn.number) or fault
        if fault is not None:
            await self._fault_before_store(fault, txn, data, transfer, verdict)
            if fault.replaces_reply:
                await self._fault_reply(fault)
                return
        if verdict is not None:
            self._say(verdict)
        else:
            queue_id = self._store(txn, data, transfer)
            if queue_id is None:
                self._reply(452, "4.3.1", "Error: insufficient system storage")
            else:
                self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        await self._fault_after(fault)

    async def _fault_before_store(
        self,
        fault: Fault,
        txn: _Transaction,
        data: bytes,
        transfer: Literal["DATA", "BDAT"],
        verdict: Verdict | None,
    ) -> None:
        if fault.delay:
            await self._flush()
            await trio.sleep(fault.delay)
        accepted = verdict is None and (
            fault.drop == "before_reply" or (fault.code is not None and fault.code < 300)
        )
        if accepted:
            self._store(txn, data, transfer)
        if fault.drop == "before_reply":
            raise _Drop

    def _store(
        self, txn: _Transaction, data: bytes, transfer: Literal["DATA", "BDAT"]
    ) -> str | None:
        message = CapturedMessage(
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
        queue_id = self._deliver(message)
        if queue_id is not None:
            self._delivered += 1
        return queue_id

    async def _rset(self, arg: str) -> None:
        if arg:
            self._reply(501, "5.5.4", "Syntax: RSET")
            return
        self._txn = None
        self._reply(250, "2.0.0", "Ok")

    async def _noop(self, arg: str) -> None:
        self._reply(250, "2.0.0", "Ok")  # RFC 5321 §4.1.1.9: any argument is ignored

    async def _vrfy(self, arg: str) -> None:
        if not arg:
            self._reply(501, "5.5.4", "Syntax: VRFY address")
            return
        # RFC 5321 §3.5.3: 252 when the server will not verify but accepts mail.
        self._reply(252, "2.0.0", "Cannot VRFY user, but will accept message")

    async def _expn(self, arg: str) -> None:
        self._reply(502, "5.5.1", "Error: command not implemented")

    async def _help(self, arg: str) -> None:
        self._reply(214, "2.0.0", "Commands: " + " ".join(sorted(self._handlers)))

    async def _quit(self, arg: str) -> None:
        if arg:
            self._reply(501, "5.5.4", "Syntax: QUIT")
            return
        self._reply(221, "2.0.0", "Bye")
        raise _Close
