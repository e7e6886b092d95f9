"""What every contract case does: connect, make messages, compare client and server.

The contract suite (``tests/interop/test_contract.py``, docs/interop.md) holds each
server's ledger (:class:`helpers.mta.Target`) against the client's results with
:func:`check_honest`: a message with an accepted recipient is in the ledger exactly once,
a transient or permanent one not at all, an unknown one at most once, and nothing else
is. What *should* have got through is stated with :func:`expect`, which raises
:class:`Shortfall`: the only exception the suite's known-failure marks accept.
"""

from __future__ import annotations

import collections
import itertools
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import triomail
from helpers.certs import client_ssl_context
from helpers.mta import Target
from triomail import Outcome, PreparedMessage, SendResult, SMTPConnection

SENDER = "sender@example.com"
CLIENT_NAME = "client.triomail.test"
#: Part of every Message-ID, so no run can mistake another run's message for its own.
RUN = uuid.uuid4().hex[:12]
_SERIAL = itertools.count()


class Shortfall(AssertionError):
    """The server and the client agree, but fewer messages got through than should."""


def connect(t: Target, *, auth: bool = False) -> AbstractAsyncContextManager[SMTPConnection]:
    """STARTTLS where the server offers it (verified against the session CA), AUTH
    only when asked and configured."""
    user, password = t.auth if (auth and t.auth) else (None, None)
    return triomail.connect(
        t.host,
        t.port,
        tls="starttls" if t.ca else "none",
        ssl_context=client_ssl_context(t.ca) if t.ca else None,
        local_hostname=CLIENT_NAME,
        username=user,
        password=password,
    )


def message(
    case: str, recipients: Sequence[str], body: bytes = b"body\r\n", sender: str = SENDER
) -> PreparedMessage:
    """A message with a Message-ID no other message of any run has."""
    n = next(_SERIAL)
    data = b"Message-ID: <%s.%d.%s@triomail.test>\r\nSubject: %s %d\r\n\r\n%s" % (
        case.encode(),
        n,
        RUN.encode(),
        case.encode(),
        n,
        body,
    )
    return triomail.prepare(data, sender=sender, recipients=list(recipients), tag=n)


def batch(case: str, n: int) -> list[PreparedMessage]:
    return [message(case, [f"r{i}@example.org"]) for i in range(n)]


def summary(results: Sequence[SendResult]) -> str:
    """``250 accepted, 250 permanent (503 x250)``: what the client saw, for reports."""
    outcomes = collections.Counter(r.outcome.value for r in results)
    codes = collections.Counter(
        r.reply.code for r in results if r.reply is not None and r.outcome is not Outcome.ACCEPTED
    )
    text = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
    return text + (f" (replies {dict(sorted(codes.items()))})" if codes else "")


async def check_honest(
    t: Target, since: int, messages: Sequence[PreparedMessage], results: Sequence[SendResult]
) -> None:
    """The server's ledger agrees with every result (see the module docs)."""
    assert len(results) == len(messages)
    delivered = [bool(r.accepted) for r in results]
    ledger = collections.Counter(await t.settle(sum(delivered), since))
    for m, r, accepted in zip(messages, results, delivered, strict=True):
        mid = m.message_id.strip("<>")
        seen = ledger.pop(mid, 0)
        if accepted:
            assert seen == 1, f"{mid}: accepted by the client, {seen}x in {t.name}'s ledger"
        elif r.outcome is Outcome.UNKNOWN:
            assert seen <= 1, f"{mid}: unknown, yet {seen}x in {t.name}'s ledger"
        else:
            assert seen == 0, f"{mid}: {r.outcome.value} ({r.reply}), yet {t.name} accepted it"
    assert not ledger, f"{t.name} accepted messages the client never reported: {ledger}"


def expect(condition: bool, results: Sequence[SendResult], what: str) -> None:
    if not condition:
        raise Shortfall(f"{what}: {summary(results)}")


async def send_through_pool(
    t: Target, messages: Sequence[PreparedMessage], *, connections: int
) -> list[SendResult]:
    """``open_pool(...).send_all(messages)``; the results in the order of *messages*."""
    server = triomail.Server(
        t.host,
        t.port,
        tls="starttls" if t.ca else "none",
        ssl_context=client_ssl_context(t.ca) if t.ca else None,
        local_hostname=CLIENT_NAME,
    )
    by_tag: dict[object, SendResult] = {}
    async with (
        triomail.open_pool(server, connections=connections) as pool,
        pool.send_all(messages) as channel,
    ):
        async for result in channel:
            by_tag[result.tag] = result
    return [by_tag[m.tag] for m in messages]
