"""``on_wire``: every message is ready before its first byte, and pipelined runs stay long.

The hook here stands in for a journal: a message is "committed" when a later scheduling
round (a task of the test) or the writer itself takes it, and the hook checks the
bound the pool promises (see triomail/_pool/wire.py): when a message is asked for,
at most one message of its connection is written and without its final result.
Against the capture server, so the pipelining and the replies are real.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

import triomail
from triomail import PreparedMessage, SendResult, Server
from triomail.testing import SMTPSink


def _message(i: int) -> PreparedMessage:
    data = f"Message-ID: <w{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"r{i}@example.org"], tag=i)


class Hook:
    """A WireHook that commits on request (inline, as the SQLite journal does) or
    never (then every message waits), and records what the pool did."""

    def __init__(self, *, inline: bool) -> None:
        self.inline = inline
        self.asked: set[object] = set()
        self.committed: set[object] = set()
        self.written: list[object] = []  # in the order the pool may write them
        self.done: set[object] = set()
        self.waits = 0
        self.most_unsettled = 0

    def _unsettled(self) -> int:
        return len([t for t in self.written if t not in self.done])

    def request(self, messages: Sequence[PreparedMessage]) -> None:
        # The bound: what is written and not settled when the next is asked for.
        self.most_unsettled = max(self.most_unsettled, self._unsettled())
        self.asked.update(m.tag for m in messages)

    def ready(self, message: PreparedMessage) -> bool:
        if message.tag in self.asked and self.inline:
            self.committed.add(message.tag)
        if message.tag in self.committed:
            self.written.append(message.tag)
            return True
        return False

    async def wait(self, messages: Sequence[PreparedMessage]) -> None:
        self.waits += 1
        await trio.lowlevel.checkpoint()
        for m in messages:
            self.committed.add(m.tag)
            self.written.append(m.tag)

    def settled(self, result: SendResult) -> None:
        self.done.add(result.tag)


async def _send(
    hook: Hook, n: int, connections: int, *, chunking: bool = False
) -> list[SendResult]:
    async with (
        SMTPSink(tls=False, hide_extensions=() if chunking else ("CHUNKING",)) as sink,
        triomail.open_pool(
            Server(sink.host, sink.port, tls="none"), connections=connections, on_wire=hook
        ) as pool,
        pool.send_all(_message(i) for i in range(n)) as results,
    ):
        return [result async for result in results]


@pytest.mark.parametrize("chunking", [False, True])
async def test_runs_stay_long_and_each_message_is_ready_first(chunking: bool) -> None:
    n, connections = 600, 3
    hook = Hook(inline=True)
    results = await _send(hook, n, connections, chunking=chunking)
    assert sorted(r.tag for r in results) == list(range(n))  # type: ignore[type-var]
    assert all(r.ok for r in results)
    # Every message was committed before it could be written, each once.
    assert sorted(hook.written) == list(range(n))  # type: ignore[type-var]
    assert hook.committed == set(range(n))
    # With DATA, asked for ahead while the run went on: few runs, not one per message
    # or two. (BDAT writes whole messages back to back: two at most in doubt means
    # runs of two there.)
    if not chunking:
        assert hook.waits <= n // 20
    # When a connection asks for its next message at most one it wrote awaits its
    # result (each other connection: two, an end of data and the envelope behind it).
    assert hook.most_unsettled <= 1 + 2 * (connections - 1)


async def test_a_message_not_ready_in_time_waits_for_the_next_run() -> None:
    n = 40
    hook = Hook(inline=False)  # nothing asked ahead is ever committed in time
    results = await _send(hook, n, 1)
    assert sorted(r.tag for r in results) == list(range(n))  # type: ignore[type-var]
    assert all(r.ok for r in results)
    assert sorted(hook.written) == list(range(n))  # type: ignore[type-var]
    assert hook.waits == n  # each run ended at the message that was not ready
