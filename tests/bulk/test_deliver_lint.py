"""Lint before sending (issue 14): errors exit 2 with nothing sent, warnings print once
with the count of rows affected, ``--strict`` makes warnings errors; in ``--dry-run`` over
every row, in a real run over the first rows before the first message."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_cli_send import send, send_async, server, write_rows

from triomail._bulk.lint import BULK_ROWS
from triomail.testing import SMTPSink

BASE = "From: News <news@example.com>\nTo: {{email}}\nSubject: Hi {{name}}\n"
TEXT = "\nHello {{name}}.\n"


def files(tmp_path: Path, template: str, rows: int = 3) -> tuple[Path, Path]:
    path = write_rows(
        tmp_path / "rows.csv", [(f"u{i}@example.org", f"n{i}", str(i)) for i in range(rows)]
    )
    (tmp_path / "t.txt").write_text(template, encoding="utf-8")
    return path, tmp_path / "t.txt"


def lint_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lint ")]


@pytest.mark.parametrize(
    ("extra", "finding"),
    [
        (
            "List-Unsubscribe: <mailto:u@example.com>\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n",
            "lint error: List-Unsubscribe-Post without an https URI in List-Unsubscribe (RFC 8058) [3 row(s)]",
        ),
        (
            "List-Unsubscribe: <https://example.com/u>\nList-Unsubscribe-Post: yes\n",
            "lint error: List-Unsubscribe-Post must be exactly List-Unsubscribe=One-Click (RFC 8058) [3 row(s)]",
        ),
        (
            "List-Id: =?utf-8?q?News?= <news.example.com>\n",
            "lint error: an encoded word in list-id (RFC 2047 §5 allows none there) [3 row(s)]",
        ),
    ],
)
def test_an_error_stops_a_dry_run_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, finding: str
) -> None:
    rows, template = files(tmp_path, BASE + extra + TEXT)
    assert send(rows, template, "--dry-run", "--show", "0") == 2
    assert lint_lines(capsys.readouterr().err) == [finding]


def test_warnings_print_once_with_their_count_and_strict_makes_them_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html = BASE + "Content-Type: text/html\n\n<p>Hello {{name}}</p>\n"
    rows, template = files(tmp_path, html, rows=BULK_ROWS + 1)
    assert send(rows, template, "--dry-run", "--show", "0") == 0
    assert lint_lines(capsys.readouterr().err) == [
        f"lint warning: no List-Unsubscribe header in a bulk campaign (use --unsubscribe URL) "
        f"[{BULK_ROWS + 1} row(s)]",
        f"lint warning: no text/plain part (HTML only) [{BULK_ROWS + 1} row(s)]",
    ]
    assert send(rows, template, "--dry-run", "--show", "0", "--strict") == 2
    assert all("lint error (--strict)" in x for x in lint_lines(capsys.readouterr().err))
    options = ["--unsubscribe", "https://example.com/u?n={{name}}"]
    rows, template = files(tmp_path, BASE + TEXT, rows=BULK_ROWS + 1)
    assert send(rows, template, "--dry-run", "--show", "0", "--strict", *options) == 0
    assert lint_lines(capsys.readouterr().err) == []


def test_an_unaligned_dkim_domain_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ed.pem").write_bytes(key)
    rows, template = files(tmp_path, BASE + TEXT)
    dkim = ["--dkim-key", tmp_path / "ed.pem", "--dkim-selector", "s"]
    assert (
        send(rows, template, "--dry-run", "--show", "0", *dkim, "--dkim-domain", "mail.example.com")
        == 0
    )
    assert lint_lines(capsys.readouterr().err) == []  # a subdomain is aligned (relaxed)
    assert (
        send(rows, template, "--dry-run", "--show", "0", *dkim, "--dkim-domain", "other.org") == 0
    )
    assert lint_lines(capsys.readouterr().err) == [
        "lint warning: DKIM d=other.org is not aligned with the From domain example.com "
        "(DMARC needs one of them to be the other or its parent) [3 row(s)]"
    ]


async def test_a_real_run_lints_before_the_first_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    free = BASE.replace("news@example.com", "someone@gmail.com")
    rows, template = files(
        tmp_path, free + "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n" + TEXT
    )
    async with SMTPSink(tls=False) as sink:
        url = server(sink).replace("smtp://", "smtp+plain://")
        status = await send_async(rows, template, "--server", url, "--yes")
        assert (status, sink.messages) == (2, [])
        err = capsys.readouterr().err
        assert lint_lines(err) == [
            "lint error: List-Unsubscribe-Post without an https URI in List-Unsubscribe "
            "(RFC 8058) [3 row(s) of the first 3]",
            "lint warning: From is on gmail.com, sent through 127.0.0.1: gmail.com's DMARC "
            "policy makes receivers refuse it; send from your own domain [3 row(s) of the first 3]",
        ]
        assert (
            err.splitlines()[-1]
            == "triomail send: error: lint found errors (above); nothing was sent"
        )
        (tmp_path / "t.txt").write_text(free + TEXT)
        assert await send_async(rows, template, "--server", url, "--yes") == 0
        assert len(sink.messages) == 3  # warnings alone do not stop it


async def test_the_summary_says_what_lint_checked_before_sending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, template = files(tmp_path, BASE + TEXT)
    async with SMTPSink(tls=False) as sink:
        url = server(sink).replace("smtp://", "smtp+plain://")
        assert await send_async(rows, template, "--server", url, "--yes") == 0
    summary = capsys.readouterr().out.splitlines()
    assert [line.split() for line in summary if line.startswith("lint")] == [
        ["lint", "no", "problems", "in", "the", "first", "3", "message(s)"]
    ]
