"""A pool of SMTP connections sending a batch concurrently, run by a nursery.

Theory of operation
-------------------
``open_pool`` opens a nursery and starts ``connections`` worker tasks in it
(:mod:`.worker`); ``start_pool`` starts them in the caller's nursery. Messages reach
them over a bounded queue (:mod:`.dispatch`), so a producer runs only a little ahead and
an unbounded iterable is consumed lazily; every result comes back on the channel of the
``send_all`` (or ``send``) it came from, as soon as it is known (:mod:`.channels`).

Every message handed over ends with exactly one result; the job ledger (:mod:`.jobs`)
keeps that promise, decides retries (transient outcomes after a backoff with jitter,
only for the recipients that need it, R41-R43; unknown ones resent with the same bytes
unless ``RetryPolicy(unknown="at-most-once")``, R38) and keeps the counts. Cancelling
the pool delivers none of the rest: each goes to :attr:`Pool.interrupted` instead.

The servers, their failover and their backpressure (R44) are in :mod:`.servers`; the
options, written once, in :mod:`.options`; what the pool needs from a connection, in
:mod:`.interfaces`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar, cast, overload

import trio

from .._core.results import SendResult
from .channels import ResultChannel, Results
from .dispatch import Dispatch
from .jobs import MessageLike
from .options import PoolOptions, RetryPolicy
from .servers import Server, Servers, checked
from .worker import Worker, as_prepared

__all__ = [
    "Pool",
    "PoolOptions",
    "PoolStatistics",
    "ResultChannel",
    "RetryPolicy",
    "Server",
    "connect_pool",
    "start_pool",
    "open_pool",
]

ServerSpec = Server | str | Sequence[Server | str]

_P = ParamSpec("_P")
_A = TypeVar("_A")
_B = TypeVar("_B")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool (trio's ``statistics()`` convention)."""

    connections_open: int
    connections_busy: int
    connections_idle: int
    queued: int
    in_flight: int
    done: dict[str, int]
    retries: int
    transparent_retries: int
    unknown_seen: int
    rate: float | None
    servers: dict[str, int]
    #: Messages waiting for a retry's backoff, or for their server to answer again.
    backoff: int = 0


class Pool:
    """Sends messages over a bounded set of reused connections. Use :func:`open_pool`.

    Every message handed to :meth:`send_all` (or :meth:`send`) ends with exactly one
    result: on the results channel, or, if the pool is cancelled first, in
    :attr:`interrupted`.
    """

    def __init__(
        self, nursery: trio.Nursery, servers: Sequence[Server], options: PoolOptions
    ) -> None:
        """Start ``options.connections`` workers in ``nursery``."""
        servers_state = Servers(servers, options.connections, options.pipeline)
        self._dispatch = Dispatch(nursery, servers_state, options)
        self._ledger = self._dispatch.ledger
        #: Results that a cancellation of the pool kept from their consumer (R48), one
        #: per message: cut off on the wire (unknown once its final dot may have gone
        #: out, else transient); queued or waiting for a connection (transient, "not
        #: sent", ``attempts == 0``); waiting for a retry's backoff (the last attempt's
        #: replies: transient, or unknown, and ``earlier_unknown`` if an attempt may
        #: have delivered it); or already known when the consumer had no room for it,
        #: or had just left its ``send_all`` block because of the cancellation.
        #: Complete once the pool's nursery (the ``open_pool`` block) has ended. A
        #: message that a cancelled ``send_all`` or ``send`` was still handing over is
        #: here too ("not sent"), even if the pool goes on.
        self.interrupted: list[SendResult] = self._ledger.interrupted
        for _ in range(options.connections):
            self._dispatch.workers += 1
            nursery.start_soon(Worker(self._dispatch).run)

    @overload
    async def send(
        self,
        message: MessageLike,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
    ) -> SendResult: ...

    @overload
    async def send(
        self, message: bytes | str, *, sender: str, recipients: Sequence[str]
    ) -> SendResult: ...

    async def send(
        self,
        message: MessageLike | bytes | str,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
    ) -> SendResult:
        """Send one message, retrying per the policy; never raises for SMTP outcomes.

        Cancelling the call (the caller's cancel scope, e.g. a web request that went
        away) withdraws the message if no worker has taken it yet: it is not sent. A
        message a worker took (on the wire, or waiting for a retry) goes on to its end,
        its result dropped but counted in :meth:`statistics`. Neither touches
        :attr:`interrupted`, which belongs to cancelling the pool (a message taken
        when the pool itself is cancelled gets its result there, as in ``send_all``).

        A message that names no recipient (an ``EmailMessage`` without To/Cc/Bcc, raw
        bytes without ``sender=``/``recipients=``) raises :exc:`LocalProtocolError`, as
        ``conn.send`` does.
        """
        if sender is not None or recipients is not None or isinstance(message, bytes | str):
            message = as_prepared(message, sender, recipients)
        done_send, done_receive = trio.open_memory_channel[SendResult](1)
        done = self._dispatch.results(done_send)
        job = self._ledger.job(message, done)
        try:
            await self._dispatch.submit(job, withdraw_if_cancelled=True)
        finally:
            done.fed()
        async with done_receive:
            try:
                result = await done_receive.receive()
            except trio.EndOfChannel:
                raise trio.BrokenResourceError(
                    "the pool's workers are gone (cancelled); the result is in interrupted"
                ) from None
            except trio.Cancelled:
                if not job.final and not job.taken:
                    self._ledger.withdraw(job)  # not on the wire: it will not be sent
                raise
        if job.refusal is not None:
            raise job.refusal
        return result

    @asynccontextmanager
    async def send_all(
        self, messages: Iterable[MessageLike] | AsyncIterable[MessageLike]
    ) -> AsyncIterator[ResultChannel]:
        """Send every message; iterate the channel for one result each, as they complete.

        ``messages`` is consumed lazily, only as workers become free.
        """
        # Room for a burst of results from every worker, so a worker rarely waits
        # for the consumer.
        results_send, results_receive = trio.open_memory_channel[SendResult](self._dispatch.burst)
        done = self._dispatch.results(results_send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed, messages, done)
            try:
                yield ResultChannel(results_receive)
            finally:
                done.left(results_receive, cancelled=_cancelled())
            nursery.cancel_scope.cancel()

    async def _feed(
        self, messages: Iterable[MessageLike] | AsyncIterable[MessageLike], done: Results
    ) -> None:
        submit, job = self._dispatch.submit, self._ledger.job
        try:
            if isinstance(messages, AsyncIterable):
                async for message in messages:
                    await submit(job(message, done))
            else:
                for message in messages:
                    await submit(job(message, done))
        finally:
            done.fed()

    async def wait_idle(self) -> None:
        """Wait until every message handed to the pool has its final result."""
        await self._dispatch.all_done.wait()

    def close(self) -> None:
        """Stop taking messages; workers QUIT their connections and exit."""
        self._dispatch.jobs_send.close()

    def stop_connecting(self) -> None:
        """Open no more connections (for a graceful stop): connection attempts under
        way are abandoned, and every message that would need a new connection gets a
        transient result at once, saying it was not sent. Messages on connections
        already open are sent as usual, so what is on the wire finishes."""
        self._dispatch.stop_connecting()

    async def aclose(self) -> None:
        """Drain, then close (for pools started with :func:`start_pool`)."""
        await self.wait_idle()
        self.close()

    def statistics(self) -> PoolStatistics:
        dispatch, ledger = self._dispatch, self._ledger
        connections_open = dispatch.servers.connections_open
        # A worker waiting for a server that is down has no connection to be busy on.
        busy = dispatch.busy - dispatch.waiting
        return PoolStatistics(
            connections_open=connections_open,
            connections_busy=busy,
            connections_idle=max(0, connections_open - busy),
            queued=ledger.queued,
            in_flight=ledger.in_flight,
            done=dict(ledger.done),
            retries=ledger.retries,
            transparent_retries=ledger.transparent_retries,
            unknown_seen=ledger.unknown_seen,
            rate=dispatch.rate.rate if dispatch.rate else None,
            servers=dispatch.servers.limits(),
            backoff=ledger.backoff,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        done = ", ".join(f"{v} {k}" for k, v in s.done.items() if v)
        return (
            f"<Pool connections: {s.connections_open} open, {s.connections_busy} busy, "
            f"{s.connections_idle} idle | messages: {s.queued} queued, {s.in_flight} in flight, "
            f"{s.backoff} in backoff, "
            f"done: {done or 'none'} | retries: {s.retries}>"
        )


def _cancelled() -> bool:
    """True if the running task is being cancelled (its consumer leaves because of it)."""
    return trio.current_effective_deadline() == -math.inf


def _keywords_of(
    make: Callable[_P, PoolOptions],
) -> Callable[[Callable[[_A, _B, PoolOptions], _R]], Callable[Concatenate[_A, _B, _P], _R]]:
    """Let ``start(a, b, options)`` be called as ``start(a, b, **keywords)``, the keywords
    being those of ``make``: the options are written once, in :class:`PoolOptions`."""
    keywords = inspect.signature(make).parameters

    def decorate(
        start: Callable[[_A, _B, PoolOptions], _R],
    ) -> Callable[Concatenate[_A, _B, _P], _R]:
        # Untyped inside: the lead may come by name too, as it could before.
        call: Callable[..., _R] = start
        build: Callable[..., PoolOptions] = make

        @functools.wraps(start)
        def with_keywords(*args: Any, **kwargs: Any) -> _R:
            chosen = {name: kwargs.pop(name) for name in keywords.keys() & kwargs.keys()}
            return call(*args, options=build(**chosen), **kwargs)

        signature = inspect.signature(start)
        lead = list(signature.parameters.values())[:-1]
        with_keywords.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*lead, *keywords.values()]
        )
        return cast("Callable[Concatenate[_A, _B, _P], _R]", with_keywords)

    return decorate


@_keywords_of(PoolOptions)
def start_pool(nursery: trio.Nursery, server: ServerSpec, options: PoolOptions) -> Pool:
    """Start a pool whose workers run in the caller's ``nursery``; not a context manager.

    The pool lives as long as that nursery (a long-lived pool in an application's own
    nursery, say); :func:`open_pool` is the same as an ``async with`` block. ``server``
    is a :class:`Server`, a URL, or a list of them (failover by weight); the keywords are
    those of :class:`PoolOptions`. The caller closes the pool with ``await
    pool.aclose()`` (or cancels the nursery). ``connect_pool`` is the same function
    under its first name.
    """
    return Pool(nursery, _resolve(server), options)


#: The first name of :func:`start_pool` (kept: it did not say that it is no ``async with``).
connect_pool = start_pool


def _resolve(server: ServerSpec) -> list[Server]:
    """The servers ``server`` names (URLs parsed): a configuration error raises here."""
    servers = [server] if isinstance(server, Server | str) else list(server)
    return [checked(Server.from_url(s) if isinstance(s, str) else s) for s in servers]


def _in_own_nursery(
    connect: Callable[Concatenate[trio.Nursery, _P], Pool],
) -> Callable[_P, AbstractAsyncContextManager[Pool]]:
    """``connect`` run in a nursery of its own: the block drains the pool, then closes it."""
    signature = inspect.signature(connect)
    own = signature.replace(
        parameters=list(signature.parameters.values())[1:],
        return_annotation="AbstractAsyncContextManager[Pool]",
    )

    @asynccontextmanager
    async def block(*args: _P.args, **kwargs: _P.kwargs) -> AsyncIterator[Pool]:
        async with trio.open_nursery() as nursery:
            pool = connect(nursery, *args, **kwargs)
            try:
                yield pool
                await pool.wait_idle()
            finally:
                pool.close()

    def open_pool(*args: _P.args, **kwargs: _P.kwargs) -> AbstractAsyncContextManager[Pool]:
        # A wrong argument or server fails at the call, not wrapped by the nursery.
        bound = own.bind(*args, **kwargs)
        bound.arguments["server"] = _resolve(bound.arguments["server"])
        return block(*bound.args, **bound.kwargs)

    open_pool.__signature__ = own  # type: ignore[attr-defined]
    open_pool.__qualname__ = open_pool.__name__
    return open_pool


open_pool = _in_own_nursery(start_pool)
open_pool.__doc__ = """Run a pool as an ``async with`` block, in a nursery of its own; leaving
the block drains, then QUITs every connection.

Args:
    server: a :class:`Server`, a URL (``smtp://user@host:587``, ``smtps://host:465``,
        ``smtp+plain://host:25``, ``?cafile=PATH`` for a private CA; no password in a
        URL: use ``Server.from_url(url, password=...)``), or a list of them, used by
        weight and failed over.
    connections: worker tasks, so connections open at most (per server, also
        ``Server.max_connections``).
    max_messages_per_connection: close a connection after this many messages (None:
        never).
    idle_timeout: close a connection after this many seconds without work.
    rate: messages per second over all servers at most (None: no limit; per server:
        ``Server.rate``).
    retry: when and how often to retry transient outcomes (:class:`RetryPolicy`).
    message_deadline: seconds one send may take before it is cut off (None: only the
        stage deadlines of the server's ``timeouts``).
    queue_timeout: seconds a message may wait for a free worker before it fails, not
        sent (None: as long as it takes).
    pipeline_depth: transactions one connection pipelines before their replies (1:
        one at a time).
    pipeline: how connections pipeline at first: ``"cross"`` (the default: the next
        envelope behind an end of data, unless the server refused that before),
        ``"within"`` (wait for each end-of-data reply) or ``"off"`` (one command at a
        time); see ``SMTPConnection.send_many``.
    on_wire: a ``WireHook`` (``_pool/interfaces.py``) that says when each message may be
        written (a journal commits it in flight first; see ``_pool/wire.py``).

:func:`start_pool` is the same pool in a nursery you own. Cancelling the block cancels
in-flight work: every message handed over that has no result yet (cut off on the wire,
queued, waiting for a connection or for a retry's backoff) gets one in
``pool.interrupted``, complete once the block has ended.
"""
