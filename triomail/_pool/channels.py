"""Where results go: one channel per ``send_all`` (or ``send``), fed by every worker.

Theory of operation
-------------------
A worker hands each final result to the :class:`Results` of the call its message came
from, as soon as it is known. One memory channel serves the whole batch, closed once
feeding has ended and every message handed over has its result: no channel per message,
and a result the consumer has room for costs no scheduling round (``send_nowait``). The
consumer reads it through a :class:`ResultChannel`.
"""

from __future__ import annotations

from typing import final

import trio

from .._core.results import SendResult

__all__ = ["ResultChannel", "Results"]


@final
class ResultChannel(trio.abc.ReceiveChannel[SendResult]):
    """The results of :meth:`Pool.send_all`, as they complete (a trio receive channel).

    Workers finish messages in bursts (a pipelined run ends many at once). A result
    that is already waiting is returned at a cancellation point but without a
    scheduling round, except one in :data:`FAIR_EVERY`: with a plain memory channel the
    consumer would take one result per round of the scheduler and hold every worker
    back to that pace.
    """

    FAIR_EVERY = 64

    def __init__(self, channel: trio.MemoryReceiveChannel[SendResult]) -> None:
        self._channel = channel
        self._run = 0

    def receive_nowait(self) -> SendResult:
        """A result if one is waiting, else :exc:`trio.WouldBlock`."""
        return self._channel.receive_nowait()

    async def receive(self) -> SendResult:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            result = self._channel.receive_nowait()
        except trio.WouldBlock:
            self._run = 0
            return await self._channel.receive()
        self._run += 1
        if self._run >= self.FAIR_EVERY:
            self._run = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._channel.statistics()

    def close(self) -> None:
        self._channel.close()

    async def aclose(self) -> None:
        await self._channel.aclose()


class Results:
    """The sending side of one call's results (a ``jobs.Destination``).

    A result whose consumer is gone goes to ``interrupted`` if the consumer was
    cancelled (:meth:`left`); if it left on purpose, the result only counts in the
    statistics.
    """

    __slots__ = ("_cancelled", "_channel", "_fed", "_interrupted", "_owed")

    def __init__(
        self, channel: trio.MemorySendChannel[SendResult], interrupted: list[SendResult]
    ) -> None:
        self._channel = channel
        self._interrupted = interrupted
        #: The consumer left because it was cancelled.
        self._cancelled = False
        self._owed = 0
        self._fed = False

    def left(self, receiving: trio.MemoryReceiveChannel[SendResult], *, cancelled: bool) -> None:
        """The consumer leaves: close its end. Cancelled, it never takes the results
        already waiting in the channel's buffer, nor any still to come: they go to
        ``interrupted``, so each message still ends with exactly one result."""
        self._cancelled = cancelled
        while True:
            try:
                result = receiving.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._orphaned(result)
        receiving.close()

    def _orphaned(self, result: SendResult) -> None:
        if self._cancelled:
            self._interrupted.append(result)

    def expect(self) -> None:
        self._owed += 1

    def fed(self) -> None:
        """No more jobs will be added."""
        self._fed = True
        if self._owed == 0:
            self._channel.close()

    def put_nowait(self, result: SendResult) -> bool:
        """Deliver without waiting; False if the consumer's buffer is full."""
        try:
            self._channel.send_nowait(result)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._orphaned(result)  # the consumer left its send_all block
        self._owed -= 1  # what _delivered does, inline: once per message
        if self._fed and self._owed == 0:
            self._channel.close()
        return True

    async def put(self, result: SendResult) -> None:
        try:
            await self._channel.send(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._orphaned(result)
        self._delivered()

    def withdraw(self) -> None:
        """A result owed will not come here (never handed over, or interrupted)."""
        self._delivered()

    def _delivered(self) -> None:
        self._owed -= 1
        if self._fed and self._owed == 0:
            self._channel.close()
