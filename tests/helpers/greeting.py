"""One look at an SMTP server's greeting, for the helpers that start servers and wait
for them: a listening socket is not enough (Postfix accepts before smtpd can greet)."""

from __future__ import annotations

import contextlib
import socket


def read_greeting(host: str, port: int, read_timeout: float) -> bytes:
    """Connect, read the first line and, if it is a 220, say QUIT; the bytes read.

    Raises :class:`OSError` when nothing listens or the read times out.
    """
    with socket.create_connection((host, port), timeout=2.0) as s:
        s.settimeout(read_timeout)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"220"):
            s.sendall(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                s.recv(4096)
        return data
