"""The pool's ``on_wire`` hook for ``triomail send``: the journal says when a message may go.

Theory of operation
-------------------
The pool writes a message's content only once its hook lets it go (the protocol and
the bound on what a crash leaves in doubt are in triomail/_pool/wire.py); here that
means its journal row is committed in flight (:meth:`.journal.BaseJournal.wired`, or
else :meth:`~.journal.BaseJournal.on_wire` awaited). A message that is not one of our rows (no
:class:`.outcomes.Tag`) needs nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from .._core.prepare import PreparedMessage
from .._core.results import SendResult
from .journal import BaseJournal, JournalError
from .outcomes import Tag

__all__ = ["Wire"]


class Wire:
    """The pool's ``on_wire`` hook: the journal commits each message in flight before
    its content is written (a message without a row of ours needs nothing).

    A final result the pool hands over in the middle of a run is settled here at
    once (:meth:`settled`), not when the consumer's loop gets it: its outcome goes in
    the same commit as the next message, and the journal holds no more rows in flight
    than the pool has on the wire (see triomail/_pool/wire.py). The loop then skips it
    (:meth:`fresh`)."""

    def __init__(self, journal: BaseJournal, settle: Callable[[SendResult], None]) -> None:
        self.journal = journal
        self.settle = settle
        #: Results settled here that the consumer's loop has still to receive.
        self.early: set[int] = set()

    def request(self, messages: Sequence[PreparedMessage]) -> None:
        if not self.journal.inline_commits:  # else committed at once when ready
            self.journal.request(_keys(messages))

    def wait(self, messages: Sequence[PreparedMessage]) -> Awaitable[None] | None:
        keys = _keys(messages)
        if not keys or self.journal.wired(keys):
            return None
        return self.journal.on_wire(keys)

    def settled(self, result: SendResult) -> None:
        self.settle(result)
        self.early.add(id(result))  # alive in the pool's channel until received

    def fresh(self, result: SendResult) -> bool:
        """False for a result :meth:`settled` already took."""
        early = self.early
        if early and id(result) in early:
            early.discard(id(result))
            return False
        return True

    def logged(self) -> None:
        """A result came outside a run's next message (a run's last one, a retry):
        its outcome goes in the journal's redo log at once, as it would with that
        message (:meth:`.journal.BaseJournal.wire_now`)."""
        journal = self.journal
        if journal.inline_commits:
            try:
                journal.wire_now([])
            except JournalError as exc:
                journal.failure = journal.failure or str(exc)


def _keys(messages: Sequence[PreparedMessage]) -> list[str]:
    return [m.tag.key for m in messages if type(m.tag) is Tag]
