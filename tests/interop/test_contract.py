"""One contract, every server people run (issue 17's interop matrix).

Each case below runs against each server of :data:`SERVERS`, every one a private instance
on a free loopback port started once per session (``tests/helpers``: ``postfix_targets``,
``haraka``, ``aiosmtpd_server``, ``exim``, ``opensmtpd``). docs/interop.md has the
matrix, the versions and why a cell is xfail or skip.

The contract: whatever the client reports, the server agrees. Each message carries a
Message-ID unique to the run; each server keeps a *ledger* of the Message-IDs it accepted
(its log, or a hook), and :func:`helpers.contract.check_honest` holds the two side by
side:

- a message with an accepted recipient was accepted by the server exactly once;
- a message the client reports refused or failed (transient, permanent) is not in the
  ledger at all; only ``unknown`` (lost between the final dot and its reply) may be
  either;
- the ledger holds nothing else.

That must hold everywhere, always. On top of it each case states what *should* happen
(all 500 accepted, the refused recipients refused, ...); where today's client falls
short of that on some server, the case raises :class:`Shortfall`, and only a Shortfall is
marked ``xfail(strict=True)`` for that server (:data:`KNOWN`): a broken ledger still
fails, and the day the fix lands the xfail passes, which fails the run until the mark
is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from email.message import EmailMessage

import pytest
import trio
import trustme
from helpers.aiosmtpd_server import start_aiosmtpd
from helpers.contract import (
    RUN,
    SENDER,
    Shortfall,
    batch,
    check_honest,
    connect,
    expect,
    message,
    send_through_pool,
    summary,
)
from helpers.exim import start_exim
from helpers.haraka import start_haraka
from helpers.mta import CUE_421, REFUSED_DOMAIN, ServerError, Target, probe
from helpers.opensmtpd import DEFAULT_MAX_MAILS, start_opensmtpd
from helpers.postfix import POSTFIX
from helpers.postfix_targets import start_postfix_target
from helpers.turns import counting_relay

import triomail
from triomail import Outcome

#: Server name -> how to start it (a context manager yielding a :class:`Target`).
SERVERS: dict[str, Callable[[trustme.CA], AbstractContextManager[Target]]] = {
    "postfix": lambda ca: start_postfix_target(ca, hardened=False),
    "postfix-hardened": lambda ca: start_postfix_target(ca, hardened=True),
    "haraka": start_haraka,
    "aiosmtpd": start_aiosmtpd,
    "exim": start_exim,
    "opensmtpd": start_opensmtpd,
}

#: (server, case) -> reason: the cases today's client falls short of on that server.
#: Empty since issue 17's fallback (Haraka's 503 behind an end of data).
KNOWN: dict[tuple[str, str], str] = {}


def known_failure(reason: str) -> pytest.MarkDecorator:
    """``xfail(strict=True)`` that accepts only a :class:`Shortfall` (pytest-trio hands
    the test's exception up inside an ExceptionGroup)."""
    only = pytest.RaisesGroup(Shortfall, allow_unwrapped=True)
    return pytest.mark.xfail(strict=True, raises=only, reason=reason)


def contract(case: str) -> pytest.MarkDecorator:
    """Run the decorated test against every server; a known failure where :data:`KNOWN`
    says today's client falls short."""
    params = []
    for name in SERVERS:
        reason = KNOWN.get((name, case))
        marks = [known_failure(reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return pytest.mark.parametrize("target", params, indirect=True)


# -- servers ------------------------------------------------------------------------------


class _Servers:
    """Starts each server the first time a test asks for it, keeps it for the session;
    a server that cannot start is remembered with the reason, and its tests skip."""

    def __init__(self, stack: contextlib.ExitStack, ca: trustme.CA) -> None:
        self.stack = stack
        self.ca = ca
        self.started: dict[str, Target | str] = {}

    def get(self, name: str) -> Target | str:
        if name not in self.started:
            if name.startswith("postfix") and not POSTFIX.exists():
                self.started[name] = f"{POSTFIX} not installed (.ci/run installs it)"
            else:
                try:
                    self.started[name] = probe(self.stack.enter_context(SERVERS[name](self.ca)))
                except ServerError as exc:
                    self.started[name] = str(exc).splitlines()[0]
        return self.started[name]


@pytest.fixture(scope="session")
def _servers(tls_ca: trustme.CA) -> Iterator[_Servers]:
    with contextlib.ExitStack() as stack:
        yield _Servers(stack, tls_ca)


@pytest.fixture
def target(request: pytest.FixtureRequest, _servers: _Servers) -> Target:
    name: str = request.param
    found = _servers.get(name)
    if isinstance(found, str):
        pytest.skip(f"{name}: {found}")
    # Skipped here, not in the test: a skip inside a trio test loses its reason.
    missing = [e for e in getattr(request.function, "needs", ()) if e not in found.extensions]
    if missing:
        pytest.skip(f"{name} does not offer {' or '.join(missing)}")
    if request.function is test_421_midway and not found.cue_421:
        pytest.skip(f"{name} cannot be made to answer 421 and close (see its helper)")
    return found


def needs(*extensions: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """The test runs only where the server offers all of *extensions* (EHLO keywords)."""

    def mark(test: Callable[..., object]) -> Callable[..., object]:
        test.needs = extensions  # type: ignore[attr-defined]
        return test

    return mark


# -- the contract ---------------------------------------------------------------------------


@contract("conversation")
async def test_conversation(target: Target) -> None:
    """EHLO, STARTTLS where offered, EHLO, AUTH where configured, one message, QUIT."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = "bob@example.org"
    msg["Message-ID"] = f"<conversation.{RUN}.{target.name}@triomail.test>"
    msg["Subject"] = "contract"
    msg.set_content("Hello,\n.a line that starts with a dot\nbye\n")
    prepared = triomail.prepare(msg)
    since = target.checkpoint()
    async with connect(target, auth=True) as conn:
        assert conn.tls_active is bool(target.ca)
        assert conn.authenticated is bool(target.auth)
        result = await conn.send(prepared)
    await check_honest(target, since, [prepared], [result])
    expect(result.ok, [result], "one message")


async def _send_many(target: Target, case: str, n: int, *, chunking: bool) -> None:
    messages = batch(case, n)
    since = target.checkpoint()
    async with connect(target) as conn:
        with trio.fail_after(120):
            results = await conn.send_many(messages, chunking=chunking)
    await check_honest(target, since, messages, results)
    expect(all(r.ok for r in results), results, f"send_many of {n}")


@contract("send_many_data")
async def test_send_many_data(target: Target) -> None:
    """500 messages pipelined over one connection with DATA."""
    await _send_many(target, "send_many_data", 500, chunking=False)


@contract("send_many_bdat")
@needs("CHUNKING")
async def test_send_many_bdat(target: Target) -> None:
    """500 messages pipelined over one connection with BDAT, where CHUNKING is offered."""
    await _send_many(target, "send_many_bdat", 500, chunking=True)


@contract("pool")
async def test_pool(target: Target) -> None:
    """3,000 messages through a pool of 10 connections."""
    await _pool_case(target, "pool", 3000, connections=10)


async def _pool_case(target: Target, case: str, n: int, *, connections: int) -> None:
    messages = batch(case, n)
    since = target.checkpoint()
    with trio.fail_after(180):
        results = await send_through_pool(target, messages, connections=connections)
    await check_honest(target, since, messages, results)
    expect(all(r.ok for r in results), results, f"pool of {connections}, {n} messages")


#: Round trips that are not a message's: greeting, EHLO, STARTTLS and its handshake,
#: EHLO again, QUIT, and the group a server refuses once behind an end of data.
SESSION_TURNS = 8


@contract("round_trips")
@needs("PIPELINING")
async def test_round_trips(target: Target) -> None:
    """``send_many`` of 100 messages needs at most two round trips a message, counted on
    the wire by a relay: one where the server takes the next envelope behind an end of
    data, two where it refuses that (Haraka: the connection falls back to ``within``)."""
    n = 100
    messages = batch("round_trips", n)
    since = target.checkpoint()
    async with counting_relay(target.host, target.port) as (port, turns):
        async with connect(dataclasses.replace(target, port=port)) as conn:
            with trio.fail_after(60):
                results = await conn.send_many(messages, chunking=False)
            mode = conn.pipeline
    await check_honest(target, since, messages, results)
    expect(all(r.ok and r.attempts == 1 for r in results), results, f"send_many of {n}")
    per_message = 2 if mode == "within" else 1
    assert turns.count <= per_message * n + SESSION_TURNS, (mode, turns.count)


@contract("mixed_refusals")
async def test_mixed_refusals(target: Target) -> None:
    """Pipelined transactions whose recipients the server partly, wholly or never refuses."""
    ok, no = "a@example.org", f"x@{REFUSED_DOMAIN}"
    plans = [
        [ok],
        [ok, no],
        [no],
        ["b@example.org", "c@example.net"],
        [no, f"y@{REFUSED_DOMAIN}"],
        [ok],
    ]
    messages = [message("mixed", plan) for plan in plans]
    since = target.checkpoint()
    async with connect(target) as conn:
        with trio.fail_after(60):
            results = await conn.send_many(messages)
    await check_honest(target, since, messages, results)

    def refused(address: str) -> bool:
        return address.endswith(REFUSED_DOMAIN)

    got = [(sorted(r.accepted), sorted(r.by_outcome(Outcome.PERMANENT))) for r in results]
    want = [
        (sorted(a for a in plan if not refused(a)), sorted(a for a in plan if refused(a)))
        for plan in plans
    ]
    expect(got == want, results, "accepted and refused recipients")


@contract("421_midway")
async def test_421_midway(target: Target) -> None:
    """The server answers a RCPT of the sixth of ten pipelined messages with 421 and
    closes: the five before it are accepted, it and the rest are not, and say so."""
    messages = batch("421", 10)
    messages[5] = message("421", ["r5@example.org", f"{CUE_421}@example.org"])
    since = target.checkpoint()
    async with connect(target) as conn:
        with trio.fail_after(60):
            results = await conn.send_many(messages)
        usable = conn.is_usable
    await check_honest(target, since, messages, results)
    expect(all(r.ok for r in results[:5]), results, "the five before the 421")
    # Unknown, not transient, where the message's data was already on the wire (BDAT).
    assert not any(r.accepted for r in results[5:]), summary(results)
    assert {r.outcome for r in results[5:]} <= {Outcome.TRANSIENT, Outcome.UNKNOWN}
    assert not usable


@contract("smtputf8_8bitmime")
@needs("8BITMIME", "SMTPUTF8")
async def test_smtputf8_and_8bitmime(target: Target) -> None:
    """An 8-bit body (8BITMIME), then UTF-8 addresses (SMTPUTF8), where offered."""
    since = target.checkpoint()
    body = "Grüße, ½ € ✉\r\n".encode()
    async with connect(target) as conn:
        messages = [
            message("8bit", ["r@example.org"], body),
            message("utf8", ["收件人@例子.测试"], body, sender="发件人@例子.测试"),
        ]
        results = [await conn.send(m) for m in messages]
    await check_honest(target, since, messages, results)
    expect(all(r.ok for r in results), results, "8BITMIME and SMTPUTF8")


# -- a server's session limit ---------------------------------------------------------------


@pytest.fixture
def opensmtpd_default_limit(tls_ca: trustme.CA) -> Iterator[Target]:
    try:
        with start_opensmtpd(tls_ca, max_mails=DEFAULT_MAX_MAILS) as t:
            yield t
    except ServerError as exc:
        pytest.skip(f"opensmtpd: {str(exc).splitlines()[0]}")


@known_failure("the pool retries a session-limit 452 on the same exhausted connection")
async def test_pool_after_a_session_limit(opensmtpd_default_limit: Target) -> None:
    """OpenSMTPD as shipped takes 100 messages per session, then answers RCPT with
    ``452 4.5.3 Too many recipients: Too many messages sent``. A pool of two connections
    sending 250 messages should get them all through on fresh sessions."""
    await _pool_case(opensmtpd_default_limit, "limit", 250, connections=2)


# -- is the hardened Postfix hardened? -------------------------------------------------------


async def _raw(t: Target, *steps: tuple[bytes, int]) -> list[bytes]:
    """Write each step's bytes in one write on a plain connection, then read until that
    many final reply lines came back, or a second of silence; return what each got."""
    stream = await trio.open_tcp_stream(t.host, t.port)
    async with stream:
        replies = [await stream.receive_some()]  # the greeting
        for data, expected in steps:
            await stream.send_all(data)
            got = b""
            with trio.move_on_after(1):
                while sum(line[3:4] == b" " for line in got.split(b"\r\n")) < expected:
                    got += await stream.receive_some()
            replies.append(got)
    return replies


@pytest.mark.parametrize("target", ["postfix", "postfix-hardened"], indirect=True)
async def test_postfix_hardening_is_on(target: Target) -> None:
    """The hardened instance really enforces its two parameters, so its green contract
    cells mean something. NOOP pipelined behind HELO (which advertises no PIPELINING):
    554 and disconnect. ``<LF>.<CR><LF>`` in DATA: the end of the message for the
    default instance, message content for the hardened one, which wants
    ``<CR><LF>.<CR><LF>`` (Postfix 3.7.11 reads ``yes`` as ``normalize``)."""
    hardened = target.name == "postfix-hardened"
    _, sync = await _raw(target, (b"HELO client.triomail.test\r\nNOOP\r\n", 2))
    if hardened:
        assert b"554 5.5.0 Error: SMTP protocol synchronization" in sync, sync
    else:
        assert sync.count(b"250 ") == 2, sync
    *_, bare, proper = await _raw(
        target,
        (b"EHLO client.triomail.test\r\n", 1),
        (b"MAIL FROM:<sender@example.com>\r\n", 1),
        (b"RCPT TO:<bare@example.org>\r\n", 1),
        (b"DATA\r\n", 1),
        (b"Subject: bare\r\n\r\nline one\n.\r\n", 1),
        (b"NOOP\r\n.\r\n", 1),
    )
    if hardened:
        assert (bare, proper[:4]) == (b"", b"250 "), (bare, proper)
    else:
        assert (bare[:4], proper[:4]) == (b"250 ", b"250 "), (bare, proper)
