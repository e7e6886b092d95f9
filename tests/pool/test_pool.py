"""The pool (issue 4) against aiosmtpd with scripted misbehaviour, and the scripted server.

aiosmtpd runs in its own thread with a handler whose hooks can refuse, stall or drop a
connection for chosen messages, so every fault here happens on a real TCP connection to
a real third-party server.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from helpers.postfix import free_loopback_port
from helpers.scripted import (
    ehlo_reply,
    expect,
    expect_data,
    expect_line,
    reply,
    scripted_server,
    send_lines,
)

import triomail
from triomail import Outcome, RetryPolicy, Server

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=0.2)


def raw(i: int, *recipients: str, subject: str = "hello") -> triomail.PreparedMessage:
    data = f"Message-ID: <m{i}@test>\r\nSubject: {subject} {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(
        data, sender="from@example.com", recipients=list(recipients) or [f"r{i}@example.org"], tag=i
    )


class FaultyHandler:
    """aiosmtpd hooks; ``rules`` decide per command what to do (thread-safe counters)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivered: list[tuple[str, list[str], bytes]] = []
        self.sessions: set[int] = set()
        self.mail_count = 0
        self.on_mail: Callable[[Any, int], str | None] = lambda server, n: None
        self.on_rcpt: Callable[[Any, str], str | None] = lambda server, rcpt: None
        self.on_data: Callable[[Any, bytes], Any] = lambda server, data: None
        self.auth_attempts = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        with self.lock:
            self.sessions.add(id(session))
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.mail_count += 1
            n = self.mail_count
        verdict = self.on_mail(server, n)
        if verdict is not None:
            return verdict
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        verdict = self.on_rcpt(server, address)
        if verdict is not None:
            return verdict
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        action = self.on_data(server, envelope.content)
        if asyncio.iscoroutine(action):
            action = await action
        if isinstance(action, str):
            return action
        with self.lock:
            self.delivered.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 queued"


@pytest.fixture
def faulty() -> Iterator[tuple[FaultyHandler, Server]]:
    handler = FaultyHandler()
    port = free_loopback_port()

    def authenticator(*args: Any) -> AuthResult:
        handler.auth_attempts += 1
        return AuthResult(success=False, handled=False)

    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield handler, Server("127.0.0.1", port, tls="none")
    finally:
        controller.stop()


def _drop(server: Any) -> None:
    server.transport.close()


async def test_pool_sends_a_batch_over_reused_connections(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    async with triomail.open_pool(server, connections=4) as pool:
        async with pool.send_all(raw(i) for i in range(40)) as results:
            got = {r.tag: r async for r in results}
        stats = pool.statistics()
    assert sorted(got) == list(range(40))
    assert all(r.ok and r.attempts == 1 for r in got.values())
    assert len(handler.delivered) == 40
    assert len(handler.sessions) <= 4  # reuse: never a connection per message
    assert stats.done["accepted"] == 40
    assert "40 accepted" in repr(pool)


async def test_url_server_and_single_send(faulty: tuple[FaultyHandler, Server]) -> None:
    handler, server = faulty
    async with triomail.open_pool(f"smtp+plain://127.0.0.1:{server.port}", connections=2) as pool:
        result = await pool.send(raw(1, "a@example.org", "b@example.org"))
    assert result.ok and result.accepted == ["a@example.org", "b@example.org"]
    assert handler.delivered[0][1] == ["a@example.org", "b@example.org"]


async def test_r48_one_hanging_and_one_dropping_connection_do_not_stall_the_others(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    """10 connections; message 5 hangs mid-DATA, message 7's connection drops after RCPT."""
    handler, server = faulty
    hung = threading.Event()
    dropped = threading.Event()

    def on_data(srv: Any, data: bytes) -> Any:
        if b"Subject: hang 5" in data and not hung.is_set():
            hung.set()
            return asyncio.sleep(3600)  # the reply never comes in time
        return None

    def on_rcpt(srv: Any, rcpt: str) -> str | None:
        if rcpt == "r7@example.org" and not dropped.is_set():
            dropped.set()
            _drop(srv)
            return "250 OK"
        return None

    handler.on_data = on_data
    handler.on_rcpt = on_rcpt
    messages = [raw(i, subject="hang" if i == 5 else "hello") for i in range(60)]
    async with triomail.open_pool(
        server, connections=10, message_deadline=1.0, retry=FAST_RETRY
    ) as pool:
        async with pool.send_all(messages) as results:
            got = {r.tag: r async for r in results}
    assert hung.is_set() and dropped.is_set()
    assert sorted(got) == list(range(60))  # every message has an outcome
    assert all(r.ok for r in got.values()), [r for r in got.values() if not r.ok]
    # The hung message was past its final dot: unknown, resent (at-least-once, R38).
    assert got[5].attempts == 2 and got[5].earlier_unknown and "unknown" in (got[5].error or "")
    assert not any(got[i].earlier_unknown for i in range(60) if i != 5)
    assert got[7].attempts == 2  # lost before the dot: transient, retried
    assert all(got[i].attempts == 1 for i in range(60) if i not in (5, 7))
    subjects = [d[2].split(b"\r\n")[1] for d in handler.delivered]
    assert subjects.count(b"Subject: hello 7") == 1


async def test_r45_server_closing_an_idle_connection_is_retried_transparently(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty

    def on_data(srv: Any, data: bytes) -> None:
        # After accepting, the server says 421 on the idle connection and hangs up.
        loop = asyncio.get_running_loop()

        def close() -> None:
            srv.transport.write(b"421 4.4.2 idle too long\r\n")
            srv.transport.close()

        loop.call_later(0.05, close)

    handler.on_data = on_data
    async with triomail.open_pool(server, connections=1) as pool:
        first = await pool.send(raw(1))
        await trio.sleep(0.3)
        second = await pool.send(raw(2))
        stats = pool.statistics()
    assert first.ok and second.ok
    assert second.attempts == 1  # not counted as a failed attempt
    assert stats.transparent_retries == 1
    assert [d[2].count(b"body") for d in handler.delivered] == [1, 1]


async def test_r45_421_to_mail_on_reuse_is_retried_on_a_fresh_connection(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    handler.on_mail = lambda srv, n: "421 4.3.2 shutting down" if n == 2 else None
    async with triomail.open_pool(server, connections=1) as pool:
        results = [await pool.send(raw(i)) for i in range(3)]
        stats = pool.statistics()
    assert all(r.ok and r.attempts == 1 for r in results)
    assert stats.transparent_retries == 1
    assert len(handler.sessions) == 2


async def test_r42_452_too_many_recipients_sends_the_rest_in_a_follow_up_transaction(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    counts: dict[int, int] = {}

    def on_rcpt(srv: Any, rcpt: str) -> str | None:
        key = id(srv)
        counts[key] = counts.get(key, 0) + 1
        return "452 4.5.3 too many recipients" if counts[key] > 3 else None

    def reset(srv: Any, data: bytes) -> None:
        counts.clear()

    handler.on_rcpt = on_rcpt
    handler.on_data = reset
    recipients = [f"u{i}@example.org" for i in range(8)]
    async with triomail.open_pool(server, connections=1, retry=FAST_RETRY) as pool:
        result = await pool.send(raw(1, *recipients))
    assert result.ok, result
    assert result.accepted == recipients  # in the original order
    assert [len(d[1]) for d in handler.delivered] == [3, 3, 2]
    assert result.attempts == 1  # R42: a 452 is not a failed attempt


async def test_r41_permanent_recipients_are_not_retried(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    seen: list[str] = []

    def on_rcpt(srv: Any, rcpt: str) -> str | None:
        seen.append(rcpt)
        if rcpt.startswith("bad"):
            return "550 5.1.1 no such user"
        if rcpt.startswith("later") and seen.count(rcpt) == 1:
            return "450 4.2.0 try later"
        return None

    handler.on_rcpt = on_rcpt
    async with triomail.open_pool(server, connections=1, retry=FAST_RETRY) as pool:
        result = await pool.send(raw(1, "ok@example.org", "bad@example.org", "later@example.org"))
    outcomes = {r.recipient: r.outcome for r in result.recipients}
    assert outcomes == {
        "ok@example.org": Outcome.ACCEPTED,
        "bad@example.org": Outcome.PERMANENT,
        "later@example.org": Outcome.ACCEPTED,
    }
    assert seen.count("bad@example.org") == 1 and seen.count("ok@example.org") == 1
    assert [d[1] for d in handler.delivered] == [["ok@example.org"], ["later@example.org"]]
    assert result.attempts == 2


async def test_transient_failures_give_up_after_max_attempts(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    handler.on_rcpt = lambda srv, rcpt: "451 4.3.0 busy"
    async with triomail.open_pool(server, connections=1, retry=FAST_RETRY) as pool:
        result = await pool.send(raw(1))
    assert result.outcome is Outcome.TRANSIENT and result.attempts == FAST_RETRY.max_attempts
    assert handler.delivered == []


async def test_max_messages_per_connection(faulty: tuple[FaultyHandler, Server]) -> None:
    handler, server = faulty
    async with triomail.open_pool(server, connections=1, max_messages_per_connection=3) as pool:
        async with pool.send_all(raw(i) for i in range(10)) as results:
            assert len([r async for r in results if r.ok]) == 10
    assert len(handler.sessions) == 4


async def test_idle_connections_are_closed(faulty: tuple[FaultyHandler, Server]) -> None:
    handler, server = faulty
    async with triomail.open_pool(server, connections=2, idle_timeout=0.2) as pool:
        assert (await pool.send(raw(1))).ok
        assert pool.statistics().connections_open == 1
        await trio.sleep(0.5)
        assert pool.statistics().connections_open == 0
        assert (await pool.send(raw(2))).ok  # reopened lazily
    assert len(handler.sessions) == 2


async def test_r35_authentication_failure_fails_every_message_at_once(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    bad = Server(
        server.host,
        server.port,
        tls="none",
        username="u",
        password="nope",
        allow_insecure_auth=True,
    )
    async with triomail.open_pool(bad, connections=3, retry=FAST_RETRY) as pool:
        async with pool.send_all(raw(i) for i in range(20)) as results:
            got = [r async for r in results]
    assert len(got) == 20
    assert all(r.outcome is Outcome.PERMANENT for r in got)
    assert all(r.error and "535" in r.error and "nope" not in r.error for r in got)
    assert handler.auth_attempts <= 3  # one per worker at most, never a retry loop


async def test_unreachable_server_ends_transient_after_retries() -> None:
    port = free_loopback_port()  # nothing listens there
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    async with triomail.open_pool(
        Server("127.0.0.1", port, tls="none"), connections=2, retry=policy
    ) as pool:
        result = await pool.send(raw(1))
    assert result.outcome is Outcome.TRANSIENT and result.attempts == 2
    assert result.error and "cannot connect" in result.error


async def test_failover_to_a_second_server(faulty: tuple[FaultyHandler, Server]) -> None:
    handler, server = faulty
    dead = Server("127.0.0.1", free_loopback_port(), tls="none", weight=100.0)
    async with triomail.open_pool([dead, server], connections=2, retry=FAST_RETRY) as pool:
        results = [await pool.send(raw(i)) for i in range(5)]
    assert all(r.ok for r in results)
    assert len(handler.delivered) == 5


async def test_queue_timeout_says_why(faulty: tuple[FaultyHandler, Server]) -> None:
    handler, server = faulty

    async def slow(srv: Any, data: bytes) -> None:
        await asyncio.sleep(0.5)

    handler.on_data = lambda srv, data: slow(srv, data)
    async with triomail.open_pool(
        server, connections=1, queue_timeout=0.1, pipeline_depth=1
    ) as pool:
        async with trio.open_nursery() as nursery:
            results: list[triomail.SendResult] = []

            async def one(i: int) -> None:
                results.append(await pool.send(raw(i)))

            for i in range(3):
                nursery.start_soon(one, i)
    waited = [r for r in results if r.error and "waiting for a free connection" in r.error]
    assert waited and all(r.outcome is Outcome.TRANSIENT for r in waited)
    assert "1 of 1 busy" in (waited[0].error or "")


def _client_sockets_to(port: int) -> int:
    """Sockets of this process connected *to* ``port`` (the client side only)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/self/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[9] in inodes:
                count += 1
    return count


async def test_r48_cancelling_the_pool_leaves_nothing_behind(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty

    async def slow(srv: Any, data: bytes) -> None:
        await asyncio.sleep(5)

    handler.on_data = lambda srv, data: slow(srv, data)
    with trio.move_on_after(0.5) as scope:
        async with triomail.open_pool(server, connections=3) as pool:
            async with pool.send_all(raw(i) for i in range(10)) as results:
                async for _ in results:
                    pass
    assert scope.cancelled_caught
    # Every message is reported once: those started as unknown (past the final dot)
    # here (a pipelined batch cut short is unknown as a whole: which message was past
    # its final dot is not known, and unknown is the answer that cannot lose mail),
    # those still queued as not sent.
    tags = [r.tag for r in pool.interrupted]
    assert sorted(tags) == list(range(10))  # type: ignore[type-var]
    started = [r for r in pool.interrupted if r.outcome is Outcome.UNKNOWN]
    assert len(started) >= 3
    for r in pool.interrupted:
        assert r.outcome is Outcome.UNKNOWN or "not sent" in (r.error or ""), r
    assert pool.statistics().connections_open == 0
    assert server.port is not None and _client_sockets_to(server.port) == 0


async def test_retry_backoff_on_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    """R43: a 451 is retried after the policy's backoff, measured on virtual time."""
    policy = RetryPolicy(max_attempts=3, initial_backoff=60.0, jitter=0.0)
    script = [
        send_lines("220 scripted ESMTP"),
        expect(b"EHLO "),
        ehlo_reply("8BITMIME"),
        expect_line(b"MAIL FROM:<from@example.com>\r\n"),
        reply(250, "ok"),
        expect_line(b"RCPT TO:<r1@example.org>\r\n"),
        reply(451, "4.7.1 greylisted, come back later"),
        expect_line(b"RSET\r\n"),
        reply(250, "reset"),
        expect_line(b"MAIL FROM:<from@example.com>\r\n", timeout=120),
        reply(250, "ok"),
        expect_line(b"RCPT TO:<r1@example.org>\r\n"),
        reply(250, "ok"),
        expect_line(b"DATA\r\n"),
        reply(354, "go"),
        expect_data(),
        reply(250, "2.0.0 queued"),
        expect_line(b"QUIT\r\n"),
        reply(221, "bye"),
    ]
    async with scripted_server(script) as srv:
        async with triomail.open_pool(
            Server(srv.host, srv.port, tls="none"), connections=1, retry=policy, idle_timeout=3600
        ) as pool:
            start = trio.current_time()
            result = await pool.send(raw(1))
            elapsed = trio.current_time() - start
            stats = pool.statistics()
    assert result.ok and result.attempts == 2
    assert 60.0 <= elapsed < 61.0
    # A 4.7.x reply throttles the server (R44): its connection limit is halved (min 1).
    assert stats.retries == 1


async def test_connect_pool_runs_in_the_callers_nursery(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    handler, server = faulty
    async with trio.open_nursery() as nursery:
        pool = triomail.connect_pool(nursery, server, connections=2)
        results = [await pool.send(raw(i)) for i in range(3)]
        await pool.aclose()  # drains, then the workers QUIT and end: the nursery can exit
    assert all(r.ok for r in results)
    assert pool.statistics().connections_open == 0
    assert len(handler.delivered) == 3


async def test_r44_throttling_halves_the_connection_limit_and_recovers(
    faulty: tuple[FaultyHandler, Server],
) -> None:
    """R40/R44: a 421 4.7.0 halves that server's connection limit; successes restore it."""
    handler, server = faulty
    handler.on_mail = lambda srv, n: "421 4.7.0 slow down" if n == 1 else None
    label = f"{server.host}:{server.port}"
    async with triomail.open_pool(server, connections=8, retry=FAST_RETRY) as pool:
        first = await pool.send(raw(0))
        throttled = pool.statistics().servers[label]
        for i in range(1, 41):
            assert (await pool.send(raw(i))).ok
        recovered = pool.statistics().servers[label]
    assert first.ok and first.attempts == 2  # the 421 was a transient attempt
    assert throttled == 4
    assert recovered == 6  # one step per 20 successes
