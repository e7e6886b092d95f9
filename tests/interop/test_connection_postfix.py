"""The connection (issue 2) against Postfix ``smtpd`` on loopback, over STARTTLS.

Postfix is the reference server here: the private instance of ``postfix.py`` (session
fixture ``postfix_store``: every message is stored, SIZE 1000000, PIPELINING, CHUNKING,
8BITMIME, SMTPUTF8, a certificate from the session CA) is driven through the public API
only -- :func:`triomail.connect`, :meth:`~triomail.SMTPConnection.send`,
:meth:`~triomail.SMTPConnection.send_many` and :func:`triomail.open_pool`.

What the client claims is checked against what Postfix saw, from two places:

- the stored copy of each message (``as_sent(stored.raw)`` is what the client put on the
  wire between DATA and the final dot, or in its BDAT chunks, after un-stuffing);
- Postfix's maillog, in particular the ``disconnect from ...`` line that counts every
  command of a session (``ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=7``).
  A session is found by its signature: each test sends a number of NOOPs no other test
  sends (``noop=N``), so a log line of another test's session can never be taken for it.
  smtpd also logs "improper command pipelining" for a client that writes ahead where it
  must wait (after STARTTLS, before 354); no session here may cause that.

Requirements touched (security-requirements.md): R1, R2, R3, R5, R7, R10 (STARTTLS with
verification, nothing but EHLO and STARTTLS before a failed handshake, a pool that does
not retry a certificate failure), R11 (QUIT), R13 (caller mistakes refused before MAIL),
R16/R17 (canonical DATA and the smuggling payloads, end to end), R18 (8-bit only with
8BITMIME), R19 (no line over 1000 octets), R20 (BDAT), R28, R29 (PIPELINING/CHUNKING
across transactions), R30 (SIZE refused before MAIL), R31 (enhanced codes), R32
(SMTPUTF8 and A-labels), R33 (DSN parameters Postfix accepts), R37, R41 (per-recipient
outcomes), R44/R48 (a pool of five connections).
"""

from __future__ import annotations

import email
import email.policy
import itertools
import re
import ssl
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from email.message import EmailMessage

import pytest
import trio
from helpers import certs
from helpers.postfix import Checkpoint, PostfixInstance, as_sent

import triomail
from triomail import Outcome, PreparedMessage, SendResult, SMTPConnection

SENDER = "alice@example.com"
CLIENT_NAME = "client.triomail.test"
SIZE_LIMIT = 1_000_000  # message_size_limit of the fixture, advertised as SIZE
# Sender and recipients in an IDN-only domain.
U_DOMAIN = "例子.测试"
A_DOMAIN = "xn--fsqu00a.xn--0zwm56d"
U_BOOKS = "bücher.example"
A_BOOKS = "xn--bcher-kva.example"

# -- helpers -----------------------------------------------------------------------------


def _connect(
    pf: PostfixInstance, host: str | None = None
) -> AbstractAsyncContextManager[SMTPConnection]:
    return triomail.connect(
        host or pf.host,
        pf.port,
        tls="starttls",
        ssl_context=pf.client_ssl_context(),
        local_hostname=CLIENT_NAME,
    )


_SIGNATURES = itertools.count(1)


async def _mark(conn: SMTPConnection) -> str:
    """Sign the session with a number of NOOPs no other session of this module sends;
    returns the signature Postfix writes into its disconnect line (``noop=N``)."""
    noops = next(_SIGNATURES)
    for _ in range(noops):
        reply = await conn.noop()
        assert reply.code == 250
    return f"noop={noops}"


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` (it reads Postfix's log or store) until it holds."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - a file, not a trio event, changes
            await trio.sleep(0.02)


_DISCONNECT = re.compile(r"postfix/smtpd\[\d+\]: disconnect from \S+ (?P<stats>.*)$", re.M)


def _stats(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


def _commands(stats: dict[str, str]) -> dict[str, int]:
    """The counts of a session in which every command succeeded (no ``ok/total``),
    without the ``commands=`` total, which must be their sum."""
    assert all(v.isdigit() for v in stats.values()), stats
    counts = {k: int(v) for k, v in stats.items() if k != "commands"}
    assert int(stats["commands"]) == sum(counts.values()), stats
    return counts


async def _session(pf: PostfixInstance, since: Checkpoint, signature: str) -> dict[str, str]:
    """The command counts of the one session whose disconnect line has ``signature``
    (for example ``noop=7``); waits for smtpd to write it."""
    pattern = re.compile(rf"(?:^|\s){re.escape(signature)}(?:\s|$)")

    def found() -> list[dict[str, str]]:
        return [
            _stats(m["stats"])
            for m in _DISCONNECT.finditer(pf.log(since))
            if pattern.search(m["stats"])
        ]

    await _until(lambda: bool(found()))
    (stats,) = found()
    # smtpd logs a client that writes ahead where it may not (after STARTTLS, EHLO,
    # DATA before 354 ...): R5, R29.
    assert "improper command pipelining" not in pf.log(since)
    return stats


def _queue_id(result: SendResult) -> str:
    assert result.reply is not None
    m = re.search(r"queued as (\w+)", result.reply.text)
    assert m, result.reply
    return m[1]


_DELIVERY = re.compile(r"postfix/pipe\[\d+\]: (\w+): to=<[^>]*>.* status=sent ")


async def _stored(
    pf: PostfixInstance, since: Checkpoint, results: Sequence[SendResult]
) -> dict[str, tuple[str, set[str], bytes]]:
    """Wait until every accepted recipient of ``results`` was delivered; queue id ->
    (sender, recipients, raw) of those messages only (stray deliveries of other tests are
    ignored). A message stored once per recipient group is the same bytes each time."""
    expected = {_queue_id(r): len(r.accepted) for r in results}
    await _until(
        lambda: (
            sum(q in expected for q in _DELIVERY.findall(pf.log(since))) >= sum(expected.values())
        ),
        timeout=15,
    )
    out: dict[str, tuple[str, set[str], bytes]] = {}
    for s in pf.received(since=since):
        if s.queue_id not in expected:
            continue
        if s.queue_id in out:
            sender, rcpts, raw = out[s.queue_id]
            assert sender == s.sender
            rcpts.update(s.recipients)
            # Received: has "for <rcpt>" only in a one-recipient delivery; the rest is equal.
            assert as_sent(raw).split(b"\r\n", 3)[3] == as_sent(s.raw).split(b"\r\n", 3)[3]
        else:
            out[s.queue_id] = (s.sender, set(s.recipients), s.raw)
    assert {q: len(r) for q, (_, r, _) in out.items()} == expected
    return out


def _received_header(raw: bytes) -> str:
    head = raw.split(b"\n\n", 1)[0].decode("utf-8")
    m = re.match(r"Received: .*?(?=\n\S)", head, re.S)
    assert m, head
    return m[0]


def _sized(size: int, *, dots: bool = False) -> bytes:
    """A canonical message of exactly ``size`` octets (100-octet lines)."""
    head = b"Subject: %d octets\r\n\r\n" % size
    line = (b"." if dots else b"x") + b"x" * 97 + b"\r\n"
    n = size - len(head)
    data = head + line * (n // 100 - 1) + b"y" * (100 + n % 100 - 2) + b"\r\n"
    assert len(data) == size
    return data


# -- STARTTLS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "tls12"), [("127.0.0.1", False), ("localhost", False), ("127.0.0.1", True)]
)
async def test_starttls_verified_then_ehlo_again(
    postfix_store: PostfixInstance, host: str, tls12: bool
) -> None:
    """R1/R2/R7: STARTTLS with a verifying context for the configured name (an IP
    address or a DNS name in the certificate, TLS 1.3 or, if the context says so, 1.2);
    the capabilities are those of the post-TLS EHLO (no STARTTLS left in them), which
    advertises PIPELINING and CHUNKING."""
    pf = postfix_store
    ctx = pf.client_ssl_context()
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cp = pf.checkpoint()
    async with triomail.connect(
        host, pf.port, tls="starttls", ssl_context=ctx, local_hostname=CLIENT_NAME
    ) as conn:
        assert conn.tls_active
        caps = conn.capabilities
        assert caps.pipelining and caps.chunking and caps.smtputf8 and caps.eightbitmime
        assert caps.size_limit == SIZE_LIMIT
        assert "ENHANCEDSTATUSCODES" in caps
        assert "STARTTLS" not in caps  # only the plaintext EHLO offered it: forgotten (R7)
        result = await conn.send(
            b"Subject: over TLS\r\n\r\nhello\r\n", sender=SENDER, recipients=["bob@example.net"]
        )
        assert result.ok and result.outcome is Outcome.ACCEPTED
        assert result.reply is not None and result.reply.enhanced_code == "2.0.0"
        signature = await _mark(conn)
    stats = await _session(pf, cp, signature)
    # EHLO, STARTTLS, EHLO again over TLS; one transaction; QUIT at the end (R11).
    assert _commands(stats) == {
        "ehlo": 2,
        "starttls": 1,
        "mail": 1,
        "rcpt": 1,
        "data": 1,
        "noop": int(signature[5:]),
        "quit": 1,
    }
    log = pf.log(cp)
    m = re.search(r"TLS connection established from \S+: (TLSv1\.[23]) with cipher", log)
    assert m, log
    assert m[1] == ("TLSv1.2" if tls12 else "TLSv1.3")
    stored = await _stored(pf, cp, [result])
    ((sender, rcpts, raw),) = stored.values()
    assert (sender, rcpts) == (SENDER, {"bob@example.net"})
    received = _received_header(raw)
    assert f"from {CLIENT_NAME} " in received
    assert " with ESMTPS id " in received  # ESMTP over TLS, as Postfix saw it
    assert as_sent(raw) == b"Subject: over TLS\r\n\r\nhello\r\n"


@pytest.mark.parametrize("case", ["untrusted CA", "system CAs", "wrong host name"])
async def test_unverifiable_certificate_nothing_sent(
    postfix_store: PostfixInstance, case: str
) -> None:
    """R2/R3/R10: a certificate the context cannot verify (a CA it does not trust, the
    default context's system CAs, a name that is not in the certificate) ends the
    connection with SMTPCertificateError; Postfix saw EHLO and STARTTLS, nothing else."""
    pf = postfix_store
    cp = pf.checkpoint()
    with pytest.raises(triomail.SMTPCertificateError):
        if case == "wrong host name":
            # The trusted CA, but the configured name is not the certificate's (R2: the
            # name verified is the one configured, never one learnt from the server).
            stream = await trio.open_tcp_stream(pf.host, pf.port)
            conn = await triomail.start_session(
                stream,
                host="mail.example.org",
                tls="starttls",
                ssl_context=pf.client_ssl_context(),
                local_hostname=CLIENT_NAME,
            )
            await conn.aclose()
        else:
            ctx = certs.client_ssl_context(certs.make_ca()) if case == "untrusted CA" else None
            async with triomail.connect(
                pf.host, pf.port, tls="starttls", ssl_context=ctx, local_hostname=CLIENT_NAME
            ) as conn:
                await conn.send(b"Subject: x\r\n\r\nx\r\n", sender=SENDER, recipients=[SENDER])
    stats = await _session(pf, cp, "starttls=0/1")
    # One EHLO, one STARTTLS (whose handshake failed), then the connection was closed:
    # no EHLO over TLS, no MAIL, no QUIT in plaintext.
    assert stats == {"ehlo": "1", "starttls": "0/1", "commands": "1/2"}
    assert pf.received(since=cp) == []
    assert "client=" not in pf.log(cp)


# -- content ---------------------------------------------------------------------------------

BINARY = bytes(range(256)) * 64
NOTES = "Zeile 1\n.\n..zwei Punkte\nZeile 4 — ünïcödé ✓\n"
# One line of 5000 characters: the client must re-encode it, never send a line over
# 1000 octets (R19) nor let Postfix split it (line_length_limit).
LONG = "lang " * 1000 + "\n"
BODY = (
    "Hallo Bob,\n"
    ".a line that starts with a dot\n"
    ".\n"
    "..two dots\n"
    "From the start of a line\n"
    "café € 你好\n"
    "trailing spaces   \n"
    "\n"
    "-- \n"
    "Alice\n"
)


def _rich_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.com>"
    msg["To"] = "Bob <bob@example.net>, carol@example.org"
    msg["Cc"] = "Dave <dave@example.org>"
    msg["Bcc"] = "eve@example.com"
    msg["Subject"] = "Grüße aus Köln \u2013 你好 ✓ (a UTF-8 subject)"
    msg["Message-ID"] = "<intact-1@triomail.test>"
    msg["Date"] = "Sat, 28 Nov 2026 10:00:00 +0000"
    msg.set_content(BODY)
    msg.add_attachment(
        BINARY, maintype="application", subtype="octet-stream", filename="binary.bin"
    )
    msg.add_attachment(NOTES, subtype="plain", filename="notizen \u2013 ü.txt")
    msg.add_attachment(b"\x89PNG\r\n\x1a\n" + bytes(500), maintype="image", subtype="png",
                       filename="pixel.png")  # fmt: skip
    msg.add_attachment(LONG, subtype="plain", filename="long.txt")
    msg.set_boundary("==triomail-test-boundary==")
    return msg


async def test_email_message_arrives_byte_intact(postfix_store: PostfixInstance) -> None:
    """R16/R18/R19: an EmailMessage with a UTF-8 subject, attachments and lines that
    start with "." arrives exactly as the client encoded it; the envelope comes from
    From/To/Cc/Bcc and Bcc is not in the data."""
    pf = postfix_store
    msg = _rich_message()
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        result = await conn.send(msg)
        signature = await _mark(conn)
    assert result.ok, result
    assert result.message_id == "<intact-1@triomail.test>"
    everyone = {"bob@example.net", "carol@example.org", "dave@example.org", "eve@example.com"}
    assert {r.recipient for r in result.recipients} == everyone
    stats = await _session(pf, cp, signature)
    assert (stats["mail"], stats["rcpt"], stats["data"]) == ("1", "4", "1")
    stored = await _stored(pf, cp, [result])
    assert list(stored) == [_queue_id(result)]
    sender, rcpts, raw = stored[_queue_id(result)]
    assert (sender, rcpts) == (SENDER, everyone)
    # What the client put on the wire is what prepare() gives (the boundary is fixed in
    # _rich_message, else the email package picks a random one each time).
    wire = triomail.prepare(msg).canonical.data
    assert as_sent(raw) == wire
    assert b"\nBcc:" not in wire and b"eve@example.com" not in wire
    assert max(len(line) for line in wire.split(b"\r\n")) <= 998
    # The stored message parses back to the same content.
    back = email.message_from_bytes(as_sent(raw), policy=email.policy.default)
    assert isinstance(back, EmailMessage)
    assert back["Subject"] == msg["Subject"]
    body = back.get_body(("plain",))
    assert body is not None and body.get_content() == BODY.replace("\n", "\r\n")
    parts = list(back.iter_attachments())
    assert [p.get_filename() for p in parts] == [
        "binary.bin",
        "notizen \u2013 ü.txt",
        "pixel.png",
        "long.txt",
    ]
    assert parts[0].get_content() == BINARY
    assert parts[1].get_content() == NOTES.replace("\n", "\r\n")
    assert parts[2].get_content() == b"\x89PNG\r\n\x1a\n" + bytes(500)
    assert parts[3].get_content() == LONG.replace("\n", "\r\n")


# The smtpsmug end-of-data variants (R16), each to be followed by a smuggled transaction;
# "\r\n\x00.\r\n" is left out: a NUL is refused outright (R17, checked below).
SMUGGLE_ENDINGS = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
    b"\r\n.\r", b"\r\r\n.\r\n",
]  # fmt: skip


def _smuggling(endings: Sequence[bytes]) -> bytes:
    raw = b"Subject: smuggling\r\n\r\nbefore\r\n"
    for i, ending in enumerate(endings):
        raw += (
            b"part %d" % i
            + ending
            + b"MAIL FROM:<smuggler@evil.test>\r\nRCPT TO:<victim%d@evil.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n" % i
        )
    return raw + b"after\r\n"


async def test_smuggling_payloads_stay_one_message(postfix_store: PostfixInstance) -> None:
    """R16/R17: raw bytes with every smtpsmug end-of-data variant and a smuggled
    transaction behind each: Postfix stores one message, in canonical form, and never
    sees the smuggled sender or recipient. The NUL variant is refused before MAIL."""
    pf = postfix_store
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        with pytest.raises(triomail.LocalProtocolError, match="NUL"):
            await conn.send(
                _smuggling([b"\r\n\x00.\r\n"]), sender=SENDER, recipients=["bob@example.net"]
            )
        assert conn.is_usable
        prepared = conn.prepare(
            _smuggling(SMUGGLE_ENDINGS), sender=SENDER, recipients=["bob@example.net"]
        )
        result = await conn.send(prepared)
        signature = await _mark(conn)
    assert result.ok, result
    stats = await _session(pf, cp, signature)
    assert (stats["mail"], stats["rcpt"], stats["data"]) == ("1", "1", "1")
    assert "commands" in stats and "/" not in stats["commands"]  # nothing refused
    stored = await _stored(pf, cp, [result])
    ((sender, rcpts, stored_raw),) = stored.values()
    assert (sender, rcpts) == (SENDER, {"bob@example.net"})
    assert as_sent(stored_raw) == prepared.canonical.data
    log = pf.log(cp)
    assert "evil.test" not in log and "smuggler" not in log
    wire = prepared.canonical.data
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None


# -- SMTPUTF8 --------------------------------------------------------------------------------


async def test_smtputf8_addresses(postfix_store: PostfixInstance) -> None:
    """R32/R28: UTF-8 local parts travel as UTF-8 with SMTPUTF8 (Postfix records
    "UTF8SMTPS"); the envelope Postfix stores is the UTF-8 one."""
    pf = postfix_store
    msg = EmailMessage()
    msg["From"] = f"用户 <用户@{U_DOMAIN}>"
    msg["To"] = f"收件人@{U_DOMAIN}, Ünal <ünal@{U_BOOKS}>"
    msg["Subject"] = "你好, SMTPUTF8"
    msg.set_content("正文\n.点\n")
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        prepared = conn.prepare(msg)
        assert prepared.needs_smtputf8
        assert prepared.sender == f"用户@{U_DOMAIN}"
        # A UTF-8 local part: the domain stays in U-labels next to it (RFC 6531).
        assert prepared.recipients == (f"收件人@{U_DOMAIN}", f"ünal@{U_BOOKS}")
        result = await conn.send(prepared)
        signature = await _mark(conn)
    assert result.ok, result
    stats = await _session(pf, cp, signature)
    assert (stats["mail"], stats["rcpt"], stats["data"]) == ("1", "2", "1")
    stored = await _stored(pf, cp, [result])
    ((sender, rcpts, raw),) = stored.values()
    assert sender == f"用户@{U_DOMAIN}"
    assert rcpts == {f"收件人@{U_DOMAIN}", f"ünal@{U_BOOKS}"}
    assert " with UTF8SMTPS id " in _received_header(raw)
    assert as_sent(raw) == prepared.canonical.data
    assert f"From: 用户 <用户@{U_DOMAIN}>".encode() in as_sent(raw)
    assert f"from=<用户@{U_DOMAIN}>" in pf.log(cp)


@pytest.mark.parametrize("form", ["raw", "EmailMessage"])
async def test_idn_domain_with_ascii_local_part_goes_as_a_labels(
    postfix_store: PostfixInstance, form: str
) -> None:
    """R32: an ASCII local part at an IDN domain is sent with A-labels and without
    SMTPUTF8 (Postfix records plain "ESMTPS"); the envelope Postfix logs and stores is
    the A-label one."""
    pf = postfix_store
    recipients = [f"bob@{U_DOMAIN}", "carol@example.com"]
    message: EmailMessage | bytes
    if form == "raw":
        message = b"Subject: IDN\r\n\r\nA-labels\r\n"
        sender: str | None = f"alice@{U_BOOKS}"
        envelope: list[str] | None = recipients
    else:
        message = EmailMessage()
        message["From"] = f"Alice <alice@{U_BOOKS}>"
        message["To"] = ", ".join(recipients)
        message["Subject"] = "IDN"
        message.set_content("A-labels\n")
        sender = envelope = None  # from the headers
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        prepared = conn.prepare(message, sender=sender, recipients=envelope)
        assert not prepared.needs_smtputf8
        assert prepared.sender == f"alice@{A_BOOKS}"
        assert prepared.recipients == (f"bob@{A_DOMAIN}", "carol@example.com")
        assert prepared.canonical.data.isascii()
        result = await conn.send(prepared)
        signature = await _mark(conn)
    assert result.ok, result
    assert [r.recipient for r in result.recipients] == [f"bob@{A_DOMAIN}", "carol@example.com"]
    await _session(pf, cp, signature)
    stored = await _stored(pf, cp, [result])
    ((sender, rcpts, raw),) = stored.values()
    assert sender == f"alice@{A_BOOKS}"
    assert rcpts == {f"bob@{A_DOMAIN}", "carol@example.com"}
    assert " with ESMTPS id " in _received_header(raw)
    assert as_sent(raw) == prepared.canonical.data
    log = pf.log(cp)
    assert f"from=<alice@{A_BOOKS}>" in log
    assert f"to=<bob@{A_DOMAIN}>" in log
    if form == "EmailMessage":
        # The headers too: A-labels, no raw UTF-8 that would need SMTPUTF8.
        assert f"From: Alice <alice@{A_BOOKS}>".encode() in as_sent(raw)
        assert f"bob@{A_DOMAIN}".encode() in as_sent(raw)


# -- SIZE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [SIZE_LIMIT + 1, 1_200_000])
async def test_size_over_limit_refused_before_mail(
    postfix_store: PostfixInstance, size: int
) -> None:
    """R30/R31/R37: a message larger than the advertised SIZE is a permanent 552 5.3.4
    result and no MAIL is written (Postfix counts none in the session); the connection
    stays usable."""
    pf = postfix_store
    data = _sized(size)
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        assert conn.capabilities.size_limit == SIZE_LIMIT
        result = await conn.send(data, sender=SENDER, recipients=["bob@example.net", "c@x.test"])
        assert conn.is_usable
        signature = await _mark(conn)
    assert not result.ok
    assert result.outcome is Outcome.PERMANENT
    assert not result.mail_accepted
    assert result.reply is not None
    assert (result.reply.code, result.reply.enhanced_code) == (552, "5.3.4")
    assert [(r.outcome, r.code) for r in result.recipients] == [(Outcome.PERMANENT, 552)] * 2
    stats = await _session(pf, cp, signature)
    assert _commands(stats) == {"ehlo": 2, "starttls": 1, "noop": int(signature[5:]), "quit": 1}
    assert "client=" not in pf.log(cp)


@pytest.mark.parametrize("dots", [False, True])
async def test_size_just_under_limit_accepted(postfix_store: PostfixInstance, dots: bool) -> None:
    """R30: just under the limit is sent and accepted, even when dot-stuffing makes the
    wire longer than SIZE (the limit counts the message, not the stuffing)."""
    pf = postfix_store
    # Postfix counts its own Received header and queue records against the limit too;
    # 5000 octets under leaves room for them.
    data = _sized(SIZE_LIMIT - 5000, dots=dots)
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        prepared = conn.prepare(data, sender=SENDER, recipients=["bob@example.net"])
        assert len(prepared.canonical) == SIZE_LIMIT - 5000
        result = await conn.send(prepared)
        signature = await _mark(conn)
    assert result.ok, result
    counts = _commands(await _session(pf, cp, signature))
    assert (counts["mail"], counts["data"]) == (1, 1)
    stored = await _stored(pf, cp, [result])
    ((_, _, raw),) = stored.values()
    assert as_sent(raw) == data


# -- many messages ---------------------------------------------------------------------------


def _batch(conn: SMTPConnection, n: int, tag: str) -> list[PreparedMessage]:
    out = []
    for i in range(n):
        msg = EmailMessage()
        msg["From"] = SENDER
        msg["To"] = f"{tag}{i}@example.net"
        msg["Subject"] = f"{tag} {i} \u2013 ü"
        msg["Message-ID"] = f"<{tag}-{i}@triomail.test>"
        msg.set_content(f"message {i}\n.dot line\n.\ncafé\n" + "x" * (i * 97) + "\n")
        if i % 5 == 0:
            msg.add_attachment(bytes([i]) * (1000 * i), maintype="application",
                               subtype="octet-stream", filename=f"{i}.bin")  # fmt: skip
        out.append(conn.prepare(msg))
    return out


def _check_batch(
    prepared: Sequence[PreparedMessage],
    results: Sequence[SendResult],
    stored: dict[str, tuple[str, set[str], bytes]],
) -> None:
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * len(prepared)
    by_rcpt = {next(iter(rcpts)): raw for _, rcpts, raw in stored.values()}
    assert len(by_rcpt) == len(stored) == len(prepared)
    for p, r in zip(prepared, results, strict=True):
        assert r.message_id == p.message_id
        assert as_sent(by_rcpt[p.recipients[0]]) == p.canonical.data, p.recipients


@pytest.mark.parametrize("chunking", [None, False])
async def test_send_many_fifty_over_one_connection(
    postfix_store: PostfixInstance, chunking: bool | None
) -> None:
    """R29/R20/R16: 50 messages pipelined over one STARTTLS connection, with BDAT
    (CHUNKING) by default and with DATA when ``chunking=False``; all arrive intact."""
    pf = postfix_store
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        assert conn.capabilities.pipelining and conn.capabilities.chunking
        prepared = _batch(conn, 50, f"many{'-bdat' if chunking is None else '-data'}-")
        with trio.fail_after(20):
            results = await conn.send_many(prepared, chunking=chunking)
        assert conn.is_usable
        signature = await _mark(conn)
    stats = await _session(pf, cp, signature)
    assert (stats["ehlo"], stats["starttls"], stats["quit"]) == ("2", "1", "1")
    assert (stats["mail"], stats["rcpt"]) == ("50", "50")
    counts = _commands(stats)
    if chunking is False:
        # DATA: each body leads the next write; RSET only after a failed transaction.
        assert counts["data"] == 50 and "bdat" not in counts and "rset" not in counts
    else:
        # BDAT: one chunk per message; an RSET may precede a MAIL whose predecessor's
        # outcome was still unknown (RFC 3030), never the first.
        assert counts["bdat"] == 50 and "data" not in counts
        assert counts.get("rset", 0) <= 49
    stored = await _stored(pf, cp, results)
    _check_batch(prepared, results, stored)
    assert {_queue_id(r) for r in results} == set(stored)


async def test_pool_of_five_sends_two_hundred_over_starttls(
    postfix_store: PostfixInstance,
) -> None:
    """R2/R44/R48: a pool of at most 5 verified STARTTLS connections sends 200
    messages; every one is accepted once and stored intact."""
    pf = postfix_store
    messages = [
        triomail.prepare(
            b"Message-ID: <pool-%d@triomail.test>\r\nSubject: pool %d\r\n\r\n.body %d\r\n"
            % (i, i, i),
            sender=SENDER,
            recipients=[f"pool{i}@example.net"],
            tag=i,
        )
        for i in range(200)
    ]
    server = triomail.Server.from_url(
        f"smtp://{pf.host}:{pf.port}",
        ssl_context=pf.client_ssl_context(),
        local_hostname=CLIENT_NAME,
    )
    assert server.tls == "starttls"
    cp = pf.checkpoint()
    results: dict[int, SendResult] = {}
    with trio.fail_after(25):
        async with triomail.open_pool(server, connections=5) as pool:
            async with pool.send_all(messages) as channel:
                async for result in channel:
                    assert isinstance(result.tag, int)
                    results[result.tag] = result
            assert pool.statistics().connections_open <= 5
    assert sorted(results) == list(range(200))
    assert all(r.ok and r.attempts == 1 for r in results.values())
    stored = await _stored(pf, cp, list(results.values()))
    _check_batch(messages, [results[i] for i in range(200)], stored)

    # Every session: verified TLS, EHLO again after it, QUIT; 200 MAILs in all.
    def sessions() -> list[dict[str, str]]:
        return [_stats(m["stats"]) for m in _DISCONNECT.finditer(pf.log(cp))]

    await _until(lambda: sum(int(s.get("mail", "0")) for s in sessions()) >= 200)
    log = pf.log(cp)
    sessions_seen = sessions()
    assert 2 <= len(sessions_seen) <= 5  # concurrent, and never more than five
    assert all(s["starttls"] == "1" and s["ehlo"] == "2" for s in sessions_seen), sessions_seen
    assert sum(int(s.get("mail", "0")) for s in sessions_seen) == 200
    assert len(re.findall(r"TLS connection established from", log)) == len(sessions_seen)


async def test_pool_untrusted_certificate_fails_every_message_at_once(
    postfix_store: PostfixInstance,
) -> None:
    """R2/R10: a pool whose context does not trust the server's CA reports each message
    as a permanent failure on the first attempt (a configuration error, not retried), and
    Postfix saw no MAIL."""
    pf = postfix_store
    server = triomail.Server(
        pf.host,
        pf.port,
        tls="starttls",
        ssl_context=certs.client_ssl_context(certs.make_ca()),
        local_hostname=CLIENT_NAME,
    )
    messages = [
        triomail.prepare(b"Subject: no\r\n\r\nno\r\n", sender=SENDER, recipients=[f"n{i}@x.test"])
        for i in range(6)
    ]
    cp = pf.checkpoint()
    with trio.fail_after(5):  # the default retry policy would take 15 s and more
        async with triomail.open_pool(server, connections=3) as pool:
            async with pool.send_all(messages) as channel:
                results = [r async for r in channel]
    assert len(results) == 6
    for r in results:
        assert r.outcome is Outcome.PERMANENT and r.attempts == 1 and not r.mail_accepted
        assert r.error is not None and "certificate" in r.error
    await _until(lambda: _DISCONNECT.search(pf.log(cp)) is not None)
    await trio.sleep(0.2)  # the disconnect lines of any other session the pool opened
    sessions = [m["stats"] for m in _DISCONNECT.finditer(pf.log(cp))]
    assert 1 <= len(sessions) <= 3
    assert set(sessions) == {"ehlo=1 starttls=0/1 commands=1/2"}
    assert "client=" not in pf.log(cp)


@pytest.mark.parametrize("chunking", [None, False])
async def test_send_many_mixed_batch(postfix_store: PostfixInstance, chunking: bool | None) -> None:
    """R30/R32/R29: in a pipelined batch, a message over SIZE is refused locally (no MAIL
    for it) while its neighbours go through, UTF-8 addresses with SMTPUTF8 and an IDN
    domain as A-labels, just as send() would do them."""
    pf = postfix_store
    tag = "bdat" if chunking is None else "data"
    messages = [
        triomail.prepare(b"Subject: a\r\n\r\n.a\r\n", sender=SENDER, recipients=[f"{tag}-a@x.test"]),
        triomail.prepare(_sized(1_200_000), sender=SENDER, recipients=[f"{tag}-big@x.test"]),
        triomail.prepare(
            b"Subject: utf8\r\n\r\nu\r\n",
            sender=f"用户@{U_DOMAIN}",
            recipients=[f"收件人-{tag}@{U_DOMAIN}"],
        ),
        triomail.prepare(_sized(600_000), sender=SENDER, recipients=[f"{tag}-600k@x.test"]),
        triomail.prepare(
            b"Subject: idn\r\n\r\ni\r\n",
            sender=f"alice@{U_BOOKS}",
            recipients=[f"{tag}-idn@{U_DOMAIN}"],
        ),
        triomail.prepare(_sized(500_000), sender=SENDER, recipients=[f"{tag}-500k@x.test"]),
    ]  # fmt: skip
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        with trio.fail_after(20):
            results = await conn.send_many(messages, chunking=chunking)
        assert conn.is_usable
        signature = await _mark(conn)
    assert [r.outcome for r in results] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
    ], [str(r.reply) for r in results]
    big = results[1]
    assert big.reply is not None and (big.reply.code, big.reply.enhanced_code) == (552, "5.3.4")
    assert not big.mail_accepted
    counts = _commands(await _session(pf, cp, signature))
    assert (counts["mail"], counts["rcpt"]) == (5, 5)
    assert counts.get("bdat" if chunking is None else "data") == 5
    sent = [r for r in results if r.ok]
    stored = await _stored(pf, cp, sent)
    by_qid = {_queue_id(r): m for r, m in zip(results, messages, strict=True) if r.ok}
    for qid, (sender, rcpts, raw) in stored.items():
        m = by_qid[qid]
        assert (sender, rcpts) == (m.sender, set(m.recipients))
        assert as_sent(raw) == m.canonical.data
    assert messages[4].sender == f"alice@{A_BOOKS}"
    assert messages[4].recipients == (f"{tag}-idn@{A_DOMAIN}",)
    received = {rcpts.pop(): _received_header(raw) for _, rcpts, raw in stored.values()}
    assert " with UTF8SMTPS id " in received[f"收件人-{tag}@{U_DOMAIN}"]
    assert " with ESMTPS id " in received[f"{tag}-idn@{A_DOMAIN}"]


# -- DSN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        triomail.DSN(
            notify=("SUCCESS", "FAILURE", "DELAY"), ret="HDRS", envid="e+1 =x", orcpt=True
        ),
        triomail.DSN(notify=("NEVER",), ret="FULL", orcpt=True),
    ],
    ids=["success-failure-delay", "never"],
)
async def test_dsn_parameters_pass_postfix_syntax_checks(
    postfix_store: PostfixInstance, dsn: triomail.DSN
) -> None:
    """R33/R28: Postfix advertises DSN; RET, ENVID (xtext), NOTIFY and ORCPT (xtext for
    ``rfc822;``, RFC 6533 for ``utf-8;``) pass its syntax checks (it answers 501 5.5.4
    to a malformed one) for an ASCII and a UTF-8 envelope."""
    pf = postfix_store
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        assert conn.capabilities.dsn
        ascii_result = await conn.send(
            b"Subject: dsn\r\n\r\nx\r\n",
            sender=SENDER,
            recipients=["a+b=c@example.com", "plain@example.com"],
            dsn=dsn,
        )
        utf8_result = await conn.send(
            b"Subject: dsn utf8\r\n\r\nx\r\n",
            sender=f"用户@{U_DOMAIN}",
            recipients=[f"收件人@{U_DOMAIN}", f"x@{U_BOOKS}"],
            dsn=dsn,
        )
        signature = await _mark(conn)
    for result in (ascii_result, utf8_result):
        assert result.ok, [str(r.reply) for r in result.recipients]
    counts = _commands(await _session(pf, cp, signature))
    assert (counts["mail"], counts["rcpt"], counts["data"]) == (2, 4, 2)
    await _stored(pf, cp, [ascii_result, utf8_result])


@pytest.mark.parametrize(
    "dsn",
    [
        {"notify": ("NEVER", "SUCCESS")},
        {"notify": ("SUCCESS", "SOMETIMES")},
        {"envid": "caf\u00e9"},
    ],
    ids=["never-and-success", "unknown-keyword", "non-ascii-envid"],
)
async def test_invalid_dsn_refused_before_mail(
    postfix_store: PostfixInstance, dsn: dict[str, object]
) -> None:
    """R33/R13: DSN values RFC 3461 forbids are the caller's mistake: refused locally,
    before MAIL, like a malformed address."""
    pf = postfix_store
    cp = pf.checkpoint()
    async with _connect(pf) as conn:
        with pytest.raises(triomail.LocalProtocolError):
            await conn.send(
                b"Subject: bad dsn\r\n\r\nx\r\n",
                sender=SENDER,
                recipients=["bob@example.net"],
                dsn=triomail.DSN(**dsn),  # type: ignore[arg-type]
            )
        signature = await _mark(conn)
    counts = _commands(await _session(pf, cp, signature))
    assert "mail" not in counts and "rcpt" not in counts
