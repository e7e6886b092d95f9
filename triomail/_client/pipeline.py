"""Many messages on one connection: PIPELINING across transactions, and CHUNKING.

Theory of operation
-------------------
:func:`send_pipelined` (``SMTPConnection.send_many``) sends a batch of prepared messages
over one connection and returns one :class:`~triomail.SendResult` per message, in order,
each as :meth:`SMTPConnection.send` would report it. What a reply means is decided by
the sans-IO :class:`~triomail._core.transaction.Transaction`, the same rules ``send``
runs; the bytes, deadlines and error translation are the
:class:`~triomail._client.transport.Transport`'s (one batch deadline, re-armed per
stage). This module adds only the scheduling:

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

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

from .._core.capabilities import Capabilities
from .._core.data import stuffed_parts
from .._core.errors import LocalProtocolError, SMTPDisconnected, SMTPError, SMTPTimeoutError
from .._core.plan import Plan, plan
from .._core.prepare import DSN, PreparedMessage
from .._core.reply import Reply
from .._core.results import SendResult, local_failure, never_started
from .._core.timeouts import Timeouts
from .._core.transaction import (
    CLOSING_421,
    DATA_CHUNK,
    RCPT_GROUP,
    STAGES,
    Decision,
    Expect,
    Transaction,
    stage_seconds,
)
from .transport import Transport

__all__ = ["DATA_CHUNK", "RCPT_GROUP", "WINDOW_BYTES", "WINDOW_MESSAGES", "send_pipelined"]

log = logging.getLogger("triomail")

#: A BDAT window: at most this many messages ...
WINDOW_MESSAGES = 32
#: ... or this many octets per write.
WINDOW_BYTES = 1 << 20
#: ... or this many replies owed for one window (they must fit in socket buffers).
WINDOW_REPLIES = 512

# Slot kinds as plain names: a global load per slot, not an enum attribute look-up.
_RSET, _MAIL, _RCPT, _DATA, _DOT, _BDAT = Expect
_FINISHED, _DELIVERED, _BODY, _RESET, _CLOSING, _RSET_REFUSED = (
    Decision.FINISHED,
    Decision.DELIVERED,
    Decision.BODY,
    Decision.RESET,
    Decision.CLOSING,
    Decision.RSET_REFUSED,
)

_RSET_LINE = b"RSET\r\n"
_DATA_LINE = b"DATA\r\n"
_DOT_LINE = b".\r\n"


class _Stop(SMTPError):
    """Internal: the server said 421; it acts on nothing after that reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Batch:
    """The state of one :func:`send_pipelined` call."""

    def __init__(
        self,
        io: Transport,
        timeouts: Timeouts,
        results: list[SendResult | None],
        txns: list[Transaction],
        on_result: Callable[[int, SendResult], None] | None,
        lazy: Iterator[PreparedMessage] | None,
        plan_one: Callable[[PreparedMessage], SendResult | Plan],
    ) -> None:
        self.io = io
        self.t = timeouts
        self.results = results
        self.txns = txns  # every transaction taken so far (all of them for a Sequence)
        self.on_result = on_result
        self.lazy = lazy  # messages not taken yet, for an iterable that is not a Sequence
        self.plan_one = plan_one
        self.last: Transaction | None = None  # the transaction taken last
        self.slots: deque[tuple[int, Transaction, int]] = deque()
        self.need_rset = False  # DATA mode: the last transaction must be reset
        self.body_due: Transaction | None = None  # DATA mode: 354 received, body not yet sent
        self.seconds = stage_seconds(timeouts)
        self.stop_reason: str | None = None  # set when a refused RSET ends the batch
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.awaiting = 0  # messages whose content is written and whose reply is not read

    # ------------------------------------------------------------------ messages

    def pending(self) -> Iterator[Transaction]:
        """The transactions in order; from an iterator, each planned only when reached."""
        if self.lazy is None:
            for txn in self.txns:
                self.last = txn
                yield txn
            return
        for prepared in self.lazy:
            index = len(self.results)
            self.results.append(None)
            try:
                planned = self.plan_one(prepared)
            except LocalProtocolError as exc:
                # Earlier messages may be on the wire already: report it, do not raise.
                planned = local_failure(prepared, 554, "5.6.0", str(exc))
            if isinstance(planned, SendResult):
                self.record(index, planned)
                continue
            txn = Transaction(index, prepared, *planned)
            self.txns.append(txn)
            self.last = txn
            yield txn

    def record(self, index: int, result: SendResult) -> None:
        self.results[index] = result
        if self.on_result is not None:
            self.on_result(index, result)

    def settle(self, error: str, *, closing: bool = False) -> None:
        """The connection is gone: classify everything still open (R37).

        ``closing``: the server said 421, so it acted on nothing behind that reply and
        no message in flight can have been delivered.
        """
        for txn in self.txns:
            if not txn.done:
                txn.lost(error, closing=closing)
                self.record(txn.index, txn.result)  # type: ignore[arg-type]
        if self.lazy is not None:
            # One result per message: those not taken yet were never started either.
            for prepared in self.lazy:
                self.results.append(None)
                self.record(len(self.results) - 1, never_started(prepared, error))
        io = self.io
        io.awaiting_final_reply = self.awaiting > 0 and not closing
        if io.awaiting_final_reply:
            log.warning(
                "%s: connection lost with messages awaiting their final reply; "
                "they may have been delivered",
                io.host,
            )

    # ------------------------------------------------------------------ replies

    async def drain(self, keep: int = 0) -> None:
        """Read and apply replies until only ``keep`` slots are still owed."""
        slots = self.slots
        io = self.io
        next_reply = io.parser.next_reply
        seconds = self.seconds
        while len(slots) > keep:
            kind, txn, i = slots.popleft()
            # Most replies of a group are already buffered: no coroutine for those.
            try:
                reply = next_reply()
            except BaseException:
                io.broken = io.broken or f"protocol error in {STAGES[kind]}"
                raise
            if reply is None:
                reply = await io.read(STAGES[kind], seconds[kind])  # logs and handles 421
            else:
                if self.debug:
                    log.debug("%s %s < %s", io.host, io.phase, reply)
                if reply.code == 421:
                    io.broken = "server sent 421"  # RFC 5321 §3.8 (R40)
            decision = txn.apply(kind, i, reply)
            if decision:
                self.decide(decision, kind, txn, reply)

    def decide(self, decision: Decision, kind: int, txn: Transaction, reply: Reply) -> None:
        """Act on what the transaction decided (the rare replies: most decide nothing)."""
        if kind >= _DOT and txn.final_written:  # an end-of-data reply that was owed
            self.awaiting -= 1
            self.io.awaiting_final_reply = self.awaiting > 0
        if decision == _BODY:
            self.body_due = txn  # with no recipient accepted, the body is just "."
            return
        if decision == _RSET_REFUSED:
            self.stop_reason = f"RSET refused: {reply}"
            return
        if decision == _DELIVERED:
            self.io.messages_sent += 1
        elif decision == _RESET:
            self.need_rset = True
        result = txn.result
        if result is not None and self.results[txn.index] is None:
            self.record(txn.index, result)
        if decision == _CLOSING:
            raise _Stop(CLOSING_421)

    # -------------------------------------------------------------------- writes

    async def write(
        self,
        data: bytes,
        stage: str,
        seconds: float,
        finals: Sequence[tuple[Transaction, int]] = (),
    ) -> None:
        """One ``send_all`` with its own deadline (R46); ``finals`` are the messages
        whose last octet this write carries, with the offset where it ends."""
        try:
            await self.io.write(data, stage, seconds)
        except SMTPError:
            for txn, end in finals:
                # Octets before the failure point may have reached the server.
                if end < len(data):
                    txn.final_maybe = True
            # Read what the server said before it gave up (R46).
            await self.io.salvage(self.drain)
            raise
        if finals:
            for txn, _end in finals:
                txn.final_written = True
            self.awaiting += len(finals)
            self.io.awaiting_final_reply = True


async def send_pipelined(
    io: Transport,
    timeouts: Timeouts,
    caps: Capabilities,
    messages: Iterable[PreparedMessage],
    *,
    tls_active: bool,
    chunking: bool | None = None,
    dsn: DSN | None = None,
    requiretls: bool = False,
    on_result: Callable[[int, SendResult], None] | None = None,
) -> list[SendResult]:
    """Send ``messages`` over a PIPELINING session; one :class:`SendResult` per message.

    ``SMTPConnection.send_many`` checks the connection and the options and documents
    the contract; this is its PIPELINING half. A :class:`~collections.abc.Sequence` is
    planned whole before the first byte; any other iterable lazily.
    """

    def plan_one(prepared: PreparedMessage) -> SendResult | Plan:
        return plan(prepared, caps, tls_active=tls_active, dsn=dsn, requiretls=requiretls)

    results: list[SendResult | None] = []
    txns: list[Transaction] = []
    lazy: Iterator[PreparedMessage] | None = None
    if isinstance(messages, Sequence):
        results = [None] * len(messages)
        for index, prepared in enumerate(messages):
            planned = plan(prepared, caps, tls_active=tls_active, dsn=dsn, requiretls=requiretls)
            if isinstance(planned, SendResult):
                results[index] = planned  # refused by the client's own checks: nothing written
                if on_result is not None:
                    on_result(index, planned)
            else:
                txns.append(Transaction(index, prepared, *planned))
    else:
        lazy = iter(messages)
    if txns or lazy is not None:
        if io.is_stale():
            await io.abort()
            raise SMTPDisconnected("server closed or wrote to the connection while it was idle")
        batch = _Batch(io, timeouts, results, txns, on_result, lazy, plan_one)
        use_bdat = caps.chunking and chunking is not False
        await _run(batch, _bdat if use_bdat else _data)
    return [r for r in results if r is not None]


async def _run(batch: _Batch, driver: Callable[[_Batch], Awaitable[None]]) -> None:
    """Run a driver under the batch's deadline; settle whatever it leaves open."""
    io = batch.io
    failure: str | None = None
    closing = False
    try:
        async with io.deadline():
            try:
                await driver(batch)
            except _Stop as stop:
                failure, closing = stop.reason, True
            except SMTPError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            except BaseException:
                # Cancelled, or the caller's iterable raised: replies may be owed, so the
                # session cannot be reused (the pool closes it; awaiting_final_reply tells).
                io.broken = io.broken or "batch interrupted"
                raise
    except SMTPTimeoutError as exc:  # the deadline of the operation under way (R26)
        failure = f"{type(exc).__name__}: {exc}"
    if failure is not None:
        await io.abort()
        batch.settle(failure, closing=closing)
    elif batch.stop_reason is not None:
        # A refused RSET leaves the session in an unknown state: like rset(), stop.
        io.broken = "RSET failed"
        batch.settle(batch.stop_reason)


# ---------------------------------------------------------------------------- DATA


async def _data(batch: _Batch) -> None:
    """PIPELINING with DATA: each write is [body of the previous | RSET] + next envelope."""
    io = batch.io
    t = batch.t
    slots = batch.slots
    for txn in batch.pending():
        if batch.stop_reason is not None:
            return
        parts: list[bytes] = []
        finals: list[tuple[Transaction, int]] = []
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
        io.transactions += 1
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
        io.check_drained("DATA")
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
        io.check_drained("end of data")
    if batch.need_rset and batch.last is not None:
        batch.need_rset = False
        slots.append((_RSET, batch.last, 0))
        await batch.write(_RSET_LINE, "RSET", t.rset)
        await batch.drain()
        io.check_drained("RSET")


def _small_body(txn: Transaction) -> list[bytes] | None:
    """``txn``'s content to join into one write, or None if it must be streamed.

    With no recipient accepted (or MAIL refused) the content is just ``.\r\n`` (R29).
    """
    if not txn.has_takers:
        return [_DOT_LINE]
    if len(txn.canonical.data) > DATA_CHUNK - 1024:  # leave room for the transparency dots
        return None
    body, end = stuffed_parts(txn.canonical)
    return [body, end] if len(body) <= DATA_CHUNK else None


async def _body_head(batch: _Batch, txn: Transaction) -> list[bytes]:
    """Write all but the last piece of ``txn``'s content; return the pieces left to join.

    With no recipient accepted (or MAIL refused) the content is just ``.\\r\\n`` (R29).
    """
    if not txn.has_takers:
        return [_DOT_LINE]
    body, end = stuffed_parts(txn.canonical)
    size = len(body)
    if size <= DATA_CHUNK:
        return [body, end]
    t = batch.t
    last = (size - 1) // DATA_CHUNK * DATA_CHUNK
    for offset in range(0, last, DATA_CHUNK):
        await batch.write(body[offset : offset + DATA_CHUNK], "data block", t.data_block)
    return [body[last:], end]


# ---------------------------------------------------------------------------- BDAT


async def _bdat(batch: _Batch) -> None:
    """CHUNKING: whole transactions back to back, one window read while the next is sent."""
    io = batch.io
    t = batch.t
    slots = batch.slots
    parts: list[bytes] = []
    finals: list[tuple[Transaction, int]] = []
    size = 0
    owed_before = 0  # slots owed by windows already written
    prev: Transaction | None = None
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
        io.transactions += 1
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
        io.check_drained("BDAT")


async def _flush(batch: _Batch, parts: list[bytes], finals: list[tuple[Transaction, int]]) -> None:
    data = b"".join(parts)
    # Each message's data ends where the next transaction's lines begin; only the last
    # one ends at the end of the write (R37: a failed write may have carried the others).
    marks = [(txn, len(data) if i == len(finals) - 1 else 0) for i, (txn, _) in enumerate(finals)]
    await batch.write(data, "BDAT", batch.t.data_block, marks)


async def _bdat_alone(batch: _Batch, txn: Transaction, rset: bool) -> None:
    """A large message: envelope in bounded groups, then the data only if it has takers."""
    io = batch.io
    t = batch.t
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
    io.transactions += 1
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
    if not txn.has_takers:
        # MAIL refused, or no recipient: no data at all (R41); reset the envelope.
        if not txn.done:
            txn.no_takers()
            batch.record(txn.index, txn.result)  # type: ignore[arg-type]
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
