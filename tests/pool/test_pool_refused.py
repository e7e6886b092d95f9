"""A message that names no recipient is refused locally, never called accepted.

"Every recipient accepted" is true of an empty list, so a result for such a message
would read as accepted while nothing was sent: ``pool.send`` raises
:exc:`LocalProtocolError` as ``conn.send`` does, and in ``send_all`` the message comes
back failed for good, with the reason.
"""

from __future__ import annotations

from email.message import EmailMessage

import pytest

import triomail
from triomail import LocalProtocolError, Outcome, Server
from triomail.testing import SMTPSink


def _no_to() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "ann@example.com"
    msg["Subject"] = "to nobody"
    msg.set_content("hello")
    return msg


RAW = b"Subject: raw\r\n\r\nno envelope\r\n"


async def test_pool_send_raises_for_a_message_with_no_recipient() -> None:
    async with SMTPSink(tls=False) as sink:
        server = Server(sink.host, sink.port, tls="none")
        async with triomail.open_pool(server, connections=2) as pool:
            for message in (_no_to(), RAW):
                with pytest.raises(LocalProtocolError):
                    await pool.send(message)  # type: ignore[call-overload]
            with pytest.raises(LocalProtocolError, match="no recipients"):
                await pool.send(RAW, sender="ann@example.com", recipients=[])
            stats = pool.statistics()
        assert sink.messages == []
    assert stats.done[Outcome.ACCEPTED.value] == 0
    # Raw bytes without an envelope are refused before they are handed over; the
    # EmailMessage only when a worker prepares it: counted failed, never accepted.
    assert stats.done[Outcome.PERMANENT.value] == 1


@pytest.mark.parametrize("pipeline_depth", [1, 16])
async def test_send_all_fails_a_message_with_no_recipient(pipeline_depth: int) -> None:
    ok = triomail.prepare(RAW, sender="ann@example.com", recipients=["bob@example.org"])
    async with SMTPSink(tls=False) as sink:
        server = Server(sink.host, sink.port, tls="none")
        async with triomail.open_pool(server, connections=2, pipeline_depth=pipeline_depth) as pool:
            async with pool.send_all([_no_to(), RAW, ok]) as results:  # type: ignore[list-item]
                got = [r async for r in results]
            stats = pool.statistics()
        assert len(sink.messages) == 1
    failed = [r for r in got if not r.ok]
    assert len(failed) == 2
    for result in failed:
        assert result.outcome is Outcome.PERMANENT
        assert result.error is not None and result.error.startswith("refused locally")
        with pytest.raises(triomail.SMTPSendError):
            result.raise_for_status()
    assert stats.done[Outcome.ACCEPTED.value] == 1
    assert stats.done[Outcome.PERMANENT.value] == 2
