"""The one I/O boundary: its error table and its re-armable deadline."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

from triomail._client.exceptions import HANDSHAKE, map_failure
from triomail._client.transport import Transport
from triomail._core.errors import (
    SMTPCertificateError,
    SMTPDisconnected,
    SMTPSecurityError,
    SMTPTimeoutError,
)


def broken(cause: BaseException) -> trio.BrokenResourceError:
    exc = trio.BrokenResourceError()
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "stage", "error"),
    [
        (broken(ssl.SSLCertVerificationError("bad")), "TLS handshake", SMTPCertificateError),
        (broken(ssl.SSLError("alert")), "MAIL", SMTPSecurityError),
        (broken(ssl.SSLEOFError("eof")), HANDSHAKE, SMTPSecurityError),
        # EOF without close_notify once TLS is up is a lost connection (R11).
        (broken(ssl.SSLEOFError("eof")), "MAIL", SMTPDisconnected),
        (trio.ClosedResourceError(), "RCPT", SMTPDisconnected),
        (ConnectionResetError(), "DATA", SMTPDisconnected),
    ],
)
def test_stream_errors_become_smtp_errors(
    exc: BaseException, stage: str, error: type[Exception]
) -> None:
    reason, mapped = map_failure(exc, stage)
    assert isinstance(mapped, error)
    assert stage in reason


def test_anything_else_is_raised_as_it_is_but_still_breaks() -> None:
    reason, mapped = map_failure(ValueError("bug"), "MAIL")
    assert mapped is None
    assert reason == "ValueError in MAIL"


async def test_a_missed_deadline_names_its_stage_and_closes() -> None:
    client, _server = trio.testing.memory_stream_pair()
    io = Transport(client, "example.test")
    with pytest.raises(SMTPTimeoutError, match=r"RCPT: not done within 0.01 s") as info:
        await io.receive("RCPT", 0.01)
    assert info.value.stage == "RCPT"
    assert io.closed and io.broken == "timeout in RCPT"


async def test_arming_again_within_one_percent_keeps_the_deadline() -> None:
    client, _server = trio.testing.memory_stream_pair()
    io = Transport(client, "example.test")
    async with io.deadline() as scope:
        io.arm("MAIL", 100.0)
        first = scope.deadline
        io.arm("RCPT", 100.0)  # a moment later: not re-armed
        assert scope.deadline == first
        io.arm("DATA", 1.0)  # shorter: re-armed at once
        assert scope.deadline < first


async def test_io_outside_a_deadline_is_a_bug() -> None:
    client, _server = trio.testing.memory_stream_pair()
    io = Transport(client, "example.test")
    with pytest.raises(RuntimeError):
        io.arm("MAIL", 1.0)
