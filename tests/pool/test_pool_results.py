"""How results leave the pool: ``ResultChannel`` and the one channel per ``send_all``.

A pipelined run finishes many messages at once. These tests pin down that a consumer
takes a burst of waiting results without a scheduling round for each (so it does not
hold the workers back to one result per round), that it is still cancellable at every
``receive``, and that the channel ends exactly when the last result is delivered.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

import triomail
from triomail import Outcome, ResultChannel, SendResult, Server
from triomail.testing import Fault, SMTPSink


def _result(i: int) -> SendResult:
    return SendResult("a@example.com", (), None, f"<{i}@test>", None, tag=i)


def _message(i: int) -> triomail.PreparedMessage:
    data = f"Message-ID: <m{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"r{i}@example.org"], tag=i)


async def _rounds_to_receive(channel: trio.abc.ReceiveChannel[SendResult], n: int) -> int:
    """Scheduler rounds another task gets while ``n`` waiting results are received."""
    rounds = 0
    done = False

    async def ticker() -> None:
        nonlocal rounds
        while not done:
            rounds += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # let the ticker start
        start = rounds
        for i in range(n):
            assert (await channel.receive()).tag == i
        done = True
    return rounds - start


async def test_a_burst_of_waiting_results_costs_few_scheduling_rounds() -> None:
    n = 256
    for wrapped in (False, True):
        send, receive = trio.open_memory_channel[SendResult](n)
        for i in range(n):
            send.send_nowait(_result(i))
        channel: trio.abc.ReceiveChannel[SendResult] = (
            ResultChannel(receive) if wrapped else receive
        )
        rounds = await _rounds_to_receive(channel, n)
        if wrapped:
            # One fairness round per FAIR_EVERY results, and the ticker's own start.
            assert rounds <= n // ResultChannel.FAIR_EVERY + 2
        else:
            # A plain memory channel: a round per result (what ResultChannel avoids).
            assert rounds >= n - 1


async def test_receive_is_a_cancellation_point_even_with_results_waiting() -> None:
    send, receive = trio.open_memory_channel[SendResult](4)
    send.send_nowait(_result(0))
    channel = ResultChannel(receive)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await channel.receive()
    assert channel.receive_nowait().tag == 0  # nothing was lost to the cancellation


async def test_the_channel_ends_after_the_last_result_of_a_send_all() -> None:
    async with (
        SMTPSink(tls=False) as sink,
        triomail.open_pool(Server(sink.host, sink.port, tls="none"), connections=3) as pool,
        pool.send_all(_message(i) for i in range(300)) as results,
    ):
        assert isinstance(results, ResultChannel)
        tags = [result.tag async for result in results]
        assert sorted(tags) == list(range(300))  # type: ignore[type-var]
        with pytest.raises(trio.EndOfChannel):
            results.receive_nowait()
        assert pool.statistics().done[Outcome.ACCEPTED.value] == 300
    assert len(sink.messages) == 300


async def test_two_send_alls_and_a_send_share_a_pool_and_each_ends_alone() -> None:
    async with (
        SMTPSink(tls=False) as sink,
        triomail.open_pool(Server(sink.host, sink.port, tls="none"), connections=2) as pool,
    ):
        seen: dict[str, list[object]] = {"a": [], "b": []}

        async def consume(name: str, first: int) -> None:
            async with pool.send_all(_message(i) for i in range(first, first + 50)) as results:
                async for result in results:
                    seen[name].append(result.tag)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, "a", 0)
            nursery.start_soon(consume, "b", 1000)
            single = await pool.send(_message(5000))
        assert single.ok and single.tag == 5000
        assert sorted(seen["a"]) == list(range(50))  # type: ignore[type-var]
        assert sorted(seen["b"]) == list(range(1000, 1050))  # type: ignore[type-var]
    assert len(sink.messages) == 101


async def test_a_consumer_that_leaves_early_does_not_stall_the_pool() -> None:
    async with (
        SMTPSink(tls=False) as sink,
        triomail.open_pool(Server(sink.host, sink.port, tls="none"), connections=2) as pool,
    ):
        async with pool.send_all(_message(i) for i in range(200)) as results:
            async for _ in results:
                break  # leaves with results still coming
        # The rest is still sent (the feeder stopped, the queued ones finish) and counted.
        with trio.fail_after(10):
            await pool.wait_idle()
        done = pool.statistics().done
        assert done[Outcome.ACCEPTED.value] == len(sink.messages) >= 1


async def test_acceptances_reach_the_consumer_while_the_pipelined_run_goes_on() -> None:
    # One connection, so all ten messages go in one pipelined run; the sink holds back
    # its reply to the end of data of the sixth. The first five results must not wait
    # for the run to end (a journal records them at once; nothing piles up).
    hold = 1.5
    faults = [Fault(".", delay=hold, message=6)]
    async with (
        SMTPSink(tls=False, hide_extensions=["CHUNKING"], faults=faults) as sink,
        triomail.open_pool(Server(sink.host, sink.port, tls="none"), connections=1) as pool,
        pool.send_all(_message(i) for i in range(10)) as results,
    ):
        start = trio.current_time()
        arrivals = {result.tag: trio.current_time() - start async for result in results}
    assert sorted(arrivals) == list(range(10))  # type: ignore[type-var]
    assert all(arrivals[i] < hold / 2 for i in range(5)), arrivals
    assert all(arrivals[i] >= hold * 0.9 for i in range(5, 10)), arrivals


async def test_stop_connecting_abandons_connection_attempts_and_settles_at_once() -> None:
    """A server that accepts TCP and never greets: workers wait for a greeting (300 s by
    default). ``stop_connecting`` ends those waits; every message gets a transient
    "not sent" result at once, so a graceful stop is not held up by them."""
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with (
            triomail.open_pool(Server("127.0.0.1", port, tls="none"), connections=2) as pool,
            pool.send_all(_message(i) for i in range(5)) as results,
        ):
            with trio.move_on_after(0.5):
                async for _ in results:
                    raise AssertionError("a result before any greeting")
            assert pool.statistics().in_flight > 0  # waiting for greetings
            pool.stop_connecting()
            with trio.fail_after(5):
                got = [result async for result in results]
        assert len(got) == 5
        assert all(r.outcome is Outcome.TRANSIENT and not r.mail_accepted for r in got)
        assert all("stopped opening connections" in (r.error or "") for r in got)
        assert len(held) >= 1
        nursery.cancel_scope.cancel()
