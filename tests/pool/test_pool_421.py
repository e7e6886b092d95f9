"""A 421 anywhere releases its messages for retry at once (issue 13, item 3).

A 421 halves the server's connection limit (R44). Messages that a worker still holds
when its connection closes (the ones pipelined behind the 421, or the ones waiting out a
421 greeting) must not wait for a connection slot that only an idle connection's
``idle_timeout`` (30 s by default) would free: they go back to the queue, where the
connections still open take them at once.

The bound below is generous (a slow machine is fine) and well under the 30 s stall.
"""

from __future__ import annotations

import pytest
import trio

import triomail
from triomail import Outcome, RetryPolicy, Server
from triomail.testing import Fault, SMTPSink

MESSAGES = 200
CONNECTIONS = 10
#: Well under the pool's default idle_timeout, which the stall lasted.
PROMPTLY = 20.0


def _messages() -> list[triomail.PreparedMessage]:
    return [
        triomail.prepare(
            f"Message-ID: <m{i}@test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode(),
            sender="s@example.com",
            recipients=[f"u{i}@example.org"],
        )
        for i in range(MESSAGES)
    ]


@pytest.mark.parametrize(
    "fault",
    [
        Fault(".", code=421, times=4),
        Fault("MAIL", code=421, times=4),
        Fault("RCPT", code=421, times=4),
        Fault("DATA", code=421, times=4),
        Fault("CONNECT", code=421, times=4),
    ],
    ids=lambda f: f.command,
)
async def test_a_few_421s_do_not_stall_the_batch(fault: Fault) -> None:
    policy = RetryPolicy(initial_backoff=0.1)
    async with SMTPSink(tls=False, faults=[fault]) as sink:
        server = Server(sink.host, sink.port, tls="none")
        with trio.fail_after(PROMPTLY):
            async with triomail.open_pool(server, connections=CONNECTIONS, retry=policy) as pool:
                async with pool.send_all(_messages()) as results:
                    got = [r async for r in results]
    assert len(got) == MESSAGES
    assert all(r.outcome is Outcome.ACCEPTED for r in got), [r for r in got if not r.ok][:3]
    assert sorted(m.rcpt_to[0] for m in sink.messages) == sorted(
        f"u{i}@example.org" for i in range(MESSAGES)
    )
