"""``--bounce-address``, a template's ``Return-Path:`` and ``--unsubscribe*`` (issue 14).

The bounce address is the envelope sender (``MAIL FROM``, per row with a template
expression: VERP) and never reaches the message (RFC 5321 §4.4); the unsubscribe options
add RFC 8058's fields per recipient. Checked on what the capture server receives.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from test_cli_send import send_async, server, write_rows

from triomail.testing import SMTPSink

TEMPLATE = """\
From: News <news@example.com>
To: {{email}}
Subject: Hello {{name}}

Hi {{name}}.
"""


async def campaign(tmp_path: Path, template: str, *options: str) -> tuple[int, list]:  # type: ignore[type-arg]
    rows = write_rows(
        tmp_path / "rows.csv", [(f"u{i}@example.org", f"n{i}", str(i)) for i in range(3)]
    )
    (tmp_path / "t.txt").write_text(template, encoding="utf-8")
    async with SMTPSink(tls=False) as sink:
        url = server(sink).replace("smtp://", "smtp+plain://")
        status = await send_async(rows, tmp_path / "t.txt", "--server", url, "--yes", *options)
        return status, sorted(sink.messages, key=lambda m: m.rcpt_to)


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


@pytest.mark.parametrize("how", ["option", "template"])
async def test_the_bounce_address_is_mail_from_per_row_and_not_in_the_message(
    tmp_path: Path, how: str
) -> None:
    verp = "bounces+{{number}}@example.com"
    if how == "option":
        status, messages = await campaign(tmp_path, TEMPLATE, "--bounce-address", verp)
    else:
        status, messages = await campaign(tmp_path, f"Return-Path: <{verp}>\n" + TEMPLATE)
    assert status == 0
    assert [m.mail_from for m in messages] == [f"bounces+{i}@example.com" for i in range(3)]
    for m in messages:
        assert b"return-path" not in m.data.lower()
        assert parsed(m.data)["From"] == "News <news@example.com>"


async def test_without_a_bounce_address_mail_from_is_the_from_address(tmp_path: Path) -> None:
    status, messages = await campaign(tmp_path, TEMPLATE)
    assert status == 0
    assert {m.mail_from for m in messages} == {"news@example.com"}


async def test_unsubscribe_adds_both_one_click_fields_per_recipient(tmp_path: Path) -> None:
    status, messages = await campaign(
        tmp_path,
        TEMPLATE,
        "--unsubscribe", "https://example.com/unsubscribe?u={{number}}",
        "--unsubscribe-mailto", "unsubscribe+{{number}}@example.com",
    )  # fmt: skip
    assert status == 0
    for i, m in enumerate(messages):
        msg = parsed(m.data)
        assert msg["List-Unsubscribe"] == (
            f"<https://example.com/unsubscribe?u={i}>, <mailto:unsubscribe+{i}@example.com>"
        )
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_a_mailto_alone_has_no_post_field(tmp_path: Path) -> None:
    status, messages = await campaign(
        tmp_path, TEMPLATE, "--unsubscribe-mailto", "mailto:unsubscribe@example.com"
    )
    assert status == 0
    msg = parsed(messages[0].data)
    assert msg["List-Unsubscribe"] == "<mailto:unsubscribe@example.com>"
    assert "List-Unsubscribe-Post" not in msg


@pytest.mark.parametrize(
    ("template", "options", "error"),
    [
        (TEMPLATE, ["--unsubscribe", "http://example.com/u"], "needs an https:// URL"),
        (
            "List-Unsubscribe: <https://example.com/u>\n" + TEMPLATE,
            ["--unsubscribe", "https://example.com/u"],
            "the template writes List-Unsubscribe itself, and the command line adds one",
        ),
        (
            "Return-Path: <b@example.com>\n" + TEMPLATE,
            ["--bounce-address", "c@example.com"],
            "the template writes Return-Path itself",
        ),
    ],
)
async def test_conflicts_and_bad_urls_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    template: str,
    options: list[str],
    error: str,
) -> None:
    status, messages = await campaign(tmp_path, template, *options)
    assert (status, messages) == (2, [])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("triomail send: error: ") and error in line


async def test_a_bad_bounce_address_skips_the_row_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, messages = await campaign(tmp_path, TEMPLATE, "--bounce-address", "{{name}}")
    assert status == 1
    assert messages == []
    assert (
        "rows.csv:2: skipped: Return-Path: invalid bounce address '<n0>'" in capsys.readouterr().err
    )
