"""One transaction at a time: the driver behind ``SMTPConnection.send``.

Theory of operation
-------------------
:func:`send_one` writes a transaction and feeds each reply to the sans-IO
:class:`~triomail._core.transaction.Transaction`, which decides what it means; this
module only decides what to write next. With PIPELINING, ``MAIL``, the first
:data:`RCPT_GROUP` recipients and ``DATA`` share one write (RFC 2920); without it, each
command waits for its reply and anything more from the server is a desync (R24).

The connection is never left mid-transaction: after a refusal it is reset (R45) and a
failed ``RSET`` closes it. Losses are values (R37): before the final dot is written a
lost connection leaves every recipient transient; between the final dot and its reply
(RFC 1047's synchronisation gap) unknown. If writing the content fails, the server's
reason, when it gave one before giving up, decides the outcome (R46).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from .._core.data import dot_stuff
from .._core.errors import SMTPDisconnected, SMTPError
from .._core.prepare import PreparedMessage
from .._core.reply import Reply
from .._core.results import Outcome, SendResult, never_started
from .._core.timeouts import Timeouts
from .._core.transaction import (
    BODY,
    CLOSING,
    DATA,
    DATA_CHUNK,
    DELIVERED,
    DOT,
    FINISHED,
    MAIL,
    RCPT,
    RCPT_GROUP,
    RESET,
    STAGES,
    Transaction,
    stage_seconds,
)
from .batch import Gate, Held, through
from .transport import SALVAGE_SECONDS, Transport

__all__ = ["reset", "send_each", "send_one"]

log = logging.getLogger("triomail")

_DATA_LINE = b"DATA\r\n"
_DOT_LINE = b".\r\n"


async def reset(io: Transport, seconds: float) -> Reply:
    """``RSET``; anything but 250 leaves the session state unknown, so it is closed."""
    reply = await io.command(b"RSET\r\n", "RSET", seconds)
    if reply.code != 250 and io.usable:
        io.broken = "RSET failed"
        await io.abort()
    return reply


async def send_one(io: Transport, t: Timeouts, txn: Transaction, *, pipelining: bool) -> SendResult:
    """Run ``txn`` to its end; its result (the transport counts it)."""
    io.transactions += 1
    io.awaiting_final_reply = False
    txn.started = True
    try:
        next_step = await _envelope(io, t, txn, pipelining)
    except SMTPError as exc:
        return await _lost(io, txn, exc, Outcome.TRANSIENT)
    if next_step == BODY:
        await _content(io, t, txn)
    elif next_step == RESET and io.usable:
        # After a refusal, leave the session clean for the next transaction (R45).
        with contextlib.suppress(SMTPError):
            await reset(io, t.rset)
    return _result(txn)


async def _envelope(io: Transport, t: Timeouts, txn: Transaction, pipelining: bool) -> int:
    """MAIL, RCPT... and DATA: BODY if the content is to follow (a 354 with takers),
    RESET if the transaction was refused, FINISHED if nothing more is to be done."""
    seconds = stage_seconds(t)
    rcpts = txn.rcpts
    n = len(rcpts)
    group = RCPT_GROUP if pipelining else 1
    start = 0
    lines = [txn.mail]
    owed: list[tuple[int, int]] = [(MAIL, 0)]
    while True:
        if pipelining:
            # One write per group (RFC 2920); DATA goes with the last one.
            end = min(n, start + group)
            lines += rcpts[start:end]
            owed += [(RCPT, i) for i in range(start, end)]
            start = end
            if end == n:
                lines.append(_DATA_LINE)
                owed.append((DATA, 0))
        elif not owed:
            if start < n:
                lines, owed = [rcpts[start]], [(RCPT, start)]
                start += 1
            elif txn.accepted:
                lines, owed = [_DATA_LINE], [(DATA, 0)]
            else:
                txn.no_takers()  # R41: nobody accepted, so no DATA
                return RESET
        # The write is armed for the stage of its first command (a group: MAIL or RCPT).
        stage, write_seconds = STAGES[owed[0][0]], seconds[owed[0][0]]
        async with io.deadline():
            io.arm(stage, write_seconds)
            await io.write(b"".join(lines), stage, write_seconds, rearm=False)
            lines = []
            for kind, i in owed:
                reply = await io.read(STAGES[kind], seconds[kind], rearm=pipelining)
                if not pipelining:
                    io.check_drained(STAGES[kind])  # R24: one command, one reply
                decision = txn.apply(kind, i, reply)
                if decision == BODY:
                    if pipelining:
                        io.check_drained("DATA")
                    if txn.has_takers:
                        return BODY
                    # R29: 354 although no recipient was accepted: end the data at once.
                    await io.write(_DOT_LINE, "DATA", t.data_block)
                    txn.final_written = True
                    txn.apply(DOT, 0, await io.read("end of data", t.data_done))
                    io.check_drained("end of data")
                    return FINISHED
                if decision == CLOSING:
                    return FINISHED  # the transport closed on the 421 (R40)
            owed = []
        if txn.done:
            return RESET


async def _content(io: Transport, t: Timeouts, txn: Transaction) -> None:
    """The dot-stuffed content in bounded writes, then the final reply (R37, R46)."""
    payload = dot_stuff(txn.canonical)
    try:
        async with io.deadline():
            for offset in range(0, len(payload), DATA_CHUNK):
                # One deadline per piece (R46); slicing all of it returns the same bytes.
                await io.write(payload[offset : offset + DATA_CHUNK], "data block", t.data_block)
    except SMTPError as exc:
        early: list[Reply] = []

        async def read_early() -> None:
            async with io.deadline():
                early.append(await io.read("early reply", SALVAGE_SECONDS))

        if not io.closed:
            await io.salvage(read_early)
        if early and not early[0].is_positive:
            await io.abort()
            txn.apply(DOT, 0, early[0])  # "server replied before the end of data"
            return
        await _lost(io, txn, exc, Outcome.TRANSIENT)
        return
    txn.final_written = True
    io.awaiting_final_reply = True  # RFC 1047's synchronisation gap starts here
    try:
        reply = await io.receive("end of data", t.data_done)
        io.check_drained("end of data")
        decision = txn.apply(DOT, 0, reply)
    except SMTPError as exc:
        log.warning(
            "%s: no reply to the final dot; message %s may have been delivered",
            io.host,
            txn.prepared.message_id or "",
        )
        await _lost(io, txn, exc, Outcome.UNKNOWN)
        return
    io.awaiting_final_reply = False
    if decision == DELIVERED:
        io.messages_sent += 1


async def _lost(io: Transport, txn: Transaction, exc: SMTPError, outcome: Outcome) -> SendResult:
    await io.abort()
    txn.finish(outcome, None, f"{type(exc).__name__}: {exc}")
    return _result(txn)


def _result(txn: Transaction) -> SendResult:
    result = txn.result
    if result is None:  # every path above decides it; a bug otherwise
        raise RuntimeError("transaction ended without a result")
    return result


async def send_each(
    io: Transport,
    send: Callable[[PreparedMessage], Awaitable[SendResult]],
    messages: Iterable[PreparedMessage],
    on_result: Callable[[int, SendResult], None] | None,
    gate: Gate | None = None,
) -> list[SendResult]:
    """``send_many`` without PIPELINING: ``send`` each message once its ``gate`` (if
    any) let it go: one it held back is never started, and the others go on (nothing
    of it was written); once the connection is gone, the rest were never started."""
    before = io.transactions
    results: list[SendResult] = []
    for index, prepared in enumerate(messages):
        held: str | None = None
        if gate is not None:
            try:
                await through(gate, prepared)
            except Held as exc:
                held = str(exc)
        if held is not None:
            result = never_started(prepared, held)
        else:
            try:
                result = await send(prepared)
            except SMTPDisconnected as exc:
                if io.transactions == before:
                    raise  # nothing was started: like send()
                result = never_started(prepared, str(exc))
        results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results
