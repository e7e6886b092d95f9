"""The servers a pool sends to: where they are, which one to use, and how hard to push.

Theory of operation
-------------------
A :class:`Server` says where and how to connect. Behind each, the pool keeps a
:class:`ServerState`: a :class:`trio.CapacityLimiter` bounding its connections, a token
bucket bounding its message rate, and whether it is down (a failed connect marks it
unreachable for a backoff window, R43) or unusable for good (a 535 or an untrusted
certificate is a configuration error, R10, R35).

An outage is counted in windows, not in failed attempts: every worker that finds the
server down during one window is one failure, not one each, and the next window is the
policy's delay for that count, capped at :data:`PROBE_EVERY` so that a server that
answers again is found within seconds. The first connection that succeeds ends the
outage at once: the count starts over and every waiting worker connects. Failures,
backoff and recovery are logged on the ``triomail`` logger (WARNING, INFO).

Backpressure per server (R44): a 421 or a 4.7.x reply halves both bounds, and they
recover step by step after successes (RFC 5321 §4.5.4.1 asks a client to back off from a
server that is struggling, not to hammer it).

Failover (:meth:`Servers.pick`) chooses among the usable servers that are up, by weight;
when none is up it still chooses among the usable ones, whose workers then wait out the
backoff.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from .._client.open import open_connection
from .._client.options import OptionArgs, Pipeline, TLSMode, TokenSource, default_ssl_context
from .._client.session import SMTPConnection
from .._core.reply import Reply
from .._core.timeouts import Timeouts
from .interfaces import Connection
from .options import RetryPolicy

__all__ = [
    "Lease",
    "Server",
    "ServerState",
    "Servers",
    "TokenBucket",
    "checked",
    "throttles",
]

#: Successes after which a throttled server gets one step of concurrency and rate back.
RECOVER_EVERY = 20
#: Seconds between connection attempts to a server that is down, at most.
PROBE_EVERY = 4.0
#: Failed windows counted at most: past a few the window is PROBE_EVERY anyway, and an
#: unbounded count only feeds an ever larger exponent to the policy's delay.
MAX_FAILURES = 64

log = logging.getLogger("triomail")


@dataclass(frozen=True)
class Server:
    """Where and how to connect; credentials never appear in ``repr`` (R36).

    ``host``, ``port``, ``tls`` and the connection options (``ssl_context``,
    ``server_hostname``, ``username``, ``password``, ``oauth_token``, ``auth``,
    ``local_hostname``, ``timeouts``, ``allow_insecure_auth``) mean what the arguments
    of :func:`~triomail.connect` mean; ``weight``, ``max_connections`` and ``rate`` are
    the pool's, per server.
    """

    host: str
    port: int | None = None
    tls: TLSMode | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    oauth_token: TokenSource | None = field(default=None, repr=False)
    auth: str | Sequence[str] | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    server_hostname: str | None = None
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
        """A server from a URL; ``overrides`` are any other :class:`Server` fields.

        ``smtp://user@host:587`` (STARTTLS), ``smtps://host:465`` (implicit TLS),
        ``smtp+plain://host:1025`` (explicit plaintext). ``?cafile=PATH`` trusts the CAs
        in that PEM file instead of the system's (a private CA). A user name needs a
        password: in the URL (``user:password@``) or as ``password=`` (or
        ``oauth_token=``); a pool given one without refuses it at once
        (:func:`checked`).
        """
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
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        unknown = query.keys() - {"cafile"}
        if unknown:
            raise ValueError(f"unknown URL parameter(s) {sorted(unknown)}: only cafile")
        if "cafile" in query:
            context = default_ssl_context(query["cafile"][-1])
            values["ssl_context"] = context
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    async def open(self) -> SMTPConnection:
        """Open one connection to this server; the caller must ``await conn.aclose()``."""
        # Every connection option, by the one list of them (OptionArgs): a new option
        # is a new field here, never one more line to forget.
        options = cast(
            "OptionArgs", {name: getattr(self, name) for name in OptionArgs.__annotations__}
        )
        return await open_connection(self.host, self.port, tls=self.tls, **options)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port or '-'}"


def checked(server: Server) -> Server:
    """``server``, if a pool can use it; :exc:`ValueError` for a configuration error that
    would otherwise fail every connection attempt (a user name without a password
    source: say so now, not after a round of retries)."""
    if server.username is not None and server.password is None and server.oauth_token is None:
        raise ValueError(
            f"{server.label}: username {server.username!r} given without a password or "
            "oauth_token (a URL names no password: Server.from_url(url, password=...))"
        )
    return server


class TokenBucket:
    """A token bucket on trio's clock: ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self.burst
        self._stamp: float | None = None

    async def acquire(self, count: int = 1) -> None:
        """Take ``count`` tokens, one at a time, waiting for each."""
        for _ in range(count - 1):
            await self.acquire()
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


class ServerState:
    """Mutable per-server state; changed only by the plain methods below."""

    def __init__(self, server: Server, connections: int, pipeline: Pipeline = "cross") -> None:
        self.server = server
        self.max_connections = server.max_connections or connections
        self.limiter = trio.CapacityLimiter(self.max_connections)
        self.max_rate = server.rate
        self.bucket = TokenBucket(server.rate) if server.rate else None
        self.down_until = 0.0
        #: Backoff windows that ended in a failed connect, in a row.
        self.failures = 0
        #: When the current outage began (None: the server is up).
        self.down_since: float | None = None
        self.fatal: str | None = None
        self.successes_since_throttle = 0
        self.open = 0
        #: How its connections pipeline: ``PoolOptions.pipeline`` at first, then what a
        #: connection that had to fall back learnt.
        self.pipeline = pipeline

    def throttle(self) -> None:
        """421 or 4.7.x: halve concurrency and rate (R40, R44)."""
        self.limiter.total_tokens = max(1, int(self.limiter.total_tokens) // 2)
        if self.bucket is not None:
            self.bucket.rate = max(0.1, self.bucket.rate / 2)
        self.successes_since_throttle = 0

    def record_success(self) -> None:
        """Recover one step of concurrency and rate every :data:`RECOVER_EVERY` successes."""
        self.failures = 0
        self.successes_since_throttle += 1
        if self.successes_since_throttle >= RECOVER_EVERY:
            self.successes_since_throttle = 0
            if self.limiter.total_tokens < self.max_connections:
                self.limiter.total_tokens = int(self.limiter.total_tokens) + 1
            if self.bucket is not None and self.max_rate and self.bucket.rate < self.max_rate:
                self.bucket.rate = min(self.max_rate, self.bucket.rate * 1.25)

    def record_connect_failure(self, policy: RetryPolicy, reason: object) -> None:
        """A connect failed: mark the server unreachable for a backoff window (R43),
        unless it is in one already (the attempt began before the window: the same
        failure, seen by another worker)."""
        now = trio.current_time()
        if now < self.down_until:
            return
        if self.down_since is None:
            self.down_since = now
        self.failures = min(self.failures + 1, MAX_FAILURES)
        wait = min(policy.delay(self.failures), PROBE_EVERY)
        self.down_until = now + wait
        log.warning(
            "%s: cannot connect (%s); down for %.1f s, next try in %.1f s",
            self.server.label,
            reason,
            now - self.down_since,
            wait,
        )

    def record_connected(self) -> None:
        """A connection opened: an outage, if any, is over, and the server is used at once."""
        if self.down_since is not None:
            log.info(
                "%s: connected again after %.1f s down",
                self.server.label,
                trio.current_time() - self.down_since,
            )
        self.down_since = None
        self.failures = 0
        self.down_until = 0.0

    def outage(self) -> float:
        """Seconds the server has been unreachable (0 if it is up)."""
        if self.down_since is None:
            return 0.0
        return trio.current_time() - self.down_since

    def mark_fatal(self, reason: object) -> None:
        """A configuration error (R10, R35): no message goes to this server any more."""
        self.fatal = f"{self.server.label}: {reason}"


class Servers:
    """The pool's servers, and the choice among them (failover by weight)."""

    def __init__(
        self, servers: Sequence[Server], connections: int, pipeline: Pipeline = "cross"
    ) -> None:
        if not servers:
            raise ValueError("at least one server is needed")
        self.states = [ServerState(s, connections, pipeline) for s in servers]

    @property
    def any_rate(self) -> bool:
        """True if some server has a rate of its own (kept per message)."""
        return any(s.bucket is not None for s in self.states)

    def pick(self) -> ServerState | None:
        """A server for a new connection; None if every one is unusable for good."""
        usable = [s for s in self.states if s.fatal is None]
        if not usable:
            return None
        now = trio.current_time()
        up = [s for s in usable if s.down_until <= now] or usable
        return random.choices(up, weights=[s.server.weight for s in up])[0]

    def another_up(self) -> bool:
        """True if some usable server is not in a connect backoff."""
        now = trio.current_time()
        return any(s.fatal is None and s.down_until <= now for s in self.states)

    def fatal_reason(self) -> str:
        return "; ".join(s.fatal for s in self.states if s.fatal) or "no server available"

    @property
    def connections_open(self) -> int:
        return sum(s.open for s in self.states)

    def limits(self) -> dict[str, int]:
        """Connections each server may have now (by label), for statistics."""
        return {s.server.label: int(s.limiter.total_tokens) for s in self.states}


class Lease:
    """What one worker holds: a connection slot on one server (a limiter token) and at
    most one open connection there, never shared by two transactions."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.state: ServerState | None = None
        #: The server whose connection slot this lease holds, if any.
        self.token: ServerState | None = None
        #: Messages sent on this connection so far.
        self.sent = 0

    async def reserve(self, state: ServerState) -> None:
        """Take a connection slot on ``state``'s server, giving back any other."""
        if self.token is state:
            return
        if self.token is not None:
            self.token.limiter.release()
            self.token = None
        await state.limiter.acquire()
        self.token = state

    def try_reserve(self, state: ServerState) -> bool:
        """Take a slot on ``state``'s server if one is free now (giving back any other);
        False, keeping what it holds, if none is."""
        if self.token is state:
            return True
        try:
            state.limiter.acquire_nowait()
        except trio.WouldBlock:
            return False
        if self.token is not None:
            self.token.limiter.release()
        self.token = state
        return True

    async def connect(self, state: ServerState) -> None:
        """Open a connection to ``state``'s server, once its backoff is over (R43)."""
        await self.reserve(state)
        try:
            wait = state.down_until - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            conn = await state.server.open()
        except BaseException:
            self.token = None
            state.limiter.release()
            raise
        state.record_connected()
        state.open += 1
        conn.pipeline = state.pipeline  # start in the mode the server is known to take
        self.conn, self.state, self.sent = conn, state, 0

    async def release(self) -> None:
        """QUIT and close the connection, if any (shielded, bounded), and give the slot
        back."""
        conn, state, token = self.conn, self.state, self.token
        self.conn = self.state = self.token = None
        self.sent = 0
        if token is not None:
            token.limiter.release()
        if conn is None:
            return
        with trio.CancelScope(shield=True):
            await conn.aclose()
        if state is not None:
            state.open -= 1
            if conn.pipeline != "cross":  # learnt here; never unlearnt
                state.pipeline = conn.pipeline


def throttles(reply: Reply | None) -> bool:
    """True for a reply that asks the client to slow down: 421, or 4.7.x (R44)."""
    return reply is not None and (
        reply.code == 421 or (reply.enhanced is not None and reply.enhanced[:2] == (4, 7))
    )
