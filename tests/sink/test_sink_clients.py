"""Real third-party clients against the capture server; every message must arrive
byte-identical: CPython smtplib, aiosmtplib and swaks."""

from __future__ import annotations

import asyncio
import io
import shutil
import smtplib
from email.generator import BytesGenerator
from email.message import EmailMessage
from functools import partial
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trio
import trustme

from triomail.testing import Fault, SMTPSink

# Lines that start with dots (stuffed by the client, un-stuffed by the sink), a lone
# ".", and a line that looks like a command.
BODY = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: third-party client\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"QUIT\r\n"
    b"last line\r\n"
)
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
USER, PASSWORD = "alice", "s3cret pass"  # smtplib encodes AUTH as ASCII
UTF8_USER, UTF8_PASSWORD = "j\u00fcrgen", "p\u00e4ss \u2709"


# --- CPython smtplib (run in a worker thread) --------------------------------------------


async def test_smtplib_plain_sendmail() -> None:
    async with SMTPSink(tls=False) as sink:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                return client.sendmail("alice@example.org", ["bob@example.net"], BODY)

        assert await trio.to_thread.run_sync(send) == {}
        [message] = sink.messages
        assert message.data == BODY
        assert (message.mail_from, message.rcpt_to) == ("alice@example.org", ["bob@example.net"])
        assert not message.tls
        assert message.subject == "third-party client"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_smtplib_starttls_and_auth(mechanism: str) -> None:
    async with SMTPSink(auth={USER: PASSWORD}, auth_mechanisms=[mechanism]) as sink:
        context = sink.client_ssl_context()

        def send() -> None:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                client.ehlo()
                assert not client.has_extn("auth")  # R9: no AUTH before TLS
                client.starttls(context=context)
                client.ehlo()
                assert client.esmtp_features["auth"].split() == [mechanism]
                client.login(USER, PASSWORD)
                client.sendmail("alice@example.org", ["bob@example.net"], BODY)

        await trio.to_thread.run_sync(send)
        [message] = sink.messages
        assert message.data == BODY
        assert message.tls
        assert message.authenticated_as == USER


async def test_smtplib_wrong_password_is_refused() -> None:
    async with SMTPSink(auth={USER: PASSWORD}) as sink:
        context = sink.client_ssl_context()

        def login() -> None:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                client.starttls(context=context)
                client.login(USER, "wrong")

        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            await trio.to_thread.run_sync(login)
        assert info.value.smtp_code == 535


async def test_smtplib_smtputf8_send_message() -> None:
    msg = EmailMessage()
    msg["From"] = "J\u00f6rg <j\u00f6rg@b\u00fccher.example>"
    msg["To"] = "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a"
    msg["Subject"] = "Gr\u00fc\u00dfe \u2709"
    msg.set_content("Unicode body: \u00e4\u00f6\u00fc \u2709\n.dot line\n")
    # What smtplib.send_message transmits for an international message (3.11 source).
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=msg.policy.clone(utf8=True)).flatten(msg, linesep="\r\n")
    expected = buffer.getvalue()

    async with SMTPSink() as sink:
        context = sink.client_ssl_context()

        def send() -> None:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                client.starttls(context=context)
                client.send_message(msg)

        await trio.to_thread.run_sync(send)
        [message] = sink.messages
        assert message.data == expected
        assert message.mail_from == "j\u00f6rg@b\u00fccher.example"
        assert message.rcpt_to == ["\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a"]
        assert "SMTPUTF8" in message.mail_options
        assert message.message["Subject"] == "Gr\u00fc\u00dfe \u2709"


async def test_smtplib_sees_injected_recipient_fault() -> None:
    fault = Fault("RCPT", code=550, text="5.1.1 no such user", recipient="carol@example.net")
    async with SMTPSink(tls=False, faults=[fault]) as sink:

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                return client.sendmail(
                    "alice@example.org", ["bob@example.net", "carol@example.net"], BODY
                )

        refused = await trio.to_thread.run_sync(send)
        assert refused == {"carol@example.net": (550, b"5.1.1 no such user")}
        assert sink.messages[0].rcpt_to == ["bob@example.net"]


# --- aiosmtplib (its own asyncio loop in a worker thread) --------------------------------


def _aiosmtplib_send(client_options: dict[str, Any], **send_options: Any) -> None:
    """Send BODY with aiosmtplib on a fresh asyncio loop (call in a worker thread)."""

    async def main() -> None:
        async with aiosmtplib.SMTP(timeout=10, **client_options) as client:
            await client.sendmail("alice@example.org", ["bob@example.net"], BODY, **send_options)

    asyncio.run(main())


async def test_aiosmtplib_starttls_and_auth() -> None:
    async with SMTPSink(auth={UTF8_USER: UTF8_PASSWORD}) as sink:
        options = {
            "hostname": sink.host,
            "port": sink.port,
            "start_tls": True,
            "tls_context": sink.client_ssl_context(),
            "username": UTF8_USER,
            "password": UTF8_PASSWORD,
        }
        await trio.to_thread.run_sync(_aiosmtplib_send, options)
        [message] = sink.messages
        assert message.data == BODY
        assert message.tls
        assert message.authenticated_as == UTF8_USER


async def test_aiosmtplib_implicit_tls() -> None:
    async with SMTPSink(implicit_tls=True) as sink:
        options = {
            "hostname": sink.host,
            "port": sink.port,
            "use_tls": True,
            "tls_context": sink.client_ssl_context(),
        }
        await trio.to_thread.run_sync(_aiosmtplib_send, options)
        [message] = sink.messages
        assert message.data == BODY
        assert message.tls


async def test_aiosmtplib_plain_with_dsn_options() -> None:
    async with SMTPSink(tls=False) as sink:
        options = {"hostname": sink.host, "port": sink.port, "start_tls": False}
        send = partial(
            _aiosmtplib_send, options, mail_options=["RET=HDRS"], rcpt_options=["NOTIFY=FAILURE"]
        )
        await trio.to_thread.run_sync(send)
        [message] = sink.messages
        assert message.data == BODY
        assert message.mail_options == [f"size={len(BODY)}", "RET=HDRS"]
        assert message.rcpt_options == [["NOTIFY=FAILURE"]]


# --- swaks (the Debian package; .ci/run installs it) ------------------------------------

needs_swaks = pytest.mark.skipif(
    not Path(SWAKS).exists(), reason="swaks is not installed (Debian package `swaks`)"
)

# swaks appends CRLF "." CRLF after the data, so the file has no final line end.
SWAKS_FILE = BODY[: -len(b"\r\n")]


async def _swaks(sink: SMTPSink, tmp_path: Path, *args: str) -> str:
    data = tmp_path / "message.eml"
    data.write_bytes(SWAKS_FILE)
    command = [
        SWAKS, "--server", f"{sink.host}:{sink.port}", "--from", "alice@example.org",
        "--to", "bob@example.net", "--data", f"@{data}", "--timeout", "10", *args,
    ]  # fmt: skip
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output
    return output


@needs_swaks
async def test_swaks_pipelining(tmp_path: Path) -> None:
    async with SMTPSink(tls=False) as sink:
        await _swaks(sink, tmp_path, "--pipeline")
        [message] = sink.messages
        assert message.data == BODY


@needs_swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_starttls_verified_and_auth(tmp_path: Path, mechanism: str) -> None:
    async with SMTPSink(auth={"swaks": "pw"}) as sink:
        assert sink.ca is not None
        ca_file = tmp_path / "ca.pem"
        sink.ca.cert_pem.write_to_path(str(ca_file))
        output = await _swaks(
            sink, tmp_path, "--tls", "--tls-verify", "--tls-ca-path", str(ca_file),
            "--auth", mechanism, "--auth-user", "swaks", "--auth-password", "pw",
        )  # fmt: skip
        assert "235 2.7.0 Authentication successful" in output
        [message] = sink.messages
        assert message.data == BODY
        assert (message.tls, message.authenticated_as) == (True, "swaks")


@needs_swaks
async def test_swaks_tls_on_connect(tmp_path: Path) -> None:
    async with SMTPSink(implicit_tls=True) as sink:
        assert sink.ca is not None
        ca_file = tmp_path / "ca.pem"
        sink.ca.cert_pem.write_to_path(str(ca_file))
        await _swaks(
            sink, tmp_path, "--tls-on-connect", "--tls-verify", "--tls-ca-path", str(ca_file)
        )
        [message] = sink.messages
        assert message.data == BODY
        assert message.tls


@needs_swaks
async def test_swaks_rejects_wrong_certificate(tmp_path: Path) -> None:
    """The sink's certificate is only trusted through its own CA."""
    async with SMTPSink() as sink:
        data = tmp_path / "message.eml"
        data.write_bytes(SWAKS_FILE)
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        result = await trio.run_process(
            [SWAKS, "--server", f"{sink.host}:{sink.port}", "--to", "bob@example.net",
             "--data", f"@{data}", "--tls", "--tls-verify", "--tls-ca-path", str(other_ca)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert result.returncode != 0
        assert sink.messages == []
