"""Trusting a private CA and checking a name other than the address connected to
(issue 12, point 8), against the capture server with STARTTLS (R2: verify, fail closed)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

import triomail
from triomail.testing import SMTPSink


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def message() -> triomail.PreparedMessage:
    return triomail.prepare(
        b"Subject: hi\r\n\r\nhello\r\n", sender="a@example.com", recipients=["b@example.com"]
    )


async def test_default_ssl_context_trusts_a_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with SMTPSink(tls=True, ssl_context=server_context(ca, "localhost")) as sink:
        context = triomail.default_ssl_context(ca_file)
        async with triomail.connect("localhost", sink.port, ssl_context=context) as conn:
            assert conn.tls_active
            result = await conn.send(message())
        assert result.ok
        # The system store alone does not know the private CA: fail closed.
        with pytest.raises(triomail.SMTPCertificateError):
            async with triomail.connect("localhost", sink.port):
                pass
    assert sink.received == 1


async def test_default_ssl_context_takes_pem_text() -> None:
    ca = trustme.CA()
    context = triomail.default_ssl_context(cadata=ca.cert_pem.bytes().decode("ascii"))
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1


async def test_server_hostname_is_the_name_checked() -> None:
    ca = trustme.CA()
    async with SMTPSink(tls=True, ssl_context=server_context(ca, "mail.test")) as sink:
        context = triomail.default_ssl_context(cadata=ca.cert_pem.bytes().decode("ascii"))
        # The certificate names mail.test, not the address: refused by default...
        with pytest.raises(triomail.SMTPCertificateError):
            async with triomail.connect("127.0.0.1", sink.port, ssl_context=context):
                pass
        # ...accepted when told which name to check...
        async with triomail.connect(
            "127.0.0.1", sink.port, ssl_context=context, server_hostname="mail.test"
        ) as conn:
            assert conn.tls_active
            assert (await conn.send(message())).ok
        # ...and still checked: another name is refused.
        with pytest.raises(triomail.SMTPCertificateError):
            async with triomail.connect(
                "127.0.0.1", sink.port, ssl_context=context, server_hostname="other.test"
            ):
                pass


async def test_an_international_name_is_checked_as_idna_2008() -> None:
    """Issue 14: the name TLS checks is the IDNA 2008 A-label, as on the envelope (the
    ssl module alone would encode it with IDNA 2003: ``xn--ocea``, another domain)."""
    ca = trustme.CA()
    async with SMTPSink(tls=True, ssl_context=server_context(ca, "xn--gcea.test")) as sink:
        context = triomail.default_ssl_context(cadata=ca.cert_pem.bytes().decode("ascii"))
        async with triomail.connect(
            "127.0.0.1", sink.port, ssl_context=context, server_hostname="ᏸᏸ.test"
        ) as conn:
            assert conn.tls_active
            assert conn.host == "xn--gcea.test"
