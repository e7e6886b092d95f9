"""The private Postfix fixtures work (checked with CPython's smtplib, not triomail)."""

from __future__ import annotations

import smtplib

import pytest
import trio
from helpers.postfix import PostfixInstance, as_sent

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: fixture check\r\n"
    b"Message-ID: <fixture-check@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that needs dot-stuffing\r\n"
    b".\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac\r\n"
    b"  trailing spaces  \r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n"
)


def _ehlo(pf: PostfixInstance) -> tuple[str, str]:
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as s:
        plain = s.ehlo()[1].decode()
        s.starttls(context=pf.client_ssl_context())
        tls = s.ehlo()[1].decode()
        return plain, tls


async def test_capabilities(postfix: PostfixInstance) -> None:
    plain, tls = await trio.to_thread.run_sync(_ehlo, postfix)
    for cap in ("PIPELINING", "SIZE 1000000", "8BITMIME", "SMTPUTF8", "CHUNKING", "DSN"):
        assert cap in plain.splitlines()
        assert cap in tls.splitlines()
    assert "STARTTLS" in plain.splitlines()
    assert "STARTTLS" not in tls.splitlines()


def _send_starttls(pf: PostfixInstance, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as s:
        s.starttls(context=pf.client_ssl_context())
        return s.sendmail("alice@example.com", rcpts, MESSAGE, mail_options=["BODY=8BITMIME"])


async def test_store_starttls_message_arrives_intact(postfix_store: PostfixInstance) -> None:
    cp = postfix_store.checkpoint()
    refused = await trio.to_thread.run_sync(_send_starttls, postfix_store, ["bob@example.net"])
    assert refused == {}
    (stored,) = await postfix_store.await_received(1, since=cp)
    assert stored.sender == "alice@example.com"
    assert stored.recipients == ("bob@example.net",)
    header_block = stored.raw.split(b"\n\n", 1)[0]
    assert header_block.startswith(b"Received: from ")
    assert b"with ESMTPS id " + stored.queue_id.encode() in header_block
    assert as_sent(stored.raw) == MESSAGE
    assert postfix_store.received_messages(since=cp) == [stored.raw]
    assert postfix_store.trouble(since=cp) == []
    assert "TLS connection established from" in postfix_store.log(since=cp)


def _send_plain(pf: PostfixInstance, rcpts: list[str], msg: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as s:
        return s.sendmail("", rcpts, msg)


async def test_discard_counts_deliveries(postfix: PostfixInstance) -> None:
    cp = postfix.checkpoint()
    await trio.to_thread.run_sync(
        _send_plain, postfix, ["a@example.org", "b@example.com"], b"Subject: x\r\n\r\nhi\r\n"
    )
    lines = await postfix.await_delivered(2, since=cp)
    assert sorted(line.split("to=<")[1].split(">")[0] for line in lines) == [
        "a@example.org",
        "b@example.com",
    ]
    with pytest.raises(Exception, match="received\\(\\) needs"):
        postfix.received_messages()


def _send_too_big(pf: PostfixInstance) -> None:
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as s:
        s.sendmail("a@example.com", ["b@example.com"], b"x" * 2_000_000)


async def test_size_limit(postfix: PostfixInstance) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        await trio.to_thread.run_sync(_send_too_big, postfix)
    assert info.value.smtp_code == 552
