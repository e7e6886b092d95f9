"""The DEBUG transcript on the ``triomail`` logger: what went out and what came back,
tagged ``plain`` or ``tls``, with every AUTH payload redacted (R36).

Only the transport calls these, and only when the logger is enabled for DEBUG (it
checks once per deadline), so the per-message path pays nothing for them.
"""

from __future__ import annotations

import logging

from .._core.reply import Reply

__all__ = ["log_in", "log_out"]

log = logging.getLogger("triomail")

#: Octets of one write shown in the transcript.
_SHOWN = 200


def log_out(host: str, phase: str, data: bytes, in_auth: bool) -> None:
    if in_auth and data != b"*\r\n":
        # R36: the AUTH line keeps its mechanism; no payload reaches the log.
        parts = data.split(b" ", 2)
        if parts[0] != b"AUTH":
            data = b"<redacted>"
        elif len(parts) == 3:
            data = parts[0] + b" " + parts[1] + b" <redacted>"
    head = data[:_SHOWN]
    log.debug("%s %s > %r%s", host, phase, head, "..." if len(data) > _SHOWN else "")


def log_in(host: str, phase: str, reply: Reply, in_auth: bool) -> None:
    shown = "334 <redacted>" if in_auth and reply.code == 334 else str(reply)
    log.debug("%s %s < %s", host, phase, shown)
