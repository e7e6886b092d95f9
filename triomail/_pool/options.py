"""What a pool can be told: its options, written once, and its retry policy.

``open_pool`` and ``start_pool`` take these options as keywords (their signatures are
made from :class:`PoolOptions`), and the pool's parts read them from one object.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from .._client.options import Pipeline, pipeline_mode
from .interfaces import WireHook

__all__ = ["PoolOptions", "RetryPolicy"]


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
        """Seconds to wait before attempt number ``attempt + 1``.

        The delay is ``initial_backoff * multiplier ** (attempt - 1)`` up to
        ``max_backoff``. The power is taken only as far as the cap (a few dozen steps),
        never to the attempt count: ``2.0 ** 1024`` overflows a float, and a server
        refusing connections for an hour is that many failed windows.
        """
        steps = max(0, attempt - 1)
        if self.multiplier > 1:
            ratio = self.max_backoff / self.initial_backoff if self.initial_backoff > 0 else 1.0
            steps = min(steps, math.ceil(math.log(ratio, self.multiplier)) if ratio > 1 else 0)
        base = min(self.max_backoff, self.initial_backoff * self.multiplier**steps)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolOptions:
    """The keywords of :func:`open_pool` and :func:`start_pool`."""

    #: Worker tasks, hence connections open at most (per server: ``Server.max_connections``).
    connections: int = 10
    #: Close a connection after this many messages (None: never).
    max_messages_per_connection: int | None = None
    #: Close a connection after this many seconds without work.
    idle_timeout: float = 30.0
    #: Messages per second over all servers at most (None: no limit).
    rate: float | None = None
    retry: RetryPolicy = RetryPolicy()
    #: Seconds one send may take before it is cut off (R27); None: only the stage deadlines.
    message_deadline: float | None = None
    #: Seconds a message may wait for a free worker before it fails, not sent.
    queue_timeout: float | None = None
    #: Transactions one connection pipelines before their replies (RFC 2920).
    pipeline_depth: int = 16
    #: How a server's connections pipeline at first (RFC 2920): ``"cross"`` writes the
    #: next envelope behind an end of data (a server that refuses that is remembered,
    #: and its connections wait for each end-of-data reply from then on), ``"within"``
    #: always waits for it, ``"off"`` writes one command at a time.
    pipeline: Pipeline = "cross"
    #: Told of each message before it is written (a journal commits it in flight
    #: first): a :class:`~.interfaces.WireHook`.
    on_wire: WireHook | None = None

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        pipeline_mode(self.pipeline)
