"""Per-stage deadlines (RFC 5321 §4.5.3.2), armed by the transport for each operation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Timeouts"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed for each stage; each is an absolute deadline for the whole reply.

    The defaults are the RFC 5321 §4.5.3.2 minimums (R26); stages the RFC does not name
    get bounded defaults of their own. ``data_block`` bounds each write of message
    content (R46), ``data_done`` the wait for the reply to the final dot.
    """

    connect: float = 60.0
    tls_handshake: float = 60.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    auth: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0
    rset: float = 120.0
    noop: float = 60.0
    quit: float = 5.0
