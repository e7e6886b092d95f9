"""Messages every DKIM verifier in these tests must accept once signed (canonical CRLF bytes)."""

from __future__ import annotations

from triomail._core.data import canonicalize

HEAD = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Hello\r\n"
    b"Date: Fri, 04 Dec 2026 20:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://example.com/u/1>, <mailto:u@example.com?subject=1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
)
RECIPIENTS = ",\r\n ".join(f"user{i}@example.org" for i in range(40)).encode()

MESSAGES = {
    "plain": HEAD + b"\r\nHello Bob,\r\nbye.\r\n",
    "8bit": HEAD + "\r\nGrüße, ✉ and raw latin-1: ".encode() + b"\xe9\xe8\r\n",
    "long-folded-headers": (
        b"From: alice@example.com\r\nTo: "
        + RECIPIENTS
        + b"\r\nSubject: a very long subject that goes on\r\n\tand on, folded with a tab\r\n"
        + b"   and three spaces\r\nX-Other:   spaced\t\tout   \r\n\r\nbody\r\n"
    ),
    "utf8-headers": (
        "From: Jörg <jörg@bücher.example>\r\nTo: 用户@例子.测试\r\nSubject: Grüße ✉\r\n\r\nx\r\n"
    ).encode(),
    "dot-lines": HEAD + b"\r\n.\r\n..\r\n.leading dot\r\n.\r\nend\r\n",
    "empty-body": HEAD + b"\r\n",
    "headers-only": HEAD,
    "trailing-blank-lines": HEAD + b"\r\nbody\r\n\r\n\r\n\r\n",
    "whitespace": HEAD + b"\r\n  lead\t \r\nmid  \t dle\r\n \r\n\t\r\ntrail   \r\n",
    "large-1MB": HEAD + b"\r\n" + b"0123456789 abcdefghij\tklmnop  qrstuvwxyz\r\n" * 24_000,
}
assert all(canonicalize(m).data == m for m in MESSAGES.values())  # signer input is canonical
