"""A pool of SMTP connections sending a batch concurrently, run by a nursery.

Theory of operation
-------------------
``open_pool`` opens a nursery and starts ``connections`` worker tasks in it. Jobs (one
message each) travel over one bounded memory channel (unbuffered when messages go one at
a time), so a producer runs only a little ahead of the workers: an unbounded iterable is
consumed lazily and memory stays bounded. A worker pipelining on its connection takes
each next job when it is ready to write it, and hands every result to the channel of
the ``send_all`` it came from as soon as it is known (:class:`ResultChannel`).

Each worker owns at most one connection at a time. It opens it lazily, reuses it for many
messages, and closes it after ``max_messages_per_connection``, after ``idle_timeout``
seconds without work, or when the server says 421. Every send runs inside the worker's
own cancel scope (``message_deadline``) and the connection's stage deadlines, so a slow or
broken server connection is cut off alone (R27, R48). A connection is never shared by two
transactions.

Outcomes are values. A worker turns every failure of a server -- refusals, timeouts, lost
connections, even a TLS or AUTH failure -- into a :class:`SendResult`. Only bugs escape,
and they propagate out of ``open_pool`` as an exception group. A transient result is
retried after an exponential backoff with jitter (R43), only for the recipients that need
it (R41, R42); a failure of a *reused* connection before MAIL was accepted is retried at
once on a fresh connection without counting an attempt (R45); an unknown outcome (lost
after the final dot) is resent with the same bytes, hence the same Message-ID, unless
``RetryPolicy(unknown="at-most-once")`` (R38). A 535 or a certificate failure is a
configuration error: it fails every message for that server at once (R10, R35).

Every message handed over ends with exactly one result (``Pool._held`` holds the jobs
still owed one). Cancelling the pool delivers none of the rest: each is recorded in
``Pool.interrupted`` instead, by plain bookkeeping where the cancellation lands (a send
cut off, a result the consumer had no room for) and, once no worker is left, for the
jobs that were only waiting (queued, for a connection, for a retry's backoff).

Backpressure per server (R44): a :class:`trio.CapacityLimiter` bounds its connections and
a token bucket its message rate; a 421 or a 4.7.x reply halves both, and they recover
step by step after successes. Pool state is changed by small plain methods on
:class:`_ServerState` and :class:`_Tally`; I/O stays in the worker.
"""

from __future__ import annotations

import dataclasses
import math
import random
import ssl
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import Message
from typing import Literal, final
from urllib.parse import unquote, urlsplit

import trio

from .._client.open import open_connection
from .._client.options import TLSMode, TokenSource
from .._client.session import SMTPConnection
from .._core.errors import (
    LocalProtocolError,
    SMTPAuthenticationError,
    SMTPCertificateError,
    SMTPDisconnected,
    SMTPError,
    SMTPResponseError,
)
from .._core.prepare import PreparedMessage, prepare
from .._core.reply import Reply
from .._core.results import Outcome, RecipientResult, SendResult
from .._core.timeouts import Timeouts

__all__ = [
    "Pool",
    "PoolStatistics",
    "ResultChannel",
    "RetryPolicy",
    "Server",
    "connect_pool",
    "open_pool",
]

MessageLike = Message | PreparedMessage

#: Messages one pipelined run may carry over a connection without CHUNKING.
DATA_RUN = 256

_STOPPED = "not sent: the pool stopped opening connections"
_NOT_SENT = "not sent: cancelled before it was sent"
_NOT_RETRIED = "not sent again: cancelled before the retry"
_POSSIBLE_DUPLICATE = "an earlier attempt had an unknown outcome: possible duplicate"


@dataclass(frozen=True)
class Server:
    """Where and how to connect; credentials never appear in ``repr`` (R36)."""

    host: str
    port: int | None = None
    tls: TLSMode | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    oauth_token: TokenSource | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    local_hostname: str | None = None
    timeouts: Timeouts = Timeouts()
    allow_insecure_auth: bool = False
    #: Share of new connections among several servers.
    weight: float = 1.0
    #: Connections to this server at most (default: the pool's ``connections``).
    max_connections: int | None = None
    #: Messages per second to this server at most.
    rate: float | None = None

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> Server:
        """``smtp://user@host:587`` (STARTTLS), ``smtps://host:465`` (implicit TLS),
        ``smtp+plain://host:1025`` (explicit plaintext)."""
        parts = urlsplit(url)
        tls: TLSMode
        if parts.scheme == "smtp":
            tls = "starttls"
        elif parts.scheme == "smtps":
            tls = "implicit"
        elif parts.scheme == "smtp+plain":
            tls = "none"
        else:
            raise ValueError(
                f"unknown scheme {parts.scheme!r}: use smtp://, smtps:// or smtp+plain://"
            )
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        values: dict[str, object] = {
            "host": parts.hostname,
            "port": parts.port,
            "tls": tls,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    async def open(self) -> SMTPConnection:
        """Open one connection to this server; the caller must ``await conn.aclose()``."""
        return await open_connection(
            self.host,
            self.port,
            tls=self.tls,
            ssl_context=self.ssl_context,
            username=self.username,
            password=self.password,
            oauth_token=self.oauth_token,
            local_hostname=self.local_hostname,
            timeouts=self.timeouts,
            allow_insecure_auth=self.allow_insecure_auth,
        )

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port or '-'}"


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often to retry transient outcomes (R38, R43).

    The defaults suit a bulk run against a relay; an MTA-style schedule (RFC 5321
    §4.5.4.1: 30 minutes, for days) is a matter of setting them.
    """

    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    multiplier: float = 2.0
    #: Random spread of each delay, as a fraction of it.
    jitter: float = 0.25
    #: Stop retrying after this many seconds from the first attempt.
    give_up_after: float | None = None
    #: ``at-least-once`` resends after an unknown outcome; ``at-most-once`` never does.
    unknown: Literal["at-least-once", "at-most-once"] = "at-least-once"

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt + 1``."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


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


class _TokenBucket:
    """A token bucket on trio's clock: ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self.burst
        self._stamp: float | None = None

    async def acquire(self) -> None:
        while True:
            now = trio.current_time()
            if self._stamp is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                await trio.lowlevel.checkpoint()
                return
            await trio.sleep((1 - self._tokens) / self.rate)


class _ServerState:
    """Mutable per-server state; changed only by the plain methods below."""

    def __init__(self, server: Server, connections: int, rate: float | None) -> None:
        self.server = server
        self.max_connections = server.max_connections or connections
        self.limiter = trio.CapacityLimiter(self.max_connections)
        rate = server.rate if server.rate is not None else rate
        self.max_rate = rate
        self.bucket = _TokenBucket(rate) if rate else None
        self.down_until = 0.0
        self.failures = 0
        self.fatal: str | None = None
        self.successes_since_throttle = 0
        self.open = 0

    def throttle(self) -> None:
        """421 or 4.7.x: halve concurrency and rate (R40, R44)."""
        self.limiter.total_tokens = max(1, int(self.limiter.total_tokens) // 2)
        if self.bucket is not None:
            self.bucket.rate = max(0.1, self.bucket.rate / 2)
        self.successes_since_throttle = 0

    def record_success(self) -> None:
        """Recover one step of concurrency and rate every 20 successes."""
        self.failures = 0
        self.successes_since_throttle += 1
        if self.successes_since_throttle >= 20:
            self.successes_since_throttle = 0
            if self.limiter.total_tokens < self.max_connections:
                self.limiter.total_tokens = int(self.limiter.total_tokens) + 1
            if self.bucket is not None and self.max_rate and self.bucket.rate < self.max_rate:
                self.bucket.rate = min(self.max_rate, self.bucket.rate * 1.25)

    def record_connect_failure(self, policy: RetryPolicy) -> None:
        """Mark the host unreachable for a backoff that grows per failure (R43)."""
        self.failures += 1
        self.down_until = trio.current_time() + policy.delay(self.failures)


@final
class ResultChannel(trio.abc.ReceiveChannel[SendResult]):
    """The results of :meth:`Pool.send_all`, as they complete (a trio receive channel).

    Workers finish messages in bursts (a pipelined run ends many at once). A result
    that is already waiting is returned at a cancellation point but without a
    scheduling round, except one in :data:`FAIR_EVERY`: with a plain memory channel the
    consumer would take one result per round of the scheduler and hold every worker
    back to that pace.
    """

    FAIR_EVERY = 64

    def __init__(self, channel: trio.MemoryReceiveChannel[SendResult]) -> None:
        self._channel = channel
        self._run = 0

    def receive_nowait(self) -> SendResult:
        """A result if one is waiting, else :exc:`trio.WouldBlock`."""
        return self._channel.receive_nowait()

    async def receive(self) -> SendResult:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            result = self._channel.receive_nowait()
        except trio.WouldBlock:
            self._run = 0
            return await self._channel.receive()
        self._run += 1
        if self._run >= self.FAIR_EVERY:
            self._run = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._channel.statistics()

    def close(self) -> None:
        self._channel.close()

    async def aclose(self) -> None:
        await self._channel.aclose()


class _Results:
    """Where the results of one ``send_all`` (or ``send``) go.

    One channel for the whole batch, closed once feeding has ended and every job handed
    over has its result: no channel clone per message, and a result the consumer has
    room for costs no scheduling round (``send_nowait``).
    """

    __slots__ = ("_channel", "_fed", "_orphaned", "_owed")

    def __init__(
        self,
        channel: trio.MemorySendChannel[SendResult],
        orphaned: Callable[[SendResult], None],
    ) -> None:
        self._channel = channel
        #: Called with a result whose consumer has gone (closed its channel).
        self._orphaned = orphaned
        self._owed = 0
        self._fed = False

    def expect(self) -> None:
        self._owed += 1

    def fed(self) -> None:
        """No more jobs will be added."""
        self._fed = True
        if self._owed == 0:
            self._channel.close()

    def put_nowait(self, result: SendResult) -> bool:
        """Deliver without waiting; False if the consumer's buffer is full."""
        try:
            self._channel.send_nowait(result)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._orphaned(result)  # the consumer left its send_all block
        self._delivered()
        return True

    async def put(self, result: SendResult) -> None:
        try:
            await self._channel.send(result)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._orphaned(result)
        self._delivered()

    def withdraw(self) -> None:
        """A job that was never handed over owes no result."""
        self._delivered()

    def _delivered(self) -> None:
        self._owed -= 1
        if self._fed and self._owed == 0:
            self._channel.close()


@dataclass(eq=False)  # hashed by identity: a key of Pool._held
class _Job:
    """One message and what has become of it so far."""

    message: MessageLike
    done: _Results | None
    first_attempt: float
    attempts: int = 0
    # Recipients still to deliver; None means all of the message's recipients.
    pending: tuple[str, ...] | None = None
    settled: list[RecipientResult] = field(default_factory=list)
    unknown_seen: bool = False
    #: The final result has been delivered (or recorded in ``Pool.interrupted``).
    final: bool = False
    last: SendResult | None = None


@dataclass
class _Worker:
    """What one worker task holds: at most one connection (never shared)."""

    conn: SMTPConnection | None = None
    state: _ServerState | None = None
    #: The server whose connection slot (limiter token) this worker holds, if any.
    token: _ServerState | None = None
    #: Messages sent on this connection so far.
    sent: int = 0
    #: Jobs taken from the queue during the current ``_run`` (beyond the first).
    streamed: int = 0


class _Tally:
    """Counters behind :meth:`Pool.statistics`."""

    def __init__(self) -> None:
        self.queued = 0
        self.in_flight = 0
        self.done = {o.value: 0 for o in Outcome}
        self.retries = 0
        self.transparent_retries = 0
        self.unknown_seen = 0
        self.busy = 0
        self.open = 0


class Pool:
    """Sends messages over a bounded set of reused connections. Use :func:`open_pool`.

    Every message handed to :meth:`send_all` (or :meth:`send`) ends with exactly one
    result: on the results channel, or, if the pool is cancelled first, in
    :attr:`interrupted`.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        servers: Sequence[Server],
        *,
        connections: int,
        max_messages_per_connection: int | None,
        idle_timeout: float,
        rate: float | None,
        retry: RetryPolicy,
        message_deadline: float | None,
        queue_timeout: float | None,
        pipeline_depth: int = 16,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if not servers:
            raise ValueError("at least one server is needed")
        self._nursery = nursery
        self._servers = [_ServerState(s, connections, None) for s in servers]
        self._connections = connections
        self._max_per_connection = max_messages_per_connection
        self._idle_timeout = idle_timeout
        self._rate = _TokenBucket(rate) if rate else None
        self._retry = retry
        self._message_deadline = message_deadline
        self._queue_timeout = queue_timeout
        # A worker pipelines up to pipeline_depth queued messages in one run on its
        # connection (RFC 2920), taking each from the queue when it is ready to write
        # it. A per-message deadline or a rate is kept per message: one at a time then.
        one_by_one = message_deadline or rate or any(srv.rate for srv in servers)
        self._batch_size = 1 if one_by_one else max(1, pipeline_depth)
        # Bounded hand-over: a producer runs at most this far ahead of the workers
        # (not more for a deeper pipeline: runs take jobs one by one).
        buffer = 0 if self._batch_size == 1 else connections * min(self._batch_size, 16)
        self._jobs_send, self._jobs_receive = trio.open_memory_channel[_Job](buffer)
        self._tally = _Tally()
        #: Jobs handed over and not finished yet, in order (a dict as an ordered set).
        self._held: dict[_Job, None] = {}
        #: Worker tasks not ended yet.
        self._workers = 0
        self._all_done = trio.Event()
        self._all_done.set()
        self._closing = False
        self._stopped_connecting = False
        self._connecting: set[trio.CancelScope] = set()
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
        self.interrupted: list[SendResult] = []

    # ------------------------------------------------------------------ public

    async def send(
        self,
        message: MessageLike,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
    ) -> SendResult:
        """Send one message, retrying per the policy; never raises for SMTP outcomes."""
        if sender is not None or recipients is not None:
            message = _as_prepared(message, sender, recipients)
        done_send, done_receive = trio.open_memory_channel[SendResult](1)
        done = _Results(done_send, self._orphaned)
        try:
            await self._submit(_Job(message, done, trio.current_time()))
        finally:
            done.fed()
        async with done_receive:
            try:
                return await done_receive.receive()
            except trio.EndOfChannel:
                raise trio.BrokenResourceError(
                    "the pool's workers are gone (cancelled); the result is in interrupted"
                ) from None

    @asynccontextmanager
    async def send_all(
        self, messages: Iterable[MessageLike] | AsyncIterable[MessageLike]
    ) -> AsyncIterator[ResultChannel]:
        """Send every message; iterate the channel for one result each, as they complete.

        ``messages`` is consumed lazily, only as workers become free.
        """
        # Room for a burst of results from every worker, so a worker rarely waits
        # for the consumer.
        results_send, results_receive = trio.open_memory_channel[SendResult](
            self._connections * min(self._batch_size, 16)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed, messages, results_send)
            async with ResultChannel(results_receive) as results:
                yield results
            nursery.cancel_scope.cancel()

    async def wait_idle(self) -> None:
        """Wait until every message handed to the pool has its final result."""
        await self._all_done.wait()

    def close(self) -> None:
        """Stop taking messages; workers QUIT their connections and exit."""
        self._jobs_send.close()

    def stop_connecting(self) -> None:
        """Open no more connections (for a graceful stop): connection attempts under
        way are abandoned, and every message that would need a new connection gets a
        transient result at once, saying it was not sent. Messages on connections
        already open are sent as usual, so what is on the wire finishes."""
        self._stopped_connecting = True
        for scope in self._connecting:
            scope.cancel()

    async def aclose(self) -> None:
        """Drain, then close (for pools started with :func:`connect_pool`)."""
        await self.wait_idle()
        self.close()

    def statistics(self) -> PoolStatistics:
        t = self._tally
        return PoolStatistics(
            connections_open=t.open,
            connections_busy=t.busy,
            connections_idle=t.open - t.busy,
            queued=t.queued,
            in_flight=t.in_flight,
            done=dict(t.done),
            retries=t.retries,
            transparent_retries=t.transparent_retries,
            unknown_seen=t.unknown_seen,
            rate=self._rate.rate if self._rate else None,
            servers={s.server.label: int(s.limiter.total_tokens) for s in self._servers},
        )

    def __repr__(self) -> str:
        s = self.statistics()
        done = ", ".join(f"{v} {k}" for k, v in s.done.items() if v)
        return (
            f"<Pool connections: {s.connections_open} open, {s.connections_busy} busy, "
            f"{s.connections_idle} idle | messages: {s.queued} queued, {s.in_flight} in flight, "
            f"done: {done or 'none'} | retries: {s.retries}>"
        )

    # --------------------------------------------------------------- internals

    async def _feed(
        self,
        messages: Iterable[MessageLike] | AsyncIterable[MessageLike],
        results: trio.MemorySendChannel[SendResult],
    ) -> None:
        done = _Results(results, self._orphaned)
        try:
            if isinstance(messages, AsyncIterable):
                async for message in messages:
                    await self._submit(_Job(message, done, trio.current_time()))
            else:
                for message in messages:
                    await self._submit(_Job(message, done, trio.current_time()))
        finally:
            done.fed()

    async def _submit(self, job: _Job) -> None:
        if job.done is not None:
            job.done.expect()
        self._held[job] = None
        self._all_done = trio.Event() if self._all_done.is_set() else self._all_done
        self._tally.queued += 1
        try:
            if self._queue_timeout is None:
                try:
                    # Fill the bounded queue without a scheduling round per message, so
                    # workers find batches to pipeline; wait only when it is full.
                    self._jobs_send.send_nowait(job)
                except trio.WouldBlock:
                    await self._jobs_send.send(job)
                queue_timed_out = False
            else:
                with trio.move_on_after(self._queue_timeout) as scope:
                    await self._jobs_send.send(job)
                queue_timed_out = scope.cancelled_caught
        except BaseException as exc:
            self._tally.queued -= 1
            if job.final:
                pass  # recorded while it waited: no worker was left to take it
            elif isinstance(exc, trio.Cancelled):
                # Taken from the caller's messages (the pool, or a send_all left early,
                # was cancelled), never handed to a worker: not sent.
                self._interrupt(job, _abandoned(job))
            else:
                self._finish_one(job)
                if job.done is not None:
                    job.done.withdraw()  # never handed over: no result will come
            raise
        if queue_timed_out and not job.final:
            self._tally.queued -= 1
            s = self.statistics()
            await self._complete(
                job,
                _no_send(
                    job,
                    f"timed out after {self._queue_timeout:g} s waiting for a free "
                    f"connection: {s.connections_busy} of {self._connections} busy, "
                    f"{s.queued} queued, {s.in_flight} in flight",
                ),
            )
        elif not self._workers:
            # Queued after the last worker ended (the pool was cancelled while a
            # feeder went on without waiting): nobody will take it.
            self._abandon_held()

    def _finish_one(self, job: _Job, outcome: Outcome | None = None) -> None:
        """A job is over: with its final ``outcome``, or none if it never got one."""
        if outcome is not None:
            self._tally.done[outcome.value] += 1
        job.final = True
        del self._held[job]
        if not self._held:
            self._all_done.set()

    def _interrupt(self, job: _Job, result: SendResult) -> None:
        """The pool's cancellation keeps ``job`` from its consumer: its final result
        goes to :attr:`interrupted` instead (plain bookkeeping, no I/O)."""
        if job.final:
            return  # already recorded when the last worker ended
        self.interrupted.append(result)
        if job.done is not None:
            job.done.withdraw()
        self._finish_one(job)

    def _orphaned(self, result: SendResult) -> None:
        """A result found its consumer gone. If the pool is being cancelled, that is why
        the consumer left (it may have drained its channel just before): the result goes
        to :attr:`interrupted`. Otherwise the consumer left early on purpose and the
        outcome only counts in :meth:`statistics`."""
        if trio.current_effective_deadline() == -math.inf:
            self.interrupted.append(result)

    def _abandon_held(self) -> None:
        """No worker is left: every job still held was only waiting (queued, for a
        connection, for a retry's backoff) and gets its result in :attr:`interrupted`."""
        while True:
            try:
                self._jobs_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._tally.queued -= 1
        for job in list(self._held):
            self._interrupt(job, _abandoned(job))

    def _accept_now(self, job: _Job, result: SendResult) -> bool:
        """Finish a job accepted at its first attempt, if the consumer has room now."""
        done = job.done
        if done is not None and not done.put_nowait(result):
            return False
        job.attempts = 1
        job.last = result
        self._finish_one(job, Outcome.ACCEPTED)
        return True

    async def _complete(self, job: _Job, result: SendResult) -> None:
        done = job.done
        if done is not None and not done.put_nowait(result):
            try:
                await done.put(result)
            except trio.Cancelled:
                self._interrupt(job, result)  # the consumer never got it
                raise
        self._finish_one(job, result.outcome)

    async def _deliver(self, finished: list[tuple[_Job, SendResult]]) -> None:
        """Hand over final results; on cancellation, those left go to interrupted."""
        for index, (job, result) in enumerate(finished):
            try:
                await self._complete(job, result)
            except trio.Cancelled:
                for job_left, result_left in finished[index + 1 :]:
                    self._interrupt(job_left, result_left)
                raise

    async def _retry_later(self, job: _Job, delay: float) -> None:
        # Cancelled here, the job stays in _held: the last worker to end records it.
        await trio.sleep(delay)
        self._tally.queued += 1
        try:
            await self._jobs_send.send(job)
        except BaseException:
            self._tally.queued -= 1
            raise

    def _another_server_up(self) -> bool:
        now = trio.current_time()
        return any(s.fatal is None and s.down_until <= now for s in self._servers)

    def _pick_server(self) -> _ServerState | None:
        usable = [s for s in self._servers if s.fatal is None]
        if not usable:
            return None
        now = trio.current_time()
        up = [s for s in usable if s.down_until <= now] or usable
        return random.choices(up, weights=[s.server.weight for s in up])[0]

    async def _worker(self) -> None:
        worker = _Worker()
        try:
            while True:
                jobs = await self._next_jobs(worker)
                if jobs is None:
                    return
                if not jobs:
                    continue
                self._tally.queued -= len(jobs)
                self._tally.in_flight += len(jobs)
                self._tally.busy += 1
                try:
                    await self._run(worker, jobs)
                finally:
                    self._tally.busy -= 1
                    # With the jobs its pipelined runs took from the queue as they went.
                    self._tally.in_flight -= len(jobs) + worker.streamed
                    worker.streamed = 0
        finally:
            try:
                await self._release(worker)
            finally:
                self._workers -= 1
                if not self._workers:
                    # Nothing will be sent any more: the pool was cancelled (or closed
                    # with retries pending). Whatever each worker was sending has its
                    # result by now; the jobs that were only waiting get theirs.
                    self._abandon_held()

    async def _next_jobs(self, worker: _Worker) -> list[_Job] | None:
        """Wait for work: one job (a pipelined run takes the next ones from the queue
        only when it is ready to write them, so the workers share the queue fairly).

        Returns None when the pool closes, and an empty list after closing an idle
        connection.
        """
        try:
            if worker.conn is None:
                if worker.token is None:
                    # R44: only a worker that may open a connection takes work, so a
                    # throttled server's jobs wait for the workers it still serves.
                    state = self._pick_server()
                    if state is not None:
                        await state.limiter.acquire()
                        worker.token = state
                first = await self._jobs_receive.receive()
            else:
                with trio.move_on_after(self._idle_timeout):
                    first = await self._jobs_receive.receive()
                    return [first]
                await self._release(worker)  # idle past idle_timeout: QUIT
                return []
        except trio.EndOfChannel:
            return None
        return [first]

    async def _release(self, worker: _Worker) -> None:
        """QUIT and close the worker's connection, if any (shielded, bounded)."""
        conn, state, token = worker.conn, worker.state, worker.token
        worker.conn = worker.state = worker.token = None
        worker.sent = 0
        if token is not None:
            token.limiter.release()
        if conn is None:
            return
        with trio.CancelScope(shield=True):
            await conn.aclose()
        if state is not None:
            state.open -= 1
        self._tally.open -= 1

    async def _connect(self, worker: _Worker, state: _ServerState) -> None:
        server = state.server
        if worker.token is not state:  # the token is for this server only
            if worker.token is not None:
                worker.token.limiter.release()
                worker.token = None
            await state.limiter.acquire()
            worker.token = state
        try:
            wait = state.down_until - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            conn = await server.open()
        except BaseException:
            worker.token = None
            state.limiter.release()
            raise
        state.open += 1
        self._tally.open += 1
        worker.conn, worker.state, worker.sent = conn, state, 0

    async def _run(self, worker: _Worker, jobs: list[_Job]) -> None:
        """One attempt for each job, on the worker's connection (opened if needed).

        A reused connection that turns out dead before anything was started is replaced
        and the jobs go again without counting an attempt (R45).
        """
        if self._rate is not None:
            for _ in jobs:
                await self._rate.acquire()
        while jobs:
            if worker.conn is None:
                state = self._pick_server()
                if state is None:
                    # R10, R35: a configuration error; every message fails, none loops.
                    reason = self._fatal_reason()
                    await self._settle_each(
                        [(job, _synthetic(job, Outcome.PERMANENT, reason)) for job in jobs],
                        final=True,
                    )
                    return
                try:
                    with trio.CancelScope() as connecting:
                        if self._stopped_connecting:
                            connecting.cancel()
                        self._connecting.add(connecting)
                        try:
                            await self._connect(worker, state)
                        finally:
                            self._connecting.discard(connecting)
                    if connecting.cancelled_caught:
                        await self._settle_each(
                            [(job, _no_send(job, _STOPPED)) for job in jobs], final=True
                        )
                        return
                except (SMTPAuthenticationError, SMTPCertificateError) as exc:
                    if isinstance(exc, SMTPCertificateError) or exc.permanent:
                        state.fatal = f"{state.server.label}: {exc}"
                        continue
                    state.record_connect_failure(self._retry)
                    await self._settle_each([(job, _no_send(job, str(exc))) for job in jobs])
                    return
                except SMTPError as exc:
                    if isinstance(exc, SMTPResponseError) and exc.reply.code == 421:
                        state.throttle()
                    state.record_connect_failure(self._retry)
                    if self._another_server_up():
                        continue  # failover: the same jobs, at once, elsewhere
                    reason = f"{state.server.label}: {exc}"
                    await self._settle_each([(job, _no_send(job, reason)) for job in jobs])
                    return
            conn, state = worker.conn, worker.state
            assert conn is not None and state is not None
            reused = conn.transactions > 0
            if reused and conn.is_stale():
                # R24, R45: it closed or spoke while idle; nothing was started.
                self._tally.transparent_retries += 1
                await self._release(worker)
                continue
            ready: list[tuple[_Job, PreparedMessage]] = []
            local: list[tuple[_Job, SendResult]] = []
            for job in jobs:
                try:
                    ready.append((job, _as_prepared(job.message, None, job.pending, conn)))
                except LocalProtocolError as exc:
                    local.append((job, _local_error(job, str(exc))))
            if local:
                await self._settle_each(local, final=True)
            if not ready:
                return
            if state.bucket is not None:
                for _ in ready:
                    await state.bucket.acquire()
            refused: list[tuple[_Job, LocalProtocolError]] = []
            results = await self._send(worker, ready, refused)
            # Every outcome is recorded before any is handed over (which may wait for
            # the consumer): a cancellation then finds each job with its result.
            finished: list[tuple[_Job, SendResult]] = []
            for job, refusal in refused:
                self._record(job, _local_error(job, str(refusal)), finished, final=True)
            if results is None:  # died before anything started: go again, uncounted
                await self._deliver(finished)
                self._tally.transparent_retries += 1
                await self._release(worker)
                continue
            worker.sent += len(results)
            jobs = []
            for index, ((job, _), result) in enumerate(zip(ready, results, strict=True)):
                if job.final:
                    continue  # accepted and delivered during the run
                if (
                    (reused or index > 0)
                    and not result.mail_accepted
                    and result.outcome is Outcome.TRANSIENT
                    and (result.reply is None or result.reply.code == 421)
                    and not conn.is_usable
                ):
                    # R45: refused (421) or never started on a connection that is gone.
                    self._tally.transparent_retries += 1
                    jobs.append(job)
                    continue
                if any(_throttles(r.reply) for r in result.recipients) or _throttles(result.reply):
                    state.throttle()
                elif result.ok:
                    state.record_success()
                self._record(job, result, finished)
            await self._deliver(finished)
            if not conn.is_usable or (
                self._max_per_connection is not None and worker.sent >= self._max_per_connection
            ):
                await self._release(worker)

    def _stream(
        self,
        worker: _Worker,
        ready: list[tuple[_Job, PreparedMessage]],
        refused: list[tuple[_Job, LocalProtocolError]],
    ) -> Iterator[PreparedMessage]:
        """The messages for one pipelined run: those in hand, then any that queue up
        while it runs (pulled only when the pipeline is ready to write the next one).

        With BDAT a run writes up to ``pipeline_depth`` transactions before their
        replies (a lost connection leaves those unknown, R37). With DATA only one
        message at a time awaits its final reply, whatever the length of the run, so
        a run goes on while there is work (up to :data:`DATA_RUN`): each run ends with
        a round trip of its own.
        """
        conn = worker.conn
        assert conn is not None
        yield from [message for _, message in ready]
        room = self._batch_size
        if not conn.capabilities.chunking:
            room = max(room, DATA_RUN)
        if self._max_per_connection is not None:
            room = min(room, self._max_per_connection - worker.sent)
        while len(ready) < room:
            try:
                job = self._jobs_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            self._tally.queued -= 1
            self._tally.in_flight += 1
            worker.streamed += 1
            try:
                message = _as_prepared(job.message, None, job.pending, conn)
            except LocalProtocolError as exc:
                refused.append((job, exc))
                continue
            ready.append((job, message))
            yield message

    async def _send(
        self,
        worker: _Worker,
        ready: list[tuple[_Job, PreparedMessage]],
        refused: list[tuple[_Job, LocalProtocolError]],
    ) -> list[SendResult] | None:
        """Send on the worker's connection; None if it was dead before MAIL (R45)."""
        conn = worker.conn
        assert conn is not None
        if self._batch_size == 1:
            assert len(ready) == 1
            return await self._send_one(conn, ready[0])
        finished: dict[int, SendResult] = {}
        state = worker.state

        def on_result(index: int, result: SendResult) -> None:
            finished[index] = result
            job = ready[index][0]
            first_try = job.attempts == 0 and not job.settled
            # Delivered while the run goes on (the job is then final): the consumer (a
            # journal, a progress bar) learns of an acceptance at once, and nothing
            # piles up in here.
            if first_try and result.ok and self._accept_now(job, result) and state is not None:
                state.record_success()

        try:
            return await conn.send_many(self._stream(worker, ready, refused), on_result=on_result)
        except trio.Cancelled:
            # Which unfinished message was past its final dot is not known: report
            # them all as unknown rather than risk calling a delivered one transient.
            for i, (job, _) in enumerate(ready):
                if not job.final:
                    if i in finished:  # known, but not handed over yet
                        result = finished[i]
                    else:
                        result = _synthetic(job, Outcome.UNKNOWN, "pool cancelled")
                    self._interrupt(job, self._last_word(job, result))
            for job, refusal in refused:
                self._interrupt(job, self._last_word(job, _local_error(job, str(refusal))))
            raise

    async def _send_one(
        self, conn: SMTPConnection, item: tuple[_Job, PreparedMessage]
    ) -> list[SendResult] | None:
        job, message = item
        try:
            with trio.move_on_after(self._message_deadline or math.inf) as scope:
                result = await conn.send(message)
        except SMTPDisconnected as exc:
            if conn.transactions > 0:
                return None
            return [_no_send(job, str(exc))]
        except trio.Cancelled:
            self._interrupt(job, self._last_word(job, _cut_off(job, conn, "pool cancelled")))
            raise
        if scope.cancelled_caught:
            reason = f"message_deadline of {self._message_deadline:g} s"
            return [_cut_off(job, conn, reason)]
        return [result]

    def _fatal_reason(self) -> str:
        return "; ".join(s.fatal for s in self._servers if s.fatal) or "no server available"

    async def _settle_each(
        self, attempts: list[tuple[_Job, SendResult]], *, final: bool = False
    ) -> None:
        """Record one attempt of each job, then hand over the final results."""
        finished: list[tuple[_Job, SendResult]] = []
        for job, result in attempts:
            self._record(job, result, finished, final=final)
        await self._deliver(finished)

    def _last_word(self, job: _Job, result: SendResult) -> SendResult:
        """Record ``result`` as the job's last attempt (the pool is cancelled: no
        retry) and return the job's final result."""
        finished: list[tuple[_Job, SendResult]] = []
        self._record(job, result, finished, final=True)
        return finished[0][1]

    def _record(
        self,
        job: _Job,
        result: SendResult,
        finished: list[tuple[_Job, SendResult]],
        *,
        final: bool = False,
    ) -> None:
        """Record one attempt (plain bookkeeping): a job that is done goes to
        ``finished`` with its final result, else the recipients still due are
        scheduled for a retry. ``final``: no retry whatever the outcome."""
        job.attempts += 1
        job.last = result
        if (
            job.attempts == 1
            and not job.settled
            and all(r.outcome in _FINAL for r in result.recipients)
        ):
            finished.append((job, result))  # the common case: done at the first try
            return
        retry_unknown = self._retry.unknown == "at-least-once"
        again: list[str] = []
        for r in result.recipients:
            if r.outcome is Outcome.UNKNOWN:
                job.unknown_seen = True
                self._tally.unknown_seen += 1
            if r.outcome is Outcome.TRANSIENT or (r.outcome is Outcome.UNKNOWN and retry_unknown):
                again.append(r.recipient)
            else:
                job.settled.append(r)
        policy = self._retry
        progress = any(r.outcome is Outcome.ACCEPTED for r in result.recipients)
        if again and progress and not final and all(_too_many(result, name) for name in again):
            # R42: 452/552 "too many recipients" after some were accepted: send the
            # rest at once in a new transaction, not counted as a failed attempt.
            job.attempts -= 1
            job.pending = tuple(again)
            self._nursery.start_soon(self._retry_later, job, 0.0)
            return
        elapsed = trio.current_time() - job.first_attempt
        give_up = (
            final
            or job.attempts >= policy.max_attempts
            or (policy.give_up_after is not None and elapsed >= policy.give_up_after)
        )
        if again and not give_up:
            job.pending = tuple(again)
            self._tally.retries += 1
            self._nursery.start_soon(self._retry_later, job, policy.delay(job.attempts))
            return
        by_name = {r.recipient: r for r in result.recipients}
        finished.append((job, _merged(job, result, [by_name[name] for name in again])))


def _merged(
    job: _Job, result: SendResult, due: Sequence[RecipientResult], error: str | None = None
) -> SendResult:
    """A job's final result: the recipients its earlier attempts settled and ``due``
    (those still without a final outcome), on ``result``'s replies."""
    final_recipients = list(job.settled) + list(due)
    order = {name: i for i, name in enumerate(_all_recipients(job, result))}
    final_recipients.sort(key=lambda r: order.get(r.recipient, len(order)))
    return dataclasses.replace(
        result,
        recipients=tuple(final_recipients),
        attempts=job.attempts,
        earlier_unknown=job.unknown_seen,
        error=error or result.error or (_POSSIBLE_DUPLICATE if job.unknown_seen else None),
    )


def _abandoned(job: _Job) -> SendResult:
    """The final result of a job the pool held, with no send under way, when it was
    cancelled: not sent if it never had an attempt, else its last attempt's replies
    (transient, or unknown; ``earlier_unknown`` if an attempt may have delivered it)."""
    last = job.last
    if last is None:
        return dataclasses.replace(_no_send(job, _NOT_SENT), attempts=0)
    settled = {r.recipient for r in job.settled}
    due = [r for r in last.recipients if r.recipient not in settled]
    error = f"{_NOT_RETRIED} (last attempt: {last.error})" if last.error else _NOT_RETRIED
    if job.unknown_seen:
        error += f"; {_POSSIBLE_DUPLICATE}"
    result = _merged(job, last, due, error)
    # R42's follow-up transaction is not counted, but the first one did take place.
    return result if result.attempts else dataclasses.replace(result, attempts=1)


def _all_recipients(job: _Job, result: SendResult) -> list[str]:
    if isinstance(job.message, PreparedMessage):
        return list(job.message.recipients)
    return [r.recipient for r in job.settled] + [r.recipient for r in result.recipients]


_FINAL = (Outcome.ACCEPTED, Outcome.PERMANENT)


def _too_many(result: SendResult, recipient: str) -> bool:
    for r in result.recipients:
        if r.recipient == recipient:
            return r.reply is not None and r.reply.code in (452, 552)
    return False


def _throttles(reply: Reply | None) -> bool:
    return reply is not None and (
        reply.code == 421 or (reply.enhanced is not None and reply.enhanced[:2] == (4, 7))
    )


def _as_prepared(
    message: MessageLike,
    sender: str | None,
    recipients: Sequence[str] | None,
    conn: SMTPConnection | None = None,
) -> PreparedMessage:
    if isinstance(message, PreparedMessage):
        if recipients is None:
            return message
        return dataclasses.replace(message, recipients=tuple(recipients))
    if conn is not None:
        return conn.prepare(message, sender=sender, recipients=recipients)
    return prepare(message, sender=sender, recipients=recipients)


def _recipients_of(job: _Job) -> tuple[str, ...]:
    if job.pending is not None:
        return job.pending
    if isinstance(job.message, PreparedMessage):
        return job.message.recipients
    try:
        return prepare(job.message).recipients
    except LocalProtocolError:
        return ()


def _synthetic(job: _Job, outcome: Outcome, reason: str) -> SendResult:
    message = job.message
    sender = message.sender if isinstance(message, PreparedMessage) else ""
    message_id = message.message_id if isinstance(message, PreparedMessage) else None
    tag = message.tag if isinstance(message, PreparedMessage) else None
    return SendResult(
        sender,
        tuple(RecipientResult(r, outcome, None) for r in _recipients_of(job)),
        None,
        message_id,
        reason,
        tag=tag,
    )


def _no_send(job: _Job, reason: str) -> SendResult:
    """Nothing reached the server: transient for every pending recipient."""
    return _synthetic(job, Outcome.TRANSIENT, reason)


def _local_error(job: _Job, reason: str) -> SendResult:
    return _synthetic(job, Outcome.PERMANENT, f"refused locally: {reason}")


def _cut_off(job: _Job, conn: SMTPConnection, reason: str) -> SendResult:
    """The worker's scope cut a send short: unknown if the final dot was out (R37)."""
    outcome = Outcome.UNKNOWN if conn.awaiting_final_reply else Outcome.TRANSIENT
    return _synthetic(job, outcome, reason)


@asynccontextmanager
async def open_pool(
    server: Server | str | Sequence[Server | str],
    *,
    connections: int = 10,
    max_messages_per_connection: int | None = None,
    idle_timeout: float = 30.0,
    rate: float | None = None,
    retry: RetryPolicy = RetryPolicy(),
    message_deadline: float | None = None,
    queue_timeout: float | None = None,
    pipeline_depth: int = 16,
) -> AsyncIterator[Pool]:
    """Run a pool in its own nursery; leaving the block drains, then QUITs every connection.

    ``server`` is a :class:`Server`, a URL, or a list of them (failover by weight).
    Cancelling the block cancels in-flight work: every message handed over that has
    no result yet (cut off on the wire, queued, waiting for a connection or for a
    retry's backoff) gets one in ``pool.interrupted``, complete once the block has
    ended.
    """
    async with trio.open_nursery() as nursery:
        pool = connect_pool(
            nursery,
            server,
            connections=connections,
            max_messages_per_connection=max_messages_per_connection,
            idle_timeout=idle_timeout,
            rate=rate,
            retry=retry,
            message_deadline=message_deadline,
            queue_timeout=queue_timeout,
            pipeline_depth=pipeline_depth,
        )
        try:
            yield pool
            await pool.wait_idle()
        finally:
            pool.close()


def connect_pool(
    nursery: trio.Nursery,
    server: Server | str | Sequence[Server | str],
    *,
    connections: int = 10,
    max_messages_per_connection: int | None = None,
    idle_timeout: float = 30.0,
    rate: float | None = None,
    retry: RetryPolicy = RetryPolicy(),
    message_deadline: float | None = None,
    queue_timeout: float | None = None,
    pipeline_depth: int = 16,
) -> Pool:
    """Start a pool whose workers run in the caller's ``nursery``.

    The caller closes it with ``await pool.aclose()`` (or cancels the nursery).
    """
    servers = [server] if isinstance(server, Server | str) else list(server)
    resolved = [Server.from_url(s) if isinstance(s, str) else s for s in servers]
    pool = Pool(
        nursery,
        resolved,
        connections=connections,
        max_messages_per_connection=max_messages_per_connection,
        idle_timeout=idle_timeout,
        rate=rate,
        retry=retry,
        message_deadline=message_deadline,
        queue_timeout=queue_timeout,
        pipeline_depth=pipeline_depth,
    )
    for _ in range(connections):
        pool._workers += 1
        nursery.start_soon(pool._worker)
    return pool
