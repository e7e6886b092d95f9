"""The state of one ``send_many`` batch: expected replies, results and failures.

Theory of operation
-------------------
A :class:`Batch` is what the two pipelined drivers (``pipeline`` for DATA, ``chunking``
for BDAT) share. What a reply means is decided by the sans-IO
:class:`~triomail._core.transaction.Transaction`, the same rules ``send`` runs; the
bytes, deadlines and error translation are the
:class:`~triomail._client.transport.Transport`'s (one batch deadline, re-armed per
stage, see :func:`run_batch`). The batch adds the bookkeeping:

* **Expected replies.** Every command written appends a *slot* (what it was, which
  message) to a FIFO; every reply read takes the next slot. Replies are matched one for
  one, in order, never by content (RFC 2920 §3.1, R29; R42: a 452 then 250s maps each
  reply to its own recipient).

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

* **Refused behind an end of data.** A server may refuse the commands pipelined behind
  an end of data (Haraka: ``503``), which the transaction reports as
  :data:`~triomail._core.transaction.Decision.AGAIN`. Such a message never started: the
  batch stops writing anything behind an end of data (:attr:`Batch.cross` false; the
  connection keeps that mode, :attr:`Transport.pipeline`, and says so once at INFO)
  and sends the message again on the same connection as soon as nothing is owed; it
  is no new attempt and no result is recorded for the refused one.

* **Held back before its content.** A caller's ``gate`` (``send_many(gate=...)``) is
  awaited before a message's content goes out: its end of data is what can deliver it
  (RFC 5321 §4.1.1.10: a connection closed without one cancels the transaction), so a
  journal commits the message in flight there, while its envelope's round trip runs. A
  gate that raises stops the batch like a lost connection (:class:`Held`): the
  connection is closed with the 354 unanswered, so that message was never delivered.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

from .._core.capabilities import Capabilities
from .._core.errors import LocalProtocolError, SMTPError, SMTPTimeoutError
from .._core.plan import plan
from .._core.prepare import DSN, PreparedMessage
from .._core.reply import Reply
from .._core.results import SendResult, local_failure, never_started
from .._core.timeouts import Timeouts
from .._core.transaction import (
    AGAIN,
    BODY,
    CLOSING,
    CLOSING_421,
    DELIVERED,
    DOT,
    RESET,
    RSET_REFUSED,
    STAGES,
    Transaction,
    stage_seconds,
)
from .transport import Transport

__all__ = ["DATA_LINE", "DOT_LINE", "RSET_LINE", "Batch", "Gate", "Held", "run_batch", "through"]

log = logging.getLogger("triomail")

RSET_LINE = b"RSET\r\n"
DATA_LINE = b"DATA\r\n"
DOT_LINE = b".\r\n"

#: Called before a message's content is written: ``None`` lets it go at once, an
#: awaitable once awaited; raising holds it back (:class:`Held`).
Gate = Callable[[PreparedMessage], Awaitable[None] | None]


class _Stop(SMTPError):
    """Internal: the server said 421; it acts on nothing after that reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Held(SMTPError):
    """A gate refused a message's content (:func:`through`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not written: {reason}")


async def through(gate: Gate, message: PreparedMessage) -> None:
    """Return once ``gate`` lets ``message``'s content go (awaiting what it returns, if
    anything); :class:`Held` if it raises."""
    try:
        waiting = gate(message)
        if waiting is not None:
            await waiting
    except Exception as exc:
        raise Held(str(exc) or type(exc).__name__) from exc


class Batch:
    """The state of one :func:`send_pipelined` call."""

    def __init__(
        self,
        io: Transport,
        timeouts: Timeouts,
        results: list[SendResult | None],
        txns: list[Transaction],
        on_result: Callable[[int, SendResult], None] | None,
        lazy: Iterator[PreparedMessage] | None,
        caps: Capabilities,
        tls_active: bool,
        dsn: DSN | None,
        requiretls: bool,
        gate: Gate | None = None,
    ) -> None:
        self.io = io
        #: Passed (:func:`through`) before each message's content; a refusal stops the
        #: batch and the connection is closed. (Tested at each call site: no coroutine
        #: per message without one.)
        self.gate = gate
        self.t = timeouts
        self.results = results
        self.txns = txns  # every transaction taken so far (all of them for a Sequence)
        self.on_result = on_result
        self.lazy = lazy  # messages not taken yet, for an iterable that is not a Sequence
        # What plan() needs for a message taken lazily.
        self.caps = caps
        self.tls_active = tls_active
        self.dsn = dsn
        self.requiretls = requiretls
        self.last: Transaction | None = None  # the transaction taken last
        # Each transaction once, in order: a list's, or planned as the iterator reaches it.
        self.source: Iterator[Transaction] = iter(txns) if lazy is None else self._planned()
        #: False once the server refused commands pipelined behind an end of data.
        self.cross = io.pipeline == "cross"
        self.again: deque[Transaction] = deque()  # refused that way: to be sent again
        self.slots: deque[tuple[int, Transaction, int]] = deque()
        self.need_rset = False  # DATA mode: the last transaction must be reset
        self.body_due: Transaction | None = None  # DATA mode: 354 received, body not yet sent
        self.seconds = stage_seconds(timeouts)
        self.stop_reason: str | None = None  # set when a refused RSET ends the batch
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.awaiting = 0  # messages whose content is written and whose reply is not read

    # ------------------------------------------------------------------ messages

    def pending(self) -> Iterator[Transaction]:
        """The transactions in order, each refused behind an end of data again as soon as
        no reply is owed (:attr:`again`); from an iterator, each planned when reached."""
        again = self.again
        for txn in self.source:
            if again and not self.slots:
                yield from self._again()
            self.last = txn
            yield txn
        if not self.slots:
            yield from self._again()

    def _again(self) -> Iterable[Transaction]:
        again = self.again
        while again:
            txn = again.popleft()
            txn.restart()
            self.last = txn
            yield txn

    def _planned(self) -> Iterator[Transaction]:
        """The lazy messages as transactions, each planned only when reached."""
        assert self.lazy is not None
        for prepared in self.lazy:
            index = len(self.results)
            self.results.append(None)
            try:
                planned = plan(
                    prepared,
                    self.caps,
                    tls_active=self.tls_active,
                    dsn=self.dsn,
                    requiretls=self.requiretls,
                )
            except LocalProtocolError as exc:
                # Earlier messages may be on the wire already: report it, do not raise.
                planned = local_failure(prepared, 554, "5.6.0", str(exc))
            if isinstance(planned, SendResult):
                self.record(index, planned)
                continue
            txn = Transaction(index, prepared, *planned)
            self.txns.append(txn)
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
                reply = await io.wait_reply(STAGES[kind], seconds[kind])  # logs it, sees 421
            else:
                if self.debug:
                    log.debug("%s %s < %s", io.host, io.phase, reply)
                if reply.code == 421:
                    io.broken = "server sent 421"  # RFC 5321 §3.8 (R40)
            decision = txn.apply(kind, i, reply)
            if decision:
                if decision == BODY:  # once a message in DATA mode: no call for it
                    self.body_due = txn  # with no recipient accepted, the body is just "."
                else:
                    self.decide(decision, kind, txn, reply)

    def decide(self, decision: int, kind: int, txn: Transaction, reply: Reply) -> None:
        """Act on what the transaction decided (the rare replies: most decide nothing)."""
        if kind >= DOT and txn.final_written:  # an end-of-data reply that was owed
            self.awaiting -= 1
            self.io.awaiting_final_reply = self.awaiting > 0
        if decision == RSET_REFUSED:
            self.stop_reason = f"RSET refused: {reply}"
            return
        if decision == AGAIN:
            self.again.append(txn)
            if self.cross:
                self.cross = False
                self.io.set_pipeline("within")
                log.info(
                    "%s: commands pipelined behind an end of data refused (%s); "
                    "waiting for each end-of-data reply from now on",
                    self.io.host,
                    reply,
                )
            return
        if decision == DELIVERED:
            self.io.messages_sent += 1
        elif decision == RESET:
            self.need_rset = True
        result = txn.result
        if result is not None and self.results[txn.index] is None:
            self.record(txn.index, result)
        if decision == CLOSING:
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
        io = self.io
        try:
            # Transport.write, unrolled: the kernel usually takes it all at once, and
            # then no coroutine is made for the rest.
            sent = io.write_now(data, stage)
            if sent < len(data):
                await io.write_rest(data, sent, stage, seconds)
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


async def run_batch(batch: Batch, driver: Callable[[Batch], Awaitable[None]]) -> None:
    """Run a driver under the batch's deadline; settle whatever it leaves open."""
    io = batch.io
    failure: str | None = None
    closing = False
    io.eager_pause = 0  # each batch starts with an early try of the socket
    try:
        async with io.deadline():
            try:
                await driver(batch)
                # Refused behind the last ends of data: send those again, one by one.
                while batch.again and batch.stop_reason is None:
                    await driver(batch)
            except _Stop as stop:
                failure, closing = stop.reason, True
            except Held as held:
                failure = str(held)
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
