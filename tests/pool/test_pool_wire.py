"""``on_wire``: every message is committed before its content, and pipelined runs stay long.

The hook here stands in for a journal: a message is "committed" when :meth:`Hook.wait`
lets it go, at once (as the SQLite journal's redo log: nothing to await) or on a later
scheduling round (as a PostgreSQL group commit). It checks what the pool promises (see
triomail/_pool/wire.py): each message is asked for before it is let go, its content
reaches the server only after that, and when a message is taken at most one message of
its connection is written and without its final result. Against the capture server,
behind a relay that counts the round trips, so the pipelining and the replies are real.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

import pytest
import trio
from helpers.turns import counting_relay

import triomail
from triomail import Outcome, PreparedMessage, SendResult, Server
from triomail._client.options import Pipeline
from triomail.testing import SMTPSink


def _message(i: int) -> PreparedMessage:
    data = f"Message-ID: <w{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"r{i}@example.org"], tag=i)


class Hook:
    """A WireHook that records what the pool did and checks it against the sink."""

    def __init__(self, sink: SMTPSink, *, later: bool = False) -> None:
        self.sink = sink
        self.later = later  # commit on a later scheduling round, not inline
        self.asked: list[object] = []
        self.committed: list[object] = []
        self.done: set[object] = set()
        self.most_unsettled = 0
        self.early: list[object] = []  # content at the server before its commit
        self.hold: dict[object, float] = {}  # tag -> seconds its commit takes
        self.refuse: set[object] = set()  # tags whose commit fails (once)

    def _delivered(self) -> set[str]:
        return {m.message["Subject"] for m in self.sink.messages}

    def request(self, messages: Sequence[PreparedMessage]) -> None:
        # The bound: what is taken and not settled when the next is taken.
        unsettled = len([t for t in self.asked if t not in self.done])
        self.most_unsettled = max(self.most_unsettled, unsettled)
        self.asked.extend(m.tag for m in messages)

    def wait(self, messages: Sequence[PreparedMessage]) -> Awaitable[None] | None:
        if self.later:
            return self._later(messages)
        self._commit(messages)  # at once: nothing to await
        return None

    async def _later(self, messages: Sequence[PreparedMessage]) -> None:
        for m in messages:
            await trio.sleep(self.hold.pop(m.tag, 0))
        self._commit(messages)

    def _commit(self, messages: Sequence[PreparedMessage]) -> None:
        for m in messages:
            assert m.tag in self.asked, f"{m.tag} awaited before it was asked for"
            if str(m.tag) in self._delivered():
                self.early.append(m.tag)
            if m.tag in self.refuse:
                self.refuse.discard(m.tag)
                raise OSError(f"commit of {m.tag} failed")
            self.committed.append(m.tag)

    def settled(self, result: SendResult) -> None:
        self.done.add(result.tag)


async def _send(
    hook_args: dict[str, object],
    n: int,
    connections: int,
    *,
    chunking: bool = False,
    setup: object = None,
    pipeline: Pipeline = "cross",
) -> tuple[Hook, list[SendResult], SMTPSink, int]:
    async with (
        SMTPSink(tls=False, hide_extensions=() if chunking else ("CHUNKING",)) as sink,
        counting_relay(sink.host, sink.port) as (port, turns),
    ):
        hook = Hook(sink, **hook_args)  # type: ignore[arg-type]
        if callable(setup):
            setup(hook)
        async with (
            triomail.open_pool(
                Server(sink.host, port, tls="none"),
                connections=connections,
                on_wire=hook,
                pipeline=pipeline,
            ) as pool,
            pool.send_all(_message(i) for i in range(n)) as results,
        ):
            got = [result async for result in results]
        return hook, got, sink, turns.count


@pytest.mark.parametrize("chunking", [False, True])
@pytest.mark.parametrize("later", [False, True])
async def test_each_message_is_committed_before_its_content(chunking: bool, later: bool) -> None:
    n, connections = 600, 3
    hook, results, sink, turns = await _send({"later": later}, n, connections, chunking=chunking)
    assert sorted(r.tag for r in results) == list(range(n))  # type: ignore[type-var]
    assert all(r.ok for r in results)
    assert len(sink.messages) == n
    # Every message was committed, each once, and none reached the server before.
    assert sorted(hook.committed) == list(range(n))  # type: ignore[type-var]
    assert hook.early == []
    # When a connection takes its next message at most one it wrote awaits its result
    # (each other connection: two, an end of data and the envelope behind it).
    assert hook.most_unsettled <= 1 + 2 * (connections - 1)
    if not chunking:
        # With DATA a run goes on while commits run: about one round trip a message (a
        # run cut at each message that is not committed yet would take two).
        assert turns <= n + n // 10 + 10 * connections


async def test_a_slow_commit_holds_the_content_not_the_run() -> None:
    n = 40

    def setup(hook: Hook) -> None:
        hook.hold[7] = 0.3  # the sink would have it long before, were it written

    hook, results, sink, turns = await _send({"later": True}, n, 1, setup=setup)
    assert all(r.ok for r in results) and len(sink.messages) == n
    assert sorted(hook.committed) == list(range(n)) and hook.early == []  # type: ignore[type-var]
    assert turns <= n + 6  # greeting, EHLO, QUIT: one run, one round trip a message


@pytest.mark.parametrize("pipeline", ["cross", "within", "off"])
@pytest.mark.parametrize("later", [False, True])
async def test_a_message_held_back_is_not_written_and_not_retried(
    later: bool, pipeline: Pipeline
) -> None:
    n = 30

    def setup(hook: Hook) -> None:
        hook.refuse.add(12)

    hook, results, sink, _ = await _send({"later": later}, n, 2, setup=setup, pipeline=pipeline)
    by_tag = {r.tag: r for r in results}
    assert len(results) == n and sorted(by_tag) == list(range(n))  # type: ignore[type-var]
    held = by_tag[12]
    assert held.outcome is Outcome.TRANSIENT and "not written: commit of 12 failed" in str(
        held.error
    )
    delivered = sorted(int(m.message["Subject"]) for m in sink.messages)
    assert delivered == [i for i in range(n) if i != 12]  # the others once each
    assert hook.committed.count(12) == 0
