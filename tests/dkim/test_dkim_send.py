"""Signed mail on the wire (issue 14): ``prepare(..., dkim=)`` signs once, and what the
server receives (by ``send``, ``send_many`` with DATA and BDAT, and the pool) verifies
with dkimpy, an implementation we did not write."""

from __future__ import annotations

from email.message import EmailMessage

import dkim
import pytest
from conftest import dnsfunc_for

import triomail
from triomail.testing import SMTPSink


def newsletter(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = f"reader{n}@example.org"
    msg["Subject"] = f"Grüße, issue {n}"
    msg["List-Unsubscribe"] = f"<https://example.com/unsubscribe?u={n}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(f"Hallo, café\n.\n..a dot line\nnumber {n}\n")
    msg.add_alternative(f"<p>Hallo <b>{n}</b></p>", subtype="html")
    return msg


@pytest.mark.parametrize("chunking", [False, True])
async def test_send_many_delivers_signatures_that_verify(
    rsa_signer: triomail.DKIMSigner, ed_signer: triomail.DKIMSigner, chunking: bool
) -> None:
    both = triomail.DKIMMultiSigner(rsa_signer, ed_signer)
    async with SMTPSink(tls=False, extra_extensions=["CHUNKING"] if chunking else []) as sink:
        async with triomail.connect(sink.host, sink.port, tls="none") as conn:
            prepared = [conn.prepare(newsletter(n), dkim=both) for n in range(5)]
            results = await conn.send_many(prepared, chunking=chunking or None)
        assert all(r.ok for r in results)
        dnsfunc = dnsfunc_for(rsa_signer, ed_signer)
        for captured in sink.messages:
            assert captured.data.count(b"DKIM-Signature:") == 2
            assert dkim.verify(captured.data, dnsfunc=dnsfunc)


async def test_the_pool_carries_the_signature_through(
    ed_signer: triomail.DKIMSigner,
) -> None:
    async with SMTPSink(tls=False) as sink:
        server = triomail.Server(sink.host, sink.port, tls="none")
        messages = [triomail.prepare(newsletter(n), dkim=ed_signer) for n in range(20)]
        async with triomail.open_pool(server, connections=3) as pool:
            async with pool.send_all(messages) as results:
                assert all([r.ok async for r in results])
        assert len(sink.messages) == 20
        dnsfunc = dnsfunc_for(ed_signer)
        assert all(dkim.verify(m.data, dnsfunc=dnsfunc) for m in sink.messages)


def test_a_changed_message_fails_verification(ed_signer: triomail.DKIMSigner) -> None:
    """The check can fail: a body changed after signing does not verify."""
    data = triomail.prepare(newsletter(1), dkim=ed_signer).canonical.data
    assert dkim.verify(data, dnsfunc=dnsfunc_for(ed_signer))
    assert not dkim.verify(data.replace(b"number 1", b"number 2"), dnsfunc=dnsfunc_for(ed_signer))
