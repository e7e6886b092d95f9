"""``triomail send --dkim-key``: every message of a campaign verifies (issue 14).

A 1,000-row campaign of text + HTML + attachment messages with UTF-8 text, a dot line and
a long folded Subject, signed with an encrypted RSA key and an Ed25519 key at once, in
the render process and inline, over DATA and BDAT. What the capture server receives is
verified by dkimpy (every message, both signatures) and by OpenDKIM (a sample): neither
is our code. The one-click fields are in the signed set; the bounce address is the
envelope sender and not in the message.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import dkim
import pytest
import trio
from conftest import DOMAIN, dnsfunc_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from test_dkim_opendkim import needs_opendkim, opendkim_verdicts

from triomail._cli import main
from triomail._core.dkim import DKIMSigner
from triomail.testing import SMTPSink

ROWS = 1000
TEMPLATE = """\
From: Café News <news@example.com>
To: {{name}} <{{email}}>
Subject: Grüße {{name}}, this subject is long enough to be folded over more than one line
Content-Type: text/markdown
ATTACHMENT: report.pdf

# Hallo {{name}}

Café **{{id}}**, a line with a dot follows:

.
..two dots
"""


def _pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, path: Path, secret: bytes | None
) -> Path:
    encryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


def campaign(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "report.pdf").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    rows = "".join(f"r{i}@example.org,Reader {i},{i}\n" for i in range(ROWS))
    (tmp_path / "rows.csv").write_text("email,name,id\n" + rows, encoding="utf-8")
    return tmp_path / "rows.csv", tmp_path / "t.txt"


@pytest.mark.parametrize(
    ("render", "chunking"), [("process", True), ("inline", False), ("auto", True)]
)
async def test_every_message_of_a_signed_campaign_verifies(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    render: str,
    chunking: bool,
) -> None:
    rows, template = campaign(tmp_path)
    rsa_pem = _pem(rsa_key, tmp_path / "rsa.pem", b"correct horse")
    ed_pem = _pem(ed_key, tmp_path / "ed.pem", None)
    monkeypatch.setenv("TRIOMAIL_DKIM_PASSPHRASE", "correct horse")
    async with SMTPSink(tls=False, hide_extensions=[] if chunking else ["CHUNKING"]) as sink:
        argv = [
            "send", str(rows), str(template), "--server", f"smtp+plain://{sink.host}:{sink.port}",
            "--yes", "--journal", str(tmp_path / "j.sqlite3"), "--render", render,
            "--dkim-key", str(rsa_pem), "--dkim-selector", "rsa2048",
            "--dkim-key", str(ed_pem), "--dkim-selector", "ed",
            "--unsubscribe", "https://example.com/unsubscribe?id={{id}}",
            "--bounce-address", "bounces+{{id}}@example.com",
        ]  # fmt: skip
        status = await trio.to_thread.run_sync(main, argv)
        messages = list(sink.messages)
    assert status == 0
    assert len(messages) == ROWS
    assert {m.transfer for m in messages} == {"BDAT" if chunking else "DATA"}
    dnsfunc = dnsfunc_for(DKIMSigner(DOMAIN, "rsa2048", rsa_key), DKIMSigner(DOMAIN, "ed", ed_key))
    for m in messages:
        verifier = dkim.DKIM(m.data)
        assert verifier.verify(idx=0, dnsfunc=dnsfunc), m.data[:400]
        assert verifier.verify(idx=1, dnsfunc=dnsfunc)
        parsed = email.message_from_bytes(m.data, policy=email.policy.default)
        row = parsed["List-Unsubscribe"].removeprefix("<https://example.com/unsubscribe?id=")
        assert m.mail_from == f"bounces+{row.rstrip('>')}@example.com"
        assert "Return-Path" not in parsed
        signed = parsed.get_all("DKIM-Signature")[0].replace("\r\n", "").replace("\t", "")
        assert "List-Unsubscribe:List-Unsubscribe-Post" in signed.replace(" ", "")
        assert parsed.get_content_type() == "multipart/related"
    assert b"\r\n..two dots\r\n" in messages[0].data  # dot-unstuffed as sent


@needs_opendkim
async def test_opendkim_verifies_a_sample(
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    rows, template = campaign(tmp_path)
    out = tmp_path / "out"
    argv = [
        "send", str(rows), str(template), "--dry-run", "--sink", str(out), "--limit", "5",
        "--dkim-key", str(_pem(rsa_key, tmp_path / "rsa.pem", None)), "--dkim-selector", "rsa2048",
        "--dkim-key", str(_pem(ed_key, tmp_path / "ed.pem", None)), "--dkim-selector", "ed",
    ]  # fmt: skip
    assert main(argv) == 0
    signers = (DKIMSigner(DOMAIN, "rsa2048", rsa_key), DKIMSigner(DOMAIN, "ed", ed_key))
    files = sorted(out.glob("*.eml"))
    assert len(files) == 5
    for path in files:
        assert opendkim_verdicts(tmp_path, path.read_bytes(), *signers) == ["pass", "pass"]


def test_a_wrong_passphrase_or_a_missing_selector_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    rows, template = campaign(tmp_path)
    pem = str(_pem(rsa_key, tmp_path / "rsa.pem", b"right"))
    monkeypatch.setenv("TRIOMAIL_DKIM_PASSPHRASE", "wrong")
    base = ["send", str(rows), str(template), "--dry-run", "--dkim-key", pem]
    assert main([*base, "--dkim-selector", "s"]) == 2
    assert main(base) == 2
    monkeypatch.delenv("TRIOMAIL_DKIM_PASSPHRASE")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main([*base, "--dkim-selector", "s"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"triomail send: error: --dkim-key {pem}: ")
    assert (
        err[1]
        == "triomail send: error: give one --dkim-selector per --dkim-key (1 key(s), 0 selector(s))"
    )
    assert err[2] == (
        "triomail send: error: no DKIM key passphrase: set TRIOMAIL_DKIM_PASSPHRASE "
        "(no terminal to prompt on)"
    )
