"""Lint findings, one check at a time, on messages built to pass or fail each."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from triomail._web.lint import CLIP_SIZE, MAX_LINE, Finding, KeyFolder, lint
from triomail._web.mail import parse

GOOD_HEADERS = (
    "From: news@example.com\r\nTo: you@example.net\r\nSubject: Fine\r\n"
    "Message-ID: <1@example.com>\r\n"
    "List-Unsubscribe: <mailto:u@example.com>, <https://example.com/u/1>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
)
ALTERNATIVE = (
    "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=A\r\n\r\n"
    "--A\r\nContent-Type: text/plain\r\n\r\ntext\r\n"
    "--A\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--A--\r\n"
)


def findings(data: bytes, keys: Path | None = None) -> dict[str, Finding]:
    return {f.code: f for f in lint(data, parse(data), keys)}


def test_a_good_message_passes_every_check() -> None:
    result = findings((GOOD_HEADERS + ALTERNATIVE).encode())
    assert [code for code, f in result.items() if f.ok is False] == []
    assert result["unsubscribe"].ok is True
    assert result["unsubscribe"].text.endswith("not DKIM-signed here")
    assert result["dkim"].ok is None and result["dkim"].text == "not signed"
    assert result["size"].ok is None


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        ("", "no List-Unsubscribe header"),
        ("List-Unsubscribe: https://example.com/u\r\n", "no <URI>"),
        ("List-Unsubscribe: <mailto:u@example.com>\r\n", "no https URI"),
        ("List-Unsubscribe: <https://example.com/u>\r\n", "is missing"),
        (
            "List-Unsubscribe: <https://example.com/u>\r\nList-Unsubscribe-Post: One-Click\r\n",
            "is 'One-Click'",
        ),
    ],
)
def test_unsubscribe_must_be_one_click(headers: str, complaint: str) -> None:
    data = f"From: a@example.com\r\n{headers}\r\nbody\r\n".encode()
    finding = findings(data)["unsubscribe"]
    assert finding.ok is False
    assert complaint in finding.text


def test_encoded_words_in_structured_headers() -> None:
    data = (
        GOOD_HEADERS.replace("<1@example.com>", "=?utf-8?q?=3C1=40example=2Ecom=3E?=")
        + "Subject: =?utf-8?q?fine_here?=\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        "--B\r\nContent-Type: text/plain\r\n\r\nx\r\n"
        "--B\r\nContent-Type: image/png\r\nContent-ID: =?utf-8?b?eA==?=\r\n\r\nx\r\n--B--\r\n"
    ).encode()
    finding = findings(data)["encoded-word"]
    assert finding.ok is False
    assert "['Content-ID', 'Message-ID']" in finding.text


def test_long_lines_are_counted() -> None:
    fits = GOOD_HEADERS + "\r\n" + "x" * MAX_LINE + "\r\n"
    assert findings(fits.encode())["long-line"].ok is True
    over = GOOD_HEADERS + "\r\nshort\r\n" + "x" * (MAX_LINE + 1) + "\r\n" + "y" * 2000 + "\r\n"
    finding = findings(over.encode())["long-line"]
    assert finding.ok is False
    assert finding.text.startswith("2 line(s) over 998 octets") and finding.text.endswith("line 9")


def test_html_without_a_text_part() -> None:
    html = GOOD_HEADERS + "Content-Type: text/html\r\n\r\n<p>only html</p>\r\n"
    assert findings(html.encode())["text-part"].text == "HTML without a text/plain alternative"


def test_size_over_the_clip_limit() -> None:
    data = (GOOD_HEADERS + "\r\n" + ("x" * 70 + "\r\n") * (CLIP_SIZE // 72 + 10)).encode()
    assert findings(data)["size"].ok is False


def key_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def signed(private: bytes) -> bytes:
    import dkim  # type: ignore[import-untyped]

    data = (GOOD_HEADERS + ALTERNATIVE).encode()
    headers = [*dkim.DKIM.SHOULD, b"list-unsubscribe-post"]
    signature: bytes = dkim.sign(data, b"s1", b"example.com", private, include_headers=headers)
    return signature + data


def test_one_click_headers_must_be_signed_when_signed() -> None:
    private, _ = key_pair()
    assert findings(signed(private))["unsubscribe"].text == (
        "one-click unsubscribe, DKIM-covered (RFC 8058)"
    )
    import dkim  # type: ignore[import-untyped]

    data = (GOOD_HEADERS + ALTERNATIVE).encode()
    # dkimpy's default header list has List-Unsubscribe but not List-Unsubscribe-Post.
    default = dkim.sign(data, b"s1", b"example.com", private)
    finding = findings(default + data)["unsubscribe"]
    assert finding.ok is False and "(RFC 8058 §4)" in finding.text


def test_dkim_verified_with_a_key_from_the_folder(tmp_path: Path) -> None:
    private, public = key_pair()
    data = signed(private)
    assert findings(data)["dkim"].text == "signed; unverifiable (no --dkim-keys folder)"
    assert findings(data, tmp_path)["dkim"].text.startswith("unverifiable: no key file for")
    (tmp_path / "s1._domainkey.example.com.txt").write_bytes(public)  # PEM form
    assert findings(data, tmp_path)["dkim"] == Finding("dkim", True, "1 signature(s) verified")

    tampered = data.replace(b"text\r\n", b"TEXT\r\n")
    assert findings(tampered, tmp_path)["dkim"].ok is False
    _, other = key_pair()
    body = b"".join(line for line in other.splitlines() if not line.startswith(b"-----"))
    (tmp_path / "s1._domainkey.example.com.txt").write_bytes(b"v=DKIM1; k=rsa; p=" + body)
    assert findings(data, tmp_path)["dkim"].ok is False  # TXT form, the wrong key


def test_key_names_cannot_leave_the_folder(tmp_path: Path) -> None:
    folder = KeyFolder(tmp_path / "keys")
    (tmp_path / "keys").mkdir()
    (tmp_path / "secret.txt").write_text("v=DKIM1; p=x")
    assert folder(b"../secret.") is None
    assert folder(b"x/../../secret.") is None
