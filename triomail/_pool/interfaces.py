"""The whole contract the pool relies on from a connection, in one place.

The workers hold :class:`Connection` objects, never more: :class:`SMTPConnection`
satisfies it (mypy checks that where ``Server.open`` hands one over), and anything else
that does (a fake in a test, another transport) can be pooled. Everything else a
connection offers is the caller's business, not the pool's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from email.message import Message
from typing import Protocol

from .._client.options import Pipeline
from .._core.capabilities import Capabilities
from .._core.prepare import PreparedMessage
from .._core.results import SendResult

__all__ = ["Connection", "WireHook"]


class Connection(Protocol):
    """An open SMTP session, as a pool worker uses it."""

    @property
    def capabilities(self) -> Capabilities:
        """What the server offered in EHLO (the pool asks about CHUNKING)."""

    @property
    def transactions(self) -> int:
        """Transactions ended on it so far: 0 means a fresh connection (R45)."""

    @property
    def awaiting_final_reply(self) -> bool:
        """True between the final dot and its reply: a send cut off now is unknown (R37)."""

    @property
    def pipeline(self) -> Pipeline:
        """How ``send_many`` pipelines here: ``"within"`` once the server refused
        commands behind an end of data; the pool hands it to the server's next
        connection."""

    @property
    def is_usable(self) -> bool:
        """False once it was closed, broke, or was told 421."""

    def is_stale(self) -> bool:
        """True if it closed or spoke while idle (R24): reuse would fail."""

    def prepare(
        self, message: Message, *, sender: str | None, recipients: Sequence[str] | None
    ) -> PreparedMessage:
        """``message`` checked and encoded the way this server can take it."""

    async def send(self, message: PreparedMessage) -> SendResult:
        """One transaction; SMTP outcomes are values, a connection lost before MAIL
        raises :exc:`SMTPDisconnected`."""

    async def send_many(
        self,
        messages: Iterable[PreparedMessage],
        *,
        on_result: Callable[[int, SendResult], None] | None = None,
        gate: Callable[[PreparedMessage], Awaitable[None] | None] | None = None,
    ) -> list[SendResult]:
        """Pipelined transactions (RFC 2920), one result per message, in order;
        ``on_result`` hears of each as soon as it is known; ``gate`` is called before
        each message's content, and what it returns awaited if not ``None`` (raising
        stops the batch)."""

    async def aclose(self) -> None:
        """QUIT (unless broken) and close."""


class WireHook(Protocol):
    """What a pool is told before it writes a message (``on_wire``): a journal that
    commits each message in flight first.

    A worker asks for each message's commit (:meth:`request`) as it takes it for a
    pipelined run and its envelope goes out, and calls :meth:`wait` just before the
    message's content, the part that can deliver it (see triomail/_pool/wire.py).
    """

    def request(self, messages: Sequence[PreparedMessage]) -> None:
        """Start committing these (never waits)."""

    def wait(self, messages: Sequence[PreparedMessage]) -> Awaitable[None] | None:
        """``None`` if these may be written now, else an awaitable that returns once
        they may be; raise (here or from the awaitable) if they may not be."""

    def settled(self, result: SendResult) -> None:
        """A written message's final result, as it is handed to the consumer (a
        journal records its outcome with the next commit, before the next message)."""
