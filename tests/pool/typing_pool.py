"""What the pool's types allow, checked by ``mypy --strict`` (``test_pool_types``).

Not a test module: mypy reads it, pytest does not run it. Each call is one the pool
takes at run time; the last ones are refused by the types as they are at run time.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import assert_type

import triomail


async def sends(pool: triomail.Pool, message: EmailMessage) -> None:
    raw = b"Subject: hi\r\n\r\nhello\r\n"
    assert_type(await pool.send(message), triomail.SendResult)
    assert_type(
        await pool.send(raw, sender="a@example.com", recipients=["b@example.org"]),
        triomail.SendResult,
    )
    await pool.send(raw.decode(), sender="a@example.com", recipients=["b@example.org"])
    await pool.send(message, recipients=["b@example.org"])
    prepared = triomail.prepare(raw, sender="a@example.com", recipients=["b@example.org"])
    await pool.send(prepared)
    async with pool.send_all([prepared, message]) as results:
        async for result in results:
            assert_type(result, triomail.SendResult)
    await pool.send(raw)  # type: ignore[call-overload]  # raw bytes need an envelope
