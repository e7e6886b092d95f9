"""Many messages on one connection: PIPELINING across transactions (RFC 2920).

Theory of operation
-------------------
:func:`send_pipelined` (``SMTPConnection.send_many`` over a PIPELINING server) sends a
batch of prepared messages over one connection and returns one
:class:`~triomail.SendResult` per message, in order, each as
:meth:`SMTPConnection.send` would report it. The expected replies, results and failures
are the :class:`~triomail._client.batch.Batch`'s; with CHUNKING the transactions are
written by ``chunking`` instead. Here, the DATA schedule:

* **DATA (PIPELINING).** One write carries ``MAIL``, the ``RCPT``\\ s and ``DATA`` of a
  message. Its body can only follow the 354, so it travels at the *front of the next
  write*, together with ``MAIL``/``RCPT``/``DATA`` of the next message (RFC 2920 allows
  message content as the first "command" of a group): about one round trip per message.
  If the previous transaction had MAIL accepted but did not reach the end of data,
  ``RSET`` leads the next group instead, so nothing leaks from one transaction into the
  next (no "nested MAIL"). A 354 with no recipient accepted gets just ``.\\r\\n`` (R29).
  After each group the server must have nothing more to say until it gets the body, so
  the read buffer is checked empty there (R24).
* **A server that refuses that** (Haraka answers the end of data, then ``503`` to every
  command behind it): the batch leaves cross mode (``Batch.cross``) and each body goes
  alone, its reply read before the next envelope: two round trips a message, the floor
  when the end of data must be answered before the next ``MAIL``. The refused message
  is sent again at once (``Batch.pending``).

"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from .._core.capabilities import Capabilities
from .._core.data import stuffed_parts
from .._core.errors import SMTPDisconnected
from .._core.plan import plan
from .._core.prepare import DSN, PreparedMessage
from .._core.results import SendResult
from .._core.timeouts import Timeouts
from .._core.transaction import DATA, DATA_CHUNK, DOT, MAIL, RCPT, RCPT_GROUP, RSET, Transaction
from .batch import DATA_LINE, DOT_LINE, RSET_LINE, Batch, Gate, run_batch, through
from .chunking import send_chunked
from .transport import Transport

__all__ = ["DATA_CHUNK", "RCPT_GROUP", "send_pipelined"]


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
    gate: Gate | None = None,
) -> list[SendResult]:
    """Send ``messages`` over a PIPELINING session; one :class:`SendResult` per message.

    ``SMTPConnection.send_many`` checks the connection and the options and documents
    the contract; this is its PIPELINING half. A :class:`~collections.abc.Sequence` is
    planned whole before the first byte; any other iterable lazily.
    """

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
        batch = Batch(
            io, timeouts, results, txns, on_result, lazy, caps, tls_active, dsn, requiretls, gate
        )
        use_bdat = caps.chunking and chunking is not False
        await run_batch(batch, send_chunked if use_bdat else _data)
    return [r for r in results if r is not None]


async def _data(batch: Batch) -> None:
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
            if batch.cross:
                if batch.gate is not None:
                    await through(batch.gate, due.prepared)
                slots.append((DOT, due, 0))  # first: a reply to a failed write is its answer
                parts = _small_body(due) or await _body_head(batch, due)
                finals.append((due, sum(map(len, parts))))
                stage, seconds = "data block", t.data_block
                txn.after_dot = True
            else:
                await _end_of_data(batch, due)
                if batch.stop_reason is not None:
                    return
        elif batch.need_rset:  # a refused DATA: never with a body due
            parts.append(RSET_LINE)
            slots.append((RSET, txn, 0))
        batch.need_rset = False
        rcpts = txn.rcpts
        n = len(rcpts)
        first = n if n <= RCPT_GROUP else RCPT_GROUP
        parts.append(txn.mail)
        slots.append((MAIL, txn, 0))
        if n == 1:
            parts.append(rcpts[0])
            slots.append((RCPT, txn, 0))
        else:
            parts += rcpts[:first]
            slots.extend([(RCPT, txn, i) for i in range(first)])
        if n == first:
            parts.append(DATA_LINE)
            slots.append((DATA, txn, 0))
        txn.started = True
        io.transactions += 1
        await batch.write(b"".join(parts), stage, seconds, finals)
        await batch.drain()
        # More than one group of recipients: the rest, a group per round trip.
        start = first
        while start < n and not txn.done:
            group = rcpts[start : start + RCPT_GROUP]
            slots.extend([(RCPT, txn, i) for i in range(start, start + len(group))])
            start += len(group)
            if start == n:
                group = [*group, DATA_LINE]
                slots.append((DATA, txn, 0))
            await batch.write(b"".join(group), "RCPT", t.rcpt)
            await batch.drain()
        # Nothing may follow the reply to DATA until the body is sent (R24).
        io.check_drained("DATA")
    if batch.stop_reason is not None:
        return
    due = batch.body_due
    if due is not None:
        batch.body_due = None
        await _end_of_data(batch, due)
    if batch.need_rset and batch.last is not None:
        batch.need_rset = False
        slots.append((RSET, batch.last, 0))
        await batch.write(RSET_LINE, "RSET", t.rset)
        await batch.drain()
        io.check_drained("RSET")


async def _end_of_data(batch: Batch, txn: Transaction) -> None:
    """Write ``txn``'s content alone and read the reply to its end of data."""
    if batch.gate is not None:
        await through(batch.gate, txn.prepared)
    batch.slots.append((DOT, txn, 0))
    parts = _small_body(txn) or await _body_head(batch, txn)
    data = b"".join(parts)
    await batch.write(data, "data block", batch.t.data_block, [(txn, len(data))])
    await batch.drain()
    batch.io.check_drained("end of data")


def _small_body(txn: Transaction) -> list[bytes] | None:
    """``txn``'s content to join into one write, or None if it must be streamed.

    With no recipient accepted (or MAIL refused) the content is just ``.\r\n`` (R29).
    """
    if not txn.accepted or txn.done:  # not has_takers: no property call per message
        return [DOT_LINE]
    if len(txn.canonical.data) > DATA_CHUNK - 1024:  # leave room for the transparency dots
        return None
    body, end = stuffed_parts(txn.canonical)
    return [body, end] if len(body) <= DATA_CHUNK else None


async def _body_head(batch: Batch, txn: Transaction) -> list[bytes]:
    """Write all but the last piece of ``txn``'s content; return the pieces left to join.

    With no recipient accepted (or MAIL refused) the content is just ``.\\r\\n`` (R29).
    """
    if not txn.has_takers:
        return [DOT_LINE]
    body, end = stuffed_parts(txn.canonical)
    size = len(body)
    if size <= DATA_CHUNK:
        return [body, end]
    t = batch.t
    last = (size - 1) // DATA_CHUNK * DATA_CHUNK
    for offset in range(0, last, DATA_CHUNK):
        await batch.write(body[offset : offset + DATA_CHUNK], "data block", t.data_block)
    return [body[last:], end]
