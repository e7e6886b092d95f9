"""Deadlines (R26): one re-armable cancel scope for a command or a whole batch.

Theory of operation
-------------------
One mechanism serves a single command and a pipelined batch of thousands of replies:
``async with transport.deadline():`` opens a :class:`Deadline` (a trio cancel scope),
and each operation under it *arms* the scope for its stage (``Transport.arm``). A missed
deadline becomes :class:`~triomail.SMTPTimeoutError` naming the stage, the transport is
marked broken and the stream closed. Re-arming is cheap and rare: a deadline set less
than 1% of the stage's time ago is kept (at most that much stricter than asked, never
later), so a steady pipeline re-arms every few seconds instead of for every reply.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

import trio

from .._core.errors import SMTPTimeoutError

__all__ = ["Deadline"]


class _Owner(Protocol):
    """What a deadline needs of its transport (typed here: the transport imports us)."""

    scope: trio.CancelScope | None
    stage: str
    stage_seconds: float
    broken: str | None

    async def abort(self) -> None: ...


class Deadline:
    """The cancel scope that ``Transport.arm`` points at while it is entered."""

    __slots__ = ("outer", "owner", "scope")

    def __init__(self, owner: _Owner) -> None:
        self.owner = owner
        self.scope = trio.CancelScope()
        self.outer: trio.CancelScope | None = None

    async def __aenter__(self) -> trio.CancelScope:
        self.outer = self.owner.scope
        self.owner.scope = self.scope
        return self.scope.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        owner = self.owner
        owner.scope = self.outer
        # The scope swallows only the cancellation it caused itself, which becomes the
        # timeout below; anything else propagates.
        self.scope.__exit__(exc_type, exc, tb)
        if not self.scope.cancelled_caught:
            return
        # The deadline of the operation under way passed.
        stage = owner.stage
        owner.broken = f"timeout in {stage}"
        await owner.abort()
        raise SMTPTimeoutError(
            f"{stage}: not done within {owner.stage_seconds:g} s", stage=stage
        ) from None
