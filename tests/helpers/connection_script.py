"""Shared vocabulary of the connection tests (``test_connection_*.py``).

The client under test always says ``EHLO client.test``; the scripted server greets as
``mx.test``. :func:`session` runs ``triomail.start_session`` on a stream from
``scripted_stream`` (plaintext unless ``tls=`` says otherwise).
"""

from __future__ import annotations

from typing import Any

import trio

import triomail
from helpers.scripted import Step, ehlo_reply, expect_line, send_lines

EHLO = b"EHLO client.test\r\n"
GREETING = send_lines("220 mx.test ESMTP scripted")
QUIT: list[Step] = [expect_line("QUIT"), send_lines("221 2.0.0 bye")]


def prelude(*caps: str) -> list[Step]:
    """Greeting, the client's EHLO, and an EHLO reply advertising ``caps``."""
    return [GREETING, expect_line(EHLO), ehlo_reply(*caps)]


def rcpt(address: str, *params: str) -> bytes:
    """The exact RCPT line the client should write."""
    return " ".join([f"RCPT TO:<{address}>", *params]).encode() + b"\r\n"


async def session(stream: trio.abc.Stream, **kw: Any) -> triomail.SMTPConnection:
    """``start_session`` as the tests use it: host ``mx.test``, EHLO ``client.test``."""
    kw.setdefault("tls", "none")
    return await triomail.start_session(stream, host="mx.test", local_hostname="client.test", **kw)
