"""CHUNKING: whole BDAT transactions back to back, in bounded windows (RFC 3030).

Theory of operation
-------------------
:func:`send_chunked` is ``send_many``'s driver for a server that advertises CHUNKING
and PIPELINING; the expected replies, results and failures are the
:class:`~triomail._client.batch.Batch`'s.

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
* **A server that refuses commands pipelined behind an end of data** refuses that
  ``RSET`` (``Batch.cross`` turns false): from then on each window is one message,
  whose reply is read before the next is written, and the refused messages are sent
  again (``Batch.pending``).

"""

from __future__ import annotations

from .._core.transaction import BDAT, DATA_CHUNK, MAIL, RCPT, RCPT_GROUP, RSET, Transaction
from .batch import RSET_LINE, Batch, through

__all__ = ["WINDOW_BYTES", "WINDOW_MESSAGES", "WINDOW_REPLIES", "send_chunked"]

#: A BDAT window: at most this many messages ...
WINDOW_MESSAGES = 32
#: ... or this many octets per write.
WINDOW_BYTES = 1 << 20
#: ... or this many replies owed for one window (they must fit in socket buffers).
WINDOW_REPLIES = 512


async def send_chunked(batch: Batch) -> None:
    """CHUNKING: whole transactions back to back, one window read while the next is sent."""
    io = batch.io
    t = batch.t
    slots = batch.slots
    parts: list[bytes] = []
    finals: list[tuple[Transaction, int]] = []
    size = 0
    owed_before = 0  # slots owed by windows already written
    prev = batch.last  # sending again: the transaction the last run ended with
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
            if batch.gate is not None:
                await through(batch.gate, txn.prepared)
            await _bdat_alone(batch, txn, before is not None and not before.clean)
            owed_before = 0
            continue
        # The content goes in the same write as the envelope: the gate comes first.
        if batch.gate is not None:
            await through(batch.gate, txn.prepared)
        # RFC 3030: after a failed BDAT the server's state is indeterminate until RSET.
        rset = before is not None and not before.clean
        if rset:
            parts.append(RSET_LINE)
            slots.append((RSET, txn, 0))
            txn.after_dot = batch.cross  # the previous end of data may be unanswered
        parts.append(txn.mail)
        slots.append((MAIL, txn, 0))
        parts += txn.rcpts
        slots.extend([(RCPT, txn, i) for i in range(n)])
        parts.append(b"BDAT %d LAST\r\n" % length)
        parts.append(txn.canonical.data)
        slots.append((BDAT, txn, 0))
        txn.started = True
        io.transactions += 1
        size += 60 + length + 40 * n
        finals.append((txn, -1))
        if not batch.cross:  # the server wants each end of data answered first
            await _flush(batch, parts, finals)
            parts, finals, size = [], [], 0
            await batch.drain()
            owed_before = 0
        elif (
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
            slots.append((RSET, last, 0))
            await batch.write(RSET_LINE, "RSET", t.rset)
            await batch.drain()
        io.check_drained("BDAT")


async def _flush(batch: Batch, parts: list[bytes], finals: list[tuple[Transaction, int]]) -> None:
    data = b"".join(parts)
    # Each message's data ends where the next transaction's lines begin; only the last
    # one ends at the end of the write (R37: a failed write may have carried the others).
    marks = [(txn, len(data) if i == len(finals) - 1 else 0) for i, (txn, _) in enumerate(finals)]
    await batch.write(data, "BDAT", batch.t.data_block, marks)


async def _bdat_alone(batch: Batch, txn: Transaction, rset: bool) -> None:
    """A large message: envelope in bounded groups, then the data only if it has takers."""
    io = batch.io
    t = batch.t
    slots = batch.slots
    rcpts = txn.rcpts
    n = len(rcpts)
    parts: list[bytes] = []
    if rset:
        parts.append(RSET_LINE)
        slots.append((RSET, txn, 0))
    parts.append(txn.mail)
    slots.append((MAIL, txn, 0))
    txn.started = True
    io.transactions += 1
    start = 0
    while True:
        group = rcpts[start : start + RCPT_GROUP]
        parts += group
        slots.extend([(RCPT, txn, i) for i in range(start, start + len(group))])
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
            slots.append((RSET, txn, 0))
            await batch.write(RSET_LINE, "RSET", t.rset)
            await batch.drain()
        txn.clean = batch.stop_reason is None
        return
    data = txn.canonical.data
    length = len(data)
    header = b"BDAT %d LAST\r\n" % length
    slots.append((BDAT, txn, 0))
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
