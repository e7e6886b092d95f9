"""100,000 messages from a generator through the pool, against Postfix's smtp-sink:
the generator is pulled only as workers free up, so memory stays bounded (issue 4)."""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.postfix import free_loopback_port

import triomail

SMTP_SINK = Path("/usr/sbin/smtp-sink")


@pytest.fixture
def smtp_sink() -> Iterator[int]:
    if not SMTP_SINK.exists():
        pytest.skip("Postfix smtp-sink not installed (.ci/run installs postfix)")
    port = free_loopback_port()
    proc = subprocess.Popen(
        [str(SMTP_SINK), "-u", "nobody", f"127.0.0.1:{port}", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def _wait_listening(port: int) -> None:
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def test_100k_messages_from_a_generator_in_bounded_memory(smtp_sink: int) -> None:
    await _wait_listening(smtp_sink)
    total = 100_000
    connections = 20
    pulled = 0
    completed = 0
    most_ahead = 0
    body = b"Subject: bulk\r\n\r\n" + (b"x" * 70 + b"\r\n") * 14

    def messages() -> Iterator[triomail.PreparedMessage]:
        nonlocal pulled, most_ahead
        for i in range(total):
            pulled += 1
            most_ahead = max(most_ahead, pulled - completed)
            yield triomail.prepare(body, sender="a@example.com", recipients=[f"r{i}@example.org"])

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with triomail.open_pool(
        triomail.Server("127.0.0.1", smtp_sink, tls="none"), connections=connections
    ) as pool:
        async with pool.send_all(messages()) as results:
            async for result in results:
                assert result.ok, result
                completed += 1
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert completed == total
    # Never more than the bounded hand-over buffer (16 per worker), the results
    # channel's room (16 per worker), and a few per worker on the wire: a pipelined
    # run hands each acceptance over as it comes, not at the end of the run.
    assert most_ahead <= 2 * connections * 16 + 4 * connections, most_ahead
    assert rss_growth_mb < 50, rss_growth_mb
