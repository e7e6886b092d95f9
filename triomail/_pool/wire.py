"""A pipelined run whose every message is committed before its content (``on_wire``).

Theory of operation
-------------------
A journal commits a message *in flight* before the pool writes what can deliver it, so
that after a crash the messages in doubt are those that were on the wire (R37). What
can deliver a message is its content: a server cancels a transaction whose end of data
never came when the connection closes (RFC 5321 §4.1.1.10). So the commit is asked for
(:meth:`WireHook.request`) when the message is taken for the run and its envelope goes
out, and awaited (:meth:`WireHook.wait`, the connection's ``gate``) just before its
content: the commit runs during the envelope's round trip, and a pipelined run never
stops for it.

How far ahead a message is taken is the bound on what a crash leaves in doubt. With
DATA and PIPELINING (RFC 2920) two messages of a connection are on the wire at once:
one whose end of data awaits its reply, and the next one's envelope written behind it.
The next message is taken only once no more than one written message awaits its
result, and the hook hears of each final result before that (:meth:`WireHook.settled`:
a journal records its outcome with the next commit), so the rows committed in flight
and not settled stay at most two per connection. With BDAT whole messages go back to
back, so that bound makes runs of two there.
"""

from __future__ import annotations

from collections.abc import Awaitable

from .._core.prepare import PreparedMessage
from .._core.results import SendResult
from .interfaces import WireHook

__all__ = ["WireRun"]


class WireRun:
    """The bookkeeping of one pipelined run under ``on_wire`` (the worker takes the
    messages, :meth:`may_take` says when)."""

    def __init__(self, hook: WireHook) -> None:
        self.hook = hook
        #: Written messages that have their result.
        self.settled = 0
        #: The messages (by ``id``) the hook held back: the run stopped there.
        self.held: set[int] = set()

    def may_take(self, written: int) -> bool:
        """True if the next message may be taken, ``written`` being taken so far: no
        more than one of those still awaits its result."""
        return written - self.settled <= 1

    def on_result(self, final: SendResult | None) -> None:
        """A written message has its result (``final`` if it is its final one, handed
        to the consumer): the hook hears of it before the next message is taken."""
        self.settled += 1
        if final is not None:
            self.hook.settled(final)

    def gate(self, message: PreparedMessage) -> Awaitable[None] | None:
        """The connection's gate: ``None`` if ``message``'s content may be written now
        (the usual case), else what to await first."""
        try:
            waiting = self.hook.wait((message,))
        except Exception:
            self.held.add(id(message))
            raise
        return None if waiting is None else self._wait(message, waiting)

    async def _wait(self, message: PreparedMessage, waiting: Awaitable[None]) -> None:
        try:
            await waiting
        except Exception:
            self.held.add(id(message))
            raise
