"""A pipelined run whose every message is committed before its first byte (``on_wire``).

Theory of operation
-------------------
A journal commits a message *in flight* before the pool writes it, so that after a
crash the messages in doubt are those that were on the wire (R37). Awaiting that commit
before each message would end the pipelined run there: a round trip and a wake-up more
per message. So the next message is *asked ahead*: taken from the queue and handed to
:meth:`WireHook.request` while the run is still writing, and written without a pause if
:meth:`WireHook.ready` says it is committed by the time the pipeline wants it. If not,
the run ends there (the pipeline finishes what it wrote) and the worker awaits it for
its next attempt.

How far ahead is the bound on what a crash leaves in doubt. With DATA and PIPELINING
(RFC 2920) two messages of a connection are on the wire at once: one whose end of data
awaits its reply, and the next one's envelope written behind it (which delivers
nothing without its body). The next message is asked for only once no more than one
written message awaits its result, and the hook hears of each final result before
that (:meth:`WireHook.settled`: a journal records its outcome with the next commit),
so the rows committed in flight and not settled stay at most two per connection. With
BDAT whole messages go back to back, so that bound makes runs of two there.

A journal whose commit is a local write (SQLite's redo log) commits a message when the
pipeline asks for it, and never ends a run; one over a network (PostgreSQL) commits in
its own task, and the run goes on when that commit was faster than the round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .._core.prepare import PreparedMessage
from .._core.results import SendResult
from .interfaces import WireHook
from .jobs import Job

__all__ = ["WireRun"]

#: A job and its message prepared for the connection.
Taken = tuple[Job, PreparedMessage]


class WireRun:
    """The messages of one pipelined run under ``on_wire``."""

    def __init__(
        self,
        hook: WireHook,
        ready: list[Taken],
        room: int,
        take: Callable[[], Taken | None],
    ) -> None:
        self.hook = hook
        #: In hand (committed: the worker awaited them), then each one written.
        self.ready = ready
        self.room = room
        self.take = take
        #: Taken from the queue and asked for, not written yet.
        self.ahead: Taken | None = None
        self.written = 0
        self.settled = 0

    def messages(self) -> Iterator[PreparedMessage]:
        """What the pipeline writes: those in hand, then each one asked for ahead that
        is committed when the pipeline wants it; the run ends at one that is not."""
        for _, message in list(self.ready):
            self.written += 1
            self._ask()
            yield message
        while (ahead := self.ahead) is not None and self.hook.ready(ahead[1]):
            self.ahead = None
            self.ready.append(ahead)
            self.written += 1
            self._ask()
            yield ahead[1]

    def on_result(self, final: SendResult | None) -> None:
        """A written message has its result (``final`` if it is its final one, handed
        to the consumer): the hook hears of it first, then the next one is asked for."""
        self.settled += 1
        if final is not None:
            self.hook.settled(final)
        self._ask()

    def _ask(self) -> None:
        # At most one written message awaits its result when the next is asked for.
        if self.ahead is None and self.written - self.settled <= 1 and len(self.ready) < self.room:
            self.ahead = self.take()
            if self.ahead is not None:
                self.hook.request([self.ahead[1]])
