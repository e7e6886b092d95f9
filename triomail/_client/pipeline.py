"""Many messages on one connection: PIPELINING across transactions, and CHUNKING.

Theory of operation
-------------------
:func:`send_pipelined` (``SMTPConnection.send_many``) sends a batch of prepared messages
over one connection and returns one :class:`~triomail.SendResult` per message, in order,
each as :meth:`SMTPConnection.send` would report it. It drives the connection's own I/O
methods (``_write``/``_read``, so every deadline, the 421 handling and the error
translation are the connection's) and adds only the scheduling:

* **Expected replies.** Every command written appends a *slot* (what it was, which
  message) to a FIFO; every reply read takes the next slot. Replies are matched one for
  one, in order, never by content (RFC 2920 §3.1, R29; R42: a 452 then 250s maps each
  reply to its own recipient).

* **DATA (PIPELINING).** One write carries ``MAIL``, the ``RCPT``\\ s and ``DATA`` of a
  message. Its body can only follow the 354, so it travels at the *front of the next
  write*, together with ``MAIL``/``RCPT``/``DATA`` of the next message (RFC 2920 allows
  message content as the first "command" of a group): about one round trip per message.
  If the previous transaction had MAIL accepted but did not reach the end of data,
  ``RSET`` leads the next group instead, so nothing leaks from one transaction into the
  next (no "nested MAIL"). A 354 with no recipient accepted gets just ``.\\r\\n`` (R29).
  After each group the server must have nothing more to say until it gets the body, so
  the read buffer is checked empty there (R24).

* **BDAT (CHUNKING).** Whole transactions (``MAIL``, ``RCPT``\\ s, ``BDAT <n> LAST`` and
  the exact canonical octets, R20) go back to back, up to :data:`WINDOW_MESSAGES`
  messages or :data:`WINDOW_BYTES` per write; the replies to one window are read while
  the next is on the wire. A message is one chunk, so after a 4xx/5xx to it there are no
  further chunks by construction. RFC 1830/3030 leave the server's state after a failed
  ``BDAT`` indeterminate and require ``RSET`` before anything else; since the client
  cannot know, when it writes the next ``MAIL``, whether the previous ``BDAT`` will fail,
  every transaction whose predecessor's outcome is not yet known is preceded by ``RSET``
  (cheap: no round trip). Messages over :data:`WINDOW_BYTES`, or with more than
  :data:`RCPT_GROUP` recipients, are sent on their own: envelope first, and the data
  only if a recipient was accepted.

* **Bounded writes.** At most :data:`RCPT_GROUP` recipients per write and a bounded
  window, so the replies owed never exceed what socket buffers hold and the single task
  cannot deadlock against a server that stops reading until it has written (R29). A
  large body is written in :data:`DATA_CHUNK` pieces, each ``send_all`` under its own
  deadline (R46).

* **Failures.** A ``421`` anywhere stops the batch: the message it answered is reported
  as ``send`` would, the messages already on the wire behind it are transient (the
  server closes without acting on them) and every later message is transient with an
  error saying it was never started. A lost connection, a timeout or a protocol error
  likewise, except that a message whose final octet was written and whose reply was not
  read is *unknown* (R37). When a write fails, replies the server sent before giving up
  are still read (briefly) and used, as ``send`` does for an early reply (R46).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import trio

from .._core.errors import (
    LocalProtocolError,
    SMTPDisconnected,
    SMTPError,
    SMTPProtocolError,
    SMTPTimeoutError,
)
from .._core.protocol import Canonical
from .._core.reply import Reply
from .._core.results import Outcome, RecipientResult, SendResult, outcome_of, transaction_result

if TYPE_CHECKING:
    from .connection import DSN, PreparedMessage, SMTPConnection

__all__ = ["send_pipelined"]

log = logging.getLogger("triomail")

#: RCPT commands per write; a bounded group cannot deadlock against a small window (R29).
RCPT_GROUP = 100
#: A BDAT window: at most this many messages ...
WINDOW_MESSAGES = 32
#: ... or this many octets per write.
WINDOW_BYTES = 1 << 20
#: ... or this many replies owed for one window (they must fit in socket buffers).
WINDOW_REPLIES = 512
#: Message content larger than this is written in pieces of this size (R46).
DATA_CHUNK = 256 * 1024
#: How long to keep reading replies after a write failed (as ``send``'s early reply).
SALVAGE_SECONDS = 1.0
#: Reads that wait for the socket at once after an early try found no reply.
EAGER_PAUSE = 32

# Slot kinds: what a pending reply answers.
_RSET, _MAIL, _RCPT, _DATA, _DOT, _BDAT = range(6)
_STAGES = ("RSET", "MAIL", "RCPT", "DATA", "end of data", "BDAT")

_RECEIVE_SIZE = 65536
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

_RSET_LINE = b"RSET\r\n"
_DATA_LINE = b"DATA\r\n"
_DOT_LINE = b".\r\n"


class _Stop(Exception):
    """Internal: the server said 421; it acts on nothing after that reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Txn:
    """One message's transaction and what the server has said about it so far."""

    __slots__ = (
        "accepted",
        "canonical",
        "clean",
        "data_reply",
        "done",
        "final_maybe",
        "final_written",
        "index",
        "mail",
        "mail_ok",
        "mail_reply",
        "prepared",
        "rcpt_replies",
        "rcpts",
        "rset_failed",
        "started",
    )

    def __init__(
        self,
        index: int,
        prepared: PreparedMessage,
        mail: bytes,
        rcpts: list[bytes],
        canonical: Canonical,
    ) -> None:
        self.index = index
        self.prepared = prepared
        self.mail = mail
        self.rcpts = rcpts
        self.canonical = canonical
        self.rcpt_replies: list[Reply | None] = [None] * len(rcpts)
        self.mail_reply: Reply | None = None
        self.mail_ok = False
        self.accepted = 0
        self.data_reply: Reply | None = None
        self.started = False  # MAIL has been (or is being) written
        self.final_written = False  # the last octet of the content is on the wire
        self.final_maybe = False  # a write holding the last octet failed part-way
        self.rset_failed: Reply | None = None  # the RSET in front of it was refused
        self.clean = False  # BDAT mode: the server is certainly outside any transaction
        self.done = False


def _stuffed(canonical: Canonical) -> tuple[bytes, bytes]:
    """The DATA content as (body, terminator): ``body + terminator == dot_stuff(canonical)``.

    Kept in two parts so that a message needing no transparency dots is not copied just
    to append ``.\\r\\n`` (the write that carries it joins the parts anyway).
    """
    data = canonical.data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if data[:1] == b".":
        data = b"." + data
    return data, _DOT_LINE


class _Batch:
    """The state of one :func:`send_pipelined` call."""

    def __init__(
        self,
        conn: SMTPConnection,
        results: list[SendResult | None],
        txns: list[_Txn],
        on_result: Callable[[int, SendResult], None] | None,
        lazy: Iterator[PreparedMessage] | None = None,
        dsn: DSN | None = None,
        requiretls: bool = False,
    ) -> None:
        self.conn = conn
        self.results = results
        self.txns = txns  # every transaction taken so far (all of them for a Sequence)
        self.on_result = on_result
        self.lazy = lazy  # messages not taken yet, for an iterable that is not a Sequence
        self.dsn = dsn
        self.requiretls = requiretls
        self.last: _Txn | None = None  # the transaction taken last
        self.slots: deque[tuple[int, _Txn, int]] = deque()
        self.need_rset = False  # DATA mode: the last transaction must be reset
        self.body_due: _Txn | None = None  # DATA mode: 354 received, body not yet sent
        t = conn._timeouts
        self.seconds = (t.rset, t.mail, t.rcpt, t.data_init, t.data_done, t.data_done)
        self.stop_reason: str | None = None  # set when a refused RSET ends the batch
        self.scope = trio.CancelScope()  # replaced by the running batch's scope
        self.stage = "MAIL"
        self.stage_seconds = t.mail
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.now = trio.lowlevel.current_clock().current_time  # one call, not three
        # A plain TCP stream is driven through its socket (os.write, wait_readable and
        # os.read): no per-call wrapper, no failed recv before each wait, no deadline
        # for a write the kernel takes at once. TLS and other streams use the stream.
        stream = conn._stream
        self.fd: int | None = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        self.awaiting = 0  # messages whose content is written and whose reply is not read
        self.eager_pause = 0  # reads left that skip the early try of the socket

    # ------------------------------------------------------------------ messages

    def pending(self) -> Iterator[_Txn]:
        """The transactions in order; from an iterator, each planned only when reached."""
        if self.lazy is None:
            for txn in self.txns:
                self.last = txn
                yield txn
            return
        conn = self.conn
        for prepared in self.lazy:
            index = len(self.results)
            self.results.append(None)
            try:
                plan = conn._plan(prepared, dsn=self.dsn, requiretls=self.requiretls)
            except LocalProtocolError as exc:
                # Earlier messages may be on the wire already: report it, do not raise.
                plan = _refused(prepared, str(exc))
            if isinstance(plan, SendResult):
                self.record(index, plan)
                continue
            txn = _Txn(index, prepared, *plan)
            self.txns.append(txn)
            self.last = txn
            yield txn

    def record(self, index: int, result: SendResult) -> None:
        self.results[index] = result
        if self.on_result is not None:
            self.on_result(index, result)

    # ------------------------------------------------------------------ results

    def finish(
        self, txn: _Txn, outcome: Outcome, reply: Reply | None, error: str | None = None
    ) -> None:
        """Record ``txn``'s result the way ``SMTPConnection.send`` builds it."""
        if txn.done:
            return
        txn.done = True
        result = transaction_result(
            txn.prepared, txn.rcpt_replies, outcome, reply, error, txn.mail_ok
        )
        self.record(txn.index, result)

    def settle(self, error: str, *, closing: bool = False) -> None:
        """The connection is gone: classify everything still open (R37).

        ``closing``: the server said 421, so it acted on nothing behind that reply and
        no message in flight can have been delivered.
        """
        for txn in self.txns:
            if txn.done:
                continue
            if not txn.started:
                self.finish(
                    txn,
                    Outcome.TRANSIENT,
                    None,
                    f"not sent: never started, the connection ended first ({error})",
                )
            elif (txn.final_written or txn.final_maybe) and not closing:
                self.finish(txn, Outcome.UNKNOWN, None, error)
            else:
                self.finish(txn, Outcome.TRANSIENT, None, error)
        if self.lazy is not None:
            # One result per message: those not taken yet were never started either.
            for prepared in self.lazy:
                self.results.append(None)
                self.record(len(self.results) - 1, _never_started(prepared, error))
        self.conn.awaiting_final_reply = self.awaiting > 0 and not closing
        if self.conn.awaiting_final_reply:
            log.warning(
                "%s: connection lost with messages awaiting their final reply; "
                "they may have been delivered",
                self.conn.host,
            )

    # ------------------------------------------------------------------ replies

    async def drain(self, keep: int = 0) -> None:
        """Read and apply replies until only ``keep`` slots are still owed."""
        slots = self.slots
        apply = self.apply
        conn = self.conn
        parser = conn._parser
        while len(slots) > keep:
            kind, txn, i = slots.popleft()
            # Most replies of a group are already buffered: no coroutine for those.
            try:
                reply = parser.next_reply()
            except BaseException:
                conn._broken = conn._broken or f"protocol error in {_STAGES[kind]}"
                raise
            if reply is None:
                reply = await self.read(kind)
            if self.debug:
                log.debug("%s %s < %s", conn.host, conn._phase, reply)
            if reply.code == 421:
                conn._broken = "server sent 421"  # RFC 5321 §3.8 (R40)
            apply(kind, txn, i, reply)

    async def read(self, kind: int) -> Reply:
        """Read the stream until the parser completes a reply (``drain`` has found
        none complete in its buffer), under the stage's deadline (R26), set on the
        batch's cancel scope."""
        conn = self.conn
        parser = conn._parser
        stage = _STAGES[kind]
        reply: Reply | None = None
        try:
            if not conn.is_usable:
                raise SMTPDisconnected(f"connection is not usable ({conn._broken or 'closed'})")
            self.arm(stage, self.seconds[kind])
            fd = self.fd
            receive = conn._stream.receive_some
            # Early try: let the other tasks run, then try the socket. When the process
            # is busy (many connections, a fast server) the reply is there by then and
            # no epoll registration and wakeup is needed. When it is not (a slow link),
            # the next EAGER_PAUSE reads wait for the socket at once instead.
            eager = self.eager_pause == 0
            if not eager:
                self.eager_pause -= 1
            ready = not eager
            while reply is None:
                if fd is None:
                    data = await receive(_RECEIVE_SIZE)
                else:
                    if ready:
                        await trio.lowlevel.wait_readable(fd)
                    else:
                        await trio.lowlevel.checkpoint()
                        ready = True
                    try:
                        data = os.read(fd, _RECEIVE_SIZE)
                    except BlockingIOError:
                        if eager:
                            eager = False
                            self.eager_pause = EAGER_PAUSE
                        continue
                if not data:
                    raise SMTPDisconnected(
                        f"connection lost during {stage}: server closed the connection"
                    )
                parser.feed(data)
                reply = parser.next_reply()
        except _GONE as exc:
            conn._broken = f"broken in {stage}"
            raise SMTPDisconnected(f"connection lost during {stage}: {exc!r}") from exc
        except BaseException as exc:
            # Protocol errors, cancellation, bugs: a reply is half read; never reuse.
            conn._broken = conn._broken or f"{type(exc).__name__} in {stage}"
            raise
        return reply

    def arm(self, stage: str, seconds: float) -> None:
        """Point the batch's deadline at this operation (one scope, not one per I/O).

        A deadline set less than 1% of ``seconds`` ago for as long an operation is kept
        (at most 1% stricter than asked, never later): a steady pipeline re-arms every
        few seconds instead of for every reply.
        """
        self.stage = stage
        self.stage_seconds = seconds
        due = self.now() + seconds
        if not due - seconds * 0.01 <= self.scope.deadline <= due:
            self.scope.deadline = due

    def apply(self, kind: int, txn: _Txn, i: int, reply: Reply) -> None:
        """Apply one reply to the transaction it answers (``send``'s rules, per stage)."""
        code = reply.code
        if 300 <= code < 400 and kind != _DATA:
            # A 354 (or any 3xx) where none can be: the replies are out of step (R24, R47).
            self.conn._broken = "unexpected intermediate reply"
            raise SMTPProtocolError(f"unexpected {reply} in reply to {_STAGES[kind]}")
        if kind == _MAIL:
            txn.mail_reply = reply
            if code < 300:
                txn.mail_ok = True
            elif code == 421:
                self.finish(txn, Outcome.TRANSIENT, reply, "server closing (421)")
                raise _Stop("server closing (421)")
            elif txn.rset_failed is not None:
                self.finish(
                    txn, Outcome.TRANSIENT, txn.rset_failed, f"RSET refused: {txn.rset_failed}"
                )
            else:
                self.finish(txn, outcome_of(reply), reply)
        elif kind == _RCPT:
            if not txn.mail_ok:
                return  # answers to RCPT after a refused MAIL are not the recipient's
            txn.rcpt_replies[i] = reply
            if code < 300:
                txn.accepted += 1
            elif code == 421:
                self.finish(txn, Outcome.TRANSIENT, reply, "server closing (421)")
                raise _Stop("server closing (421)")
        elif kind == _DATA:
            txn.data_reply = reply
            if code == 354:
                self.body_due = txn  # with no recipient accepted, the body is just "."
                return
            if code < 400:
                # R47: only 354 lets the body go; a 250 here would claim a delivery.
                self.conn._broken = "unexpected reply to DATA"
                raise SMTPProtocolError(f"unexpected {reply} in reply to DATA")
            if not txn.done:
                self.finish(txn, outcome_of(reply), reply)  # R47: no body after this
            self.need_rset = txn.mail_ok
            if code == 421:
                raise _Stop("server closing (421)")
        elif kind in (_DOT, _BDAT):
            if txn.final_written:
                self.awaiting -= 1
                self.conn.awaiting_final_reply = self.awaiting > 0
            if not txn.done:
                error = None
                if not txn.final_written:
                    error = "server replied before the end of data"
                if txn.mail_ok and txn.accepted and code < 300:
                    self.conn.messages_sent += 1
                if txn.accepted == 0:
                    # R29: every RCPT was refused (each keeps its own reply).
                    self.finish(txn, Outcome.PERMANENT, reply, error)
                else:
                    self.finish(txn, outcome_of(reply), reply, error)
            if kind == _BDAT and code < 300:
                txn.clean = True
            if code == 421:
                raise _Stop("server closing (421)")
        else:  # _RSET
            if code == 421:
                self.finish(txn, Outcome.TRANSIENT, reply, "server closing (421)")
                raise _Stop("server closing (421)")
            if code != 250:
                txn.rset_failed = reply
                self.stop_reason = f"RSET refused: {reply}"

    # -------------------------------------------------------------------- writes

    async def write(
        self, data: bytes, stage: str, seconds: float, finals: Sequence[tuple[_Txn, int]] = ()
    ) -> None:
        """One ``send_all`` under its own deadline (R46); ``finals`` are the messages
        whose last octet this write carries, with the offset where it ends."""
        conn = self.conn
        if not conn.is_usable:
            raise SMTPDisconnected(f"connection is not usable ({conn._broken or 'closed'})")
        if self.debug:
            conn._log_out(data)
        try:
            fd = self.fd
            if fd is None:
                self.arm(stage, seconds)
                await conn._stream.send_all(data)
            else:
                # send_all on the socket itself: one write when the kernel takes it all
                # (the usual case; nothing waited, so no deadline), else wait for room.
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    await self._send_rest(fd, memoryview(data)[sent:], stage, seconds)
        except _GONE as exc:
            conn._broken = f"broken in {stage}"
            for txn, end in finals:
                # Octets before the failure point may have reached the server.
                if end < len(data):
                    txn.final_maybe = True
            await self.salvage()
            raise SMTPDisconnected(f"connection lost during {stage}: {exc!r}") from exc
        except BaseException as exc:
            conn._broken = conn._broken or f"{type(exc).__name__} in {stage}"
            raise
        if finals:
            for txn, _end in finals:
                txn.final_written = True
            self.awaiting += len(finals)
            conn.awaiting_final_reply = True

    async def _send_rest(self, fd: int, view: memoryview, stage: str, seconds: float) -> None:
        """The rest of a write the kernel could not take at once, under the deadline (R46)."""
        self.arm(stage, seconds)
        while view:
            await trio.lowlevel.wait_writable(fd)
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(fd, view) :]

    async def salvage(self) -> None:
        """After a failed write, read what the server said before it gave up (R46)."""
        conn = self.conn
        broken = conn._broken
        with trio.move_on_after(SALVAGE_SECONDS):
            try:
                conn._broken = None
                await self.drain()
            except (SMTPError, _Stop):
                pass
            finally:
                conn._broken = broken


async def send_pipelined(
    conn: SMTPConnection,
    messages: Iterable[PreparedMessage],
    *,
    chunking: bool | None = None,
    dsn: DSN | None = None,
    requiretls: bool = False,
    on_result: Callable[[int, SendResult], None] | None = None,
) -> list[SendResult]:
    """Send ``messages`` over ``conn``; one :class:`SendResult` per message, in order.

    ``chunking``: ``None`` uses BDAT when the server advertises CHUNKING (and
    PIPELINING), ``False`` never does, ``True`` requires it (:class:`LocalProtocolError`
    if not advertised). ``on_result(index, result)`` is called as each result is known
    (useful if the batch may be cancelled). Without PIPELINING this is ``conn.send`` per
    message.

    A :class:`~collections.abc.Sequence` is checked whole before the first byte is
    written, so this raises only what ``send`` raises before writing:
    :class:`LocalProtocolError` for a message no server could take, and
    :class:`SMTPDisconnected` if the connection is closed or went stale while idle.
    Any other iterable (a generator preparing each message, say) is consumed lazily,
    each message planned just before it is written, with no pause between messages; a
    message then found unsendable gets a failed result instead of an exception, and
    if the connection is lost the rest of the iterable is consumed into "never started"
    results. An exception raised by the iterable itself ends the batch mid-way: the
    connection is left unusable and the results so far reach only ``on_result``.
    """
    if not conn.is_usable:
        raise SMTPDisconnected(f"connection is not usable ({conn._broken or 'closed'})")
    caps = conn.capabilities
    if chunking and not caps.chunking:
        raise LocalProtocolError("chunking=True but the server does not advertise CHUNKING")
    if not caps.pipelining:
        return await _one_by_one(conn, messages, dsn, requiretls, on_result)
    results: list[SendResult | None] = []
    txns: list[_Txn] = []
    lazy: Iterator[PreparedMessage] | None = None
    if isinstance(messages, Sequence):
        results = [None] * len(messages)
        for index, prepared in enumerate(messages):
            plan = conn._plan(prepared, dsn=dsn, requiretls=requiretls)
            if isinstance(plan, SendResult):
                results[index] = plan  # refused by the client's own checks: nothing written
                if on_result is not None:
                    on_result(index, plan)
            else:
                txns.append(_Txn(index, prepared, *plan))
    else:
        lazy = iter(messages)
    if txns or lazy is not None:
        if conn.is_stale():
            await conn.abort()
            raise SMTPDisconnected("server closed or wrote to the connection while it was idle")
        batch = _Batch(conn, results, txns, on_result, lazy, dsn, requiretls)
        use_bdat = caps.chunking and chunking is not False
        await _run(batch, _bdat if use_bdat else _data)
    return [r for r in results if r is not None]


async def _one_by_one(
    conn: SMTPConnection,
    messages: Iterable[PreparedMessage],
    dsn: DSN | None,
    requiretls: bool,
    on_result: Callable[[int, SendResult], None] | None,
) -> list[SendResult]:
    """No PIPELINING: ``send`` each message; once the connection is gone, the rest wait."""
    before = conn.transactions
    results: list[SendResult] = []
    for index, prepared in enumerate(messages):
        try:
            result = await conn.send(prepared, dsn=dsn, requiretls=requiretls)
        except SMTPDisconnected as exc:
            if conn.transactions == before:
                raise  # nothing was started: like send()
            result = _never_started(prepared, str(exc))
        results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results


def _refused(prepared: PreparedMessage, reason: str) -> SendResult:
    """A lazily taken message the client cannot send (``send`` would have raised)."""
    reply = Reply.from_lines(554, (f"5.6.0 {reason}",))
    return SendResult(
        prepared.sender,
        tuple(RecipientResult(r, Outcome.PERMANENT, reply) for r in prepared.recipients),
        reply,
        prepared.message_id,
        f"not sent: {reason}",
        tag=prepared.tag,
    )


def _never_started(prepared: PreparedMessage, reason: str) -> SendResult:
    return SendResult(
        prepared.sender,
        tuple(RecipientResult(r, Outcome.TRANSIENT, None) for r in prepared.recipients),
        None,
        prepared.message_id,
        f"not sent: never started, the connection ended first ({reason})",
        tag=prepared.tag,
    )


async def _run(batch: _Batch, driver: Callable[[_Batch], Awaitable[None]]) -> None:
    """Run a driver under the batch's cancel scope; settle whatever it leaves open."""
    conn = batch.conn
    failure: str | None = None
    closing = False
    with trio.CancelScope() as scope:
        batch.scope = scope
        try:
            await driver(batch)
        except _Stop as stop:
            failure, closing = stop.reason, True
        except SMTPError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        except BaseException:
            # Cancelled, or the caller's iterable raised: replies may be owed, so the
            # session cannot be reused (the pool closes it; awaiting_final_reply tells).
            conn._broken = conn._broken or "batch interrupted"
            raise
    if scope.cancelled_caught:
        # The deadline of the operation under way passed (R26).
        conn._broken = f"timeout in {batch.stage}"
        error = SMTPTimeoutError(
            f"{batch.stage}: not done within {batch.stage_seconds:g} s", stage=batch.stage
        )
        failure = f"{type(error).__name__}: {error}"
    if failure is not None:
        await conn.abort()
        batch.settle(failure, closing=closing)
    elif batch.stop_reason is not None:
        # A refused RSET leaves the session in an unknown state: like rset(), stop.
        conn._broken = "RSET failed"
        batch.settle(batch.stop_reason)


# ---------------------------------------------------------------------------- DATA


async def _data(batch: _Batch) -> None:
    """PIPELINING with DATA: each write is [body of the previous | RSET] + next envelope."""
    conn = batch.conn
    t = conn._timeouts
    slots = batch.slots
    for txn in batch.pending():
        if batch.stop_reason is not None:
            return
        parts: list[bytes] = []
        finals: list[tuple[_Txn, int]] = []
        stage, seconds = "MAIL", t.mail
        due = batch.body_due
        if due is not None:
            batch.body_due = None
            slots.append((_DOT, due, 0))  # first: a reply to a failed write is its answer
            parts = _small_body(due) or await _body_head(batch, due)
            finals.append((due, sum(map(len, parts))))
            stage, seconds = "data block", t.data_block
        elif batch.need_rset:
            parts.append(_RSET_LINE)
            slots.append((_RSET, txn, 0))
        batch.need_rset = False
        rcpts = txn.rcpts
        n = len(rcpts)
        first = n if n <= RCPT_GROUP else RCPT_GROUP
        parts.append(txn.mail)
        slots.append((_MAIL, txn, 0))
        if n == 1:
            parts.append(rcpts[0])
            slots.append((_RCPT, txn, 0))
        else:
            parts += rcpts[:first]
            slots.extend([(_RCPT, txn, i) for i in range(first)])
        if n == first:
            parts.append(_DATA_LINE)
            slots.append((_DATA, txn, 0))
        txn.started = True
        conn.transactions += 1
        await batch.write(b"".join(parts), stage, seconds, finals)
        await batch.drain()
        # More than one group of recipients: the rest, a group per round trip.
        start = first
        while start < n and not txn.done:
            group = rcpts[start : start + RCPT_GROUP]
            slots.extend([(_RCPT, txn, i) for i in range(start, start + len(group))])
            start += len(group)
            if start == n:
                group = [*group, _DATA_LINE]
                slots.append((_DATA, txn, 0))
            await batch.write(b"".join(group), "RCPT", t.rcpt)
            await batch.drain()
        # Nothing may follow the reply to DATA until the body is sent (R24).
        conn._check_drained("DATA")
    if batch.stop_reason is not None:
        return
    due = batch.body_due
    if due is not None:
        batch.body_due = None
        slots.append((_DOT, due, 0))
        parts = _small_body(due) or await _body_head(batch, due)
        data = b"".join(parts)
        await batch.write(data, "data block", t.data_block, [(due, len(data))])
        await batch.drain()
        conn._check_drained("end of data")
    if batch.need_rset and batch.last is not None:
        batch.need_rset = False
        slots.append((_RSET, batch.last, 0))
        await batch.write(_RSET_LINE, "RSET", t.rset)
        await batch.drain()
        conn._check_drained("RSET")


def _small_body(txn: _Txn) -> list[bytes] | None:
    """``txn``'s content to join into one write, or None if it must be streamed.

    With no recipient accepted (or MAIL refused) the content is just ``.\r\n`` (R29).
    """
    if not txn.accepted or txn.done:
        return [_DOT_LINE]
    if len(txn.canonical.data) > DATA_CHUNK - 1024:  # leave room for the transparency dots
        return None
    body, end = _stuffed(txn.canonical)
    return [body, end] if len(body) <= DATA_CHUNK else None


async def _body_head(batch: _Batch, txn: _Txn) -> list[bytes]:
    """Write all but the last piece of ``txn``'s content; return the pieces left to join.

    With no recipient accepted (or MAIL refused) the content is just ``.\\r\\n`` (R29).
    """
    if not txn.accepted or txn.done:
        return [_DOT_LINE]
    body, end = _stuffed(txn.canonical)
    size = len(body)
    if size <= DATA_CHUNK:
        return [body, end]
    t = batch.conn._timeouts
    last = (size - 1) // DATA_CHUNK * DATA_CHUNK
    for offset in range(0, last, DATA_CHUNK):
        await batch.write(body[offset : offset + DATA_CHUNK], "data block", t.data_block)
    return [body[last:], end]


# ---------------------------------------------------------------------------- BDAT


async def _bdat(batch: _Batch) -> None:
    """CHUNKING: whole transactions back to back, one window read while the next is sent."""
    conn = batch.conn
    t = conn._timeouts
    slots = batch.slots
    parts: list[bytes] = []
    finals: list[tuple[_Txn, int]] = []
    size = 0
    owed_before = 0  # slots owed by windows already written
    prev: _Txn | None = None
    for txn in batch.pending():
        if batch.stop_reason is not None:
            break
        before, prev = prev, txn
        length = len(txn.canonical.data)
        n = len(txn.rcpts)
        if n > RCPT_GROUP or length > WINDOW_BYTES:
            if parts:
                await _flush(batch, parts, finals)
                parts, finals, size = [], [], 0
            await batch.drain()
            if batch.stop_reason is not None:
                break
            await _bdat_alone(batch, txn, before is not None and not before.clean)
            owed_before = 0
            continue
        # RFC 3030: after a failed BDAT the server's state is indeterminate until RSET.
        rset = before is not None and not before.clean
        if rset:
            parts.append(_RSET_LINE)
            slots.append((_RSET, txn, 0))
        parts.append(txn.mail)
        slots.append((_MAIL, txn, 0))
        parts += txn.rcpts
        slots.extend([(_RCPT, txn, i) for i in range(n)])
        parts.append(b"BDAT %d LAST\r\n" % length)
        parts.append(txn.canonical.data)
        slots.append((_BDAT, txn, 0))
        txn.started = True
        conn.transactions += 1
        size += 60 + length + 40 * n
        finals.append((txn, -1))
        if (
            len(finals) >= WINDOW_MESSAGES
            or size >= WINDOW_BYTES
            or len(slots) - owed_before >= WINDOW_REPLIES
        ):
            await _flush(batch, parts, finals)
            parts, finals, size = [], [], 0
            # Read the previous window while this one is on the wire.
            await batch.drain(keep=len(slots) - owed_before)
            owed_before = len(slots)
    if parts:
        await _flush(batch, parts, finals)
    await batch.drain()
    last = batch.last
    if batch.stop_reason is None and last is not None:
        if not last.clean:
            # Leave the session clean: the last BDAT (or MAIL) failed.
            slots.append((_RSET, last, 0))
            await batch.write(_RSET_LINE, "RSET", t.rset)
            await batch.drain()
        conn._check_drained("BDAT")


async def _flush(batch: _Batch, parts: list[bytes], finals: list[tuple[_Txn, int]]) -> None:
    data = b"".join(parts)
    # Each message's data ends where the next transaction's lines begin; only the last
    # one ends at the end of the write (R37: a failed write may have carried the others).
    marks = [(txn, len(data) if i == len(finals) - 1 else 0) for i, (txn, _) in enumerate(finals)]
    await batch.write(data, "BDAT", batch.conn._timeouts.data_block, marks)


async def _bdat_alone(batch: _Batch, txn: _Txn, rset: bool) -> None:
    """A large message: envelope in bounded groups, then the data only if it has takers."""
    conn = batch.conn
    t = conn._timeouts
    slots = batch.slots
    rcpts = txn.rcpts
    n = len(rcpts)
    parts: list[bytes] = []
    if rset:
        parts.append(_RSET_LINE)
        slots.append((_RSET, txn, 0))
    parts.append(txn.mail)
    slots.append((_MAIL, txn, 0))
    txn.started = True
    conn.transactions += 1
    start = 0
    while True:
        group = rcpts[start : start + RCPT_GROUP]
        parts += group
        slots.extend([(_RCPT, txn, i) for i in range(start, start + len(group))])
        start += len(group)
        await batch.write(b"".join(parts), "RCPT", t.rcpt)
        parts = []
        await batch.drain()
        if batch.stop_reason is not None:
            return
        if txn.done or start >= n:
            break
    if txn.done or not txn.accepted:
        # MAIL refused, or no recipient: no data at all (R41); reset the envelope.
        if not txn.done:
            batch.finish(txn, Outcome.PERMANENT, None)
        if txn.mail_ok:
            slots.append((_RSET, txn, 0))
            await batch.write(_RSET_LINE, "RSET", t.rset)
            await batch.drain()
        txn.clean = batch.stop_reason is None
        return
    data = txn.canonical.data
    length = len(data)
    header = b"BDAT %d LAST\r\n" % length
    slots.append((_BDAT, txn, 0))
    if length <= DATA_CHUNK:
        await batch.write(header + data, "BDAT", t.data_block, [(txn, length)])
    else:
        await batch.write(header, "BDAT", t.data_block)
        last = (length - 1) // DATA_CHUNK * DATA_CHUNK
        for offset in range(0, last, DATA_CHUNK):
            await batch.write(data[offset : offset + DATA_CHUNK], "data block", t.data_block)
        tail = data[last:]
        await batch.write(tail, "data block", t.data_block, [(txn, len(tail))])
    await batch.drain()
