"""The TCP socket under a stream, for the two things only the socket can tell or do.

:mod:`.transport` is the one I/O boundary; these are its helpers where it reaches past
the stream (and its TLS) to the kernel:

* :func:`has_pending`: an idle connection that became readable was closed or spoken to
  unasked (R24, R45), so it must not be reused.
* :func:`ack_now`: a server that writes each reply of a group by itself with Nagle's
  algorithm on (Haraka) holds the second reply until the client acknowledges the first,
  and the client's kernel delays that ACK while it has nothing to send: a stall per
  group. Where the client waits for every group, it asks for each ACK at once
  (``TCP_QUICKACK``; Linux only, so :data:`QUICKACK` says whether it exists).
"""

from __future__ import annotations

import contextlib
import select
import socket

import trio

__all__ = ["QUICKACK", "ack_now", "has_pending", "tcp_socket"]

#: Whether the kernel can be asked to acknowledge at once.
QUICKACK = hasattr(socket, "TCP_QUICKACK")


def tcp_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The TCP socket under ``stream`` and any TLS on it, if there is one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    return stream.socket  # type: ignore[return-value]


def has_pending(sock: socket.socket) -> bool:
    """True if data or EOF waits on ``sock``: polled, not consumed."""
    readable, _, _ = select.select([sock.fileno()], [], [], 0)
    return bool(readable)


def ack_now(sock: socket.socket) -> None:
    """Acknowledge what was read: set while an ACK is pending, TCP_QUICKACK sends it,
    and since Linux clears the flag by itself it is set again after each read."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
