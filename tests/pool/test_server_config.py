"""Server configuration errors are raised at once, and a URL can name the CA to trust."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import triomail
from triomail import Server
from triomail.testing import SMTPSink


async def test_connect_pool_refuses_a_user_without_a_password_at_once() -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="without a password"):
            triomail.connect_pool(nursery, "smtp://ann@smtp.example.com:587")


def test_a_user_without_a_password_is_a_configuration_error_at_once() -> None:
    # Raised by the call, before the block: no connection attempt, no retry.
    with pytest.raises(ValueError, match="without a password"):
        triomail.open_pool("smtp://ann@smtp.example.com:587")
    with pytest.raises(ValueError, match="without a password"):
        triomail.open_pool(Server.from_url("smtp://ann@smtp.example.com:587"))
    with pytest.raises(ValueError, match="without a password"):
        triomail.open_pool(["smtp+plain://h:25", Server("smtp.example.com", 587, username="a")])
    # A password source given as an override, or in the URL, is fine.
    assert Server.from_url("smtp://ann@smtp.example.com:587", password="pw").username == "ann"
    assert Server.from_url("smtp://ann:pw@smtp.example.com:587").password == "pw"
    assert Server.from_url("smtp://ann@h:587", oauth_token="tok").oauth_token == "tok"


def test_unknown_url_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="only cafile"):
        Server.from_url("smtp://smtp.example.com:587?ca=/tmp/x.pem")


async def test_cafile_in_the_url_trusts_a_private_ca(tmp_path: Path) -> None:
    async with SMTPSink(require_tls=True) as sink:
        assert sink.ca is not None
        cafile = tmp_path / "ca.pem"
        sink.ca.cert_pem.write_to_path(str(cafile))
        server = Server.from_url(f"smtp://{sink.host}:{sink.port}?cafile={cafile}")
        assert server.ssl_context is not None
        message = triomail.prepare(
            b"Subject: private CA\r\n\r\nhello\r\n",
            sender="ann@example.com",
            recipients=["bob@example.org"],
        )
        with trio.fail_after(10):
            async with triomail.open_pool(server, connections=1) as pool:
                result = await pool.send(message)
        assert result.ok, result
        # Without the CA file, the sink's certificate is not trusted: a configuration
        # error for that server, not a retry loop.
        untrusted = Server.from_url(f"smtp://{sink.host}:{sink.port}")
        with trio.fail_after(10):
            async with triomail.open_pool(untrusted, connections=1) as pool:
                refused = await pool.send(message)
        assert refused.outcome is triomail.Outcome.PERMANENT
        assert len(sink.messages) == 1


def test_a_server_carries_every_connection_option() -> None:
    """The pool opens connections with every option ``connect`` takes (issue 11: one
    list of options): each is a :class:`Server` field, passed by name."""
    import dataclasses

    from triomail._client.options import OptionArgs

    fields = {f.name for f in dataclasses.fields(Server)}
    assert set(OptionArgs.__annotations__) <= fields
