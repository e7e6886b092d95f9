"""triomail's three pipelining modes against the policies hardened servers apply, played
by the capture sink (issue 17): every message ends accepted and stored once, or with an
honest outcome and not stored.

The policies:

- ``postfix``: ``forbid_unauth_pipelining``, Postfix's rule: a command with input
  pipelined behind it where RFC 2920 §3.1 does not allow that gets ``554`` and the
  connection is closed. triomail never pipelines there, so every mode survives.
- ``haraka``: ``refuse_pipelined_after_data``: ``503`` to every command behind an end of
  data. Every mode survives; ``cross`` by falling back to ``within`` once.
- ``no-cross``: ``Fault(".", forbid_pipelined=True)``: Postfix's rule applied to the end
  of data too (no server we know does this): ``554`` instead of the end-of-data reply,
  then close. ``within`` and ``off`` survive; ``cross`` does not: the message whose end
  of data had the next envelope behind it is refused (the server said 554 to it) and
  the messages after it never started.
- ``no-pipelining``: the rule behind MAIL, RCPT and the end of data: only ``off``
  survives.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers.turns import counting_relay

import triomail
from triomail import Outcome
from triomail.testing import Fault, SMTPSink

N = 12
POLICIES: dict[str, dict[str, Any]] = {
    "postfix": {"forbid_unauth_pipelining": True, "strict": False},
    "haraka": {"refuse_pipelined_after_data": True},
    "no-cross": {"faults": [Fault(".", forbid_pipelined=True)]},
    "no-pipelining": {"faults": [Fault(c, forbid_pipelined=True) for c in ("MAIL", "RCPT", ".")]},
}
#: Which (policy, mode) pairs get every message through on one connection.
SURVIVES = {
    ("postfix", "cross"), ("postfix", "within"), ("postfix", "off"),
    ("haraka", "cross"), ("haraka", "within"), ("haraka", "off"),
    ("no-cross", "within"), ("no-cross", "off"),
    ("no-pipelining", "off"),
}  # fmt: skip


def _message(i: int) -> triomail.PreparedMessage:
    data = f"Message-ID: <p{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
    return triomail.prepare(data, sender="s@example.com", recipients=[f"r{i}@example.org"], tag=i)


def _stored_ids(sink: SMTPSink) -> list[bytes]:
    return [m.data.split(b"\r\n", 1)[0] for m in sink.messages]


def _honest(results: list[triomail.SendResult], sink: SMTPSink) -> None:
    """Accepted means stored exactly once; anything else means not stored."""
    stored = _stored_ids(sink)
    assert len(stored) == len(set(stored))
    for i, result in enumerate(results):
        mid = f"Message-ID: <p{i}@test>".encode()
        assert (mid in stored) == result.ok, (i, result)


@pytest.mark.parametrize("mode", ["cross", "within", "off"])
@pytest.mark.parametrize("policy", POLICIES)
async def test_send_many_in_each_mode_against_each_policy(policy: str, mode: str) -> None:
    async with (
        SMTPSink(tls=False, hide_extensions=["CHUNKING"], **POLICIES[policy]) as sink,
        triomail.connect(sink.host, sink.port, tls="none") as conn,
    ):
        results = await conn.send_many([_message(i) for i in range(N)], pipeline=mode)  # type: ignore[arg-type]
    _honest(results, sink)
    assert all(r.attempts == 1 for r in results)
    if (policy, mode) in SURVIVES:
        assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
        return
    # Closed on the first violation: what was refused says so, the rest never started.
    assert not all(r.ok for r in results)
    refused = [r for r in results if r.outcome is Outcome.PERMANENT]
    assert [str(r.reply) for r in refused] == ["554 5.5.0 Error: SMTP protocol synchronization"]
    after = results[results.index(refused[0]) + 1 :]
    assert after and all(r.outcome is Outcome.TRANSIENT for r in after)


@pytest.mark.parametrize("mode", ["within", "off"])
async def test_the_pool_in_a_mode_that_survives_sends_everything_once(mode: str) -> None:
    """``no-cross`` closes a connection that pipelines behind an end of data at all: the
    pool in ``within`` or ``off`` never does, on any of its connections."""
    async with (
        SMTPSink(tls=False, hide_extensions=["CHUNKING"], **POLICIES["no-cross"]) as sink,
        triomail.open_pool(
            triomail.Server(sink.host, sink.port, tls="none"), connections=3, pipeline=mode
        ) as pool,
        pool.send_all(_message(i) for i in range(200)) as results,
    ):
        got = [r async for r in results]
    assert all(r.ok and r.attempts == 1 for r in got)
    assert len(set(_stored_ids(sink))) == len(sink.messages) == 200


@pytest.mark.parametrize("policy", ["haraka", "no-cross"])
async def test_the_fallback_needs_at_most_two_round_trips_a_message(policy: str) -> None:
    """Against Haraka's policy ``send_many`` meets the refusal once and then waits for
    each end-of-data reply: the envelope, then the body, two round trips a message, the
    floor when an end of data must be answered before the next MAIL. Counted on the
    wire by a relay; the greeting, EHLO and QUIT are three more. ``within``
    from the start, against the stricter policy, is the same two."""
    n = 50
    async with (
        SMTPSink(tls=False, hide_extensions=["CHUNKING"], **POLICIES[policy]) as sink,
        counting_relay(sink.host, sink.port) as (port, turns),
    ):
        async with triomail.connect(sink.host, port, tls="none") as conn:
            if policy == "no-cross":
                conn.pipeline = "within"
            results = await conn.send_many([_message(i) for i in range(n)])
            assert conn.pipeline == "within"  # fell back, or kept
        await sink.wait_for_messages(n)
    _honest(results, sink)
    assert all(r.ok and r.attempts == 1 for r in results)
    assert turns.count == 2 * n + 3  # not more, and (the floor) not fewer
