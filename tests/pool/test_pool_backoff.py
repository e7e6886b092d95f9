"""Backoff stays bounded however long a server refuses connections (issue 13, item 4).

The delay grows by the policy's multiplier up to ``max_backoff``; it must be computed
without raising the multiplier to the attempt count (``2.0 ** 1024`` overflows a float),
and the pool's count of failed windows must not grow without bound either.
"""

from __future__ import annotations

import math

import pytest
import trio
from helpers.postfix import free_loopback_port

import triomail
from triomail import Outcome, RetryPolicy, Server


@pytest.mark.parametrize("attempt", [1, 2, 10, 1_024, 1_025, 5_000, 10**9])
def test_delay_is_capped_at_any_attempt_count(attempt: int) -> None:
    policy = RetryPolicy(jitter=0.0)
    delay = policy.delay(attempt)
    assert math.isfinite(delay)
    assert 0.0 < delay <= policy.max_backoff
    if attempt >= 10:
        assert delay == policy.max_backoff


def test_delay_grows_by_the_multiplier_until_the_cap() -> None:
    policy = RetryPolicy(initial_backoff=1.0, multiplier=3.0, max_backoff=100.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_a_multiplier_of_one_or_less_never_grows(multiplier: float) -> None:
    policy = RetryPolicy(initial_backoff=2.0, multiplier=multiplier, jitter=0.0)
    assert policy.delay(10**6) <= 2.0


async def test_pool_survives_thousands_of_refused_connects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over 1,024 backoff windows against a port nobody listens on: the message ends
    not sent (transient) when ``give_up_after`` passes, and nothing overflows."""
    server = Server("127.0.0.1", free_loopback_port(), tls="none")
    policy = RetryPolicy(max_backoff=1e9, give_up_after=6_000.0)
    message = triomail.prepare(
        b"Subject: x\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@example.org"]
    )
    async with triomail.open_pool(server, connections=2, retry=policy) as pool:
        result = await pool.send(message)
        state = pool._dispatch.servers.states[0]
        failures = state.failures
    assert result.outcome is Outcome.TRANSIENT
    assert trio.current_time() >= 6_000.0
    assert 0 < failures <= 64
