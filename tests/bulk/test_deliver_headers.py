"""Structured header fields are never RFC 2047 encoded (issue 14): template and EmailMessage.

A ``List-Unsubscribe`` URL with a long per-recipient token, a long ``Message-ID`` or a
``References`` list are written verbatim, folded only at white space or after a comma
between items, each line within 998 octets; a value that cannot be written so is refused
with the header's name. Checked on what the capture server receives.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from test_cli_send import send

import triomail
from triomail._bulk.template.compile import compile_template
from triomail._bulk.template.rendered import RowError, TemplateError
from triomail._core.structured import fold_structured
from triomail.testing import SMTPSink

TOKEN = "t" * 90
URL = f"https://example.com/unsubscribe?list=monthly&token={TOKEN}"
TEMPLATE = """\
From: News <news@example.com>
To: {{email}}
Subject: Monthly
List-Unsubscribe: <https://example.com/unsubscribe?list=monthly&token={{token}}>, <mailto:unsub@example.com?subject={{token}}>
List-Unsubscribe-Post: List-Unsubscribe=One-Click
References: <first-message-with-a-long-identifier-0123456789@example.com> <second-message-with-a-long-identifier-0123456789@example.com>
Message-ID: <{{token}}.campaign-with-a-long-name@example.com>

Hello.
"""


def _unfold(data: bytes, name: str) -> tuple[list[bytes], str]:
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower().encode() + b":"):
            field = [line]
            for more in lines[i + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                field.append(more)
            value = b" ".join(p.strip() for p in field)[len(name) + 1 :].strip()
            return field, value.decode("ascii")
    raise AssertionError(f"no {name} in {head!r}")


def _check_verbatim(data: bytes) -> None:
    assert b"=?" not in data.split(b"\r\n\r\n", 1)[0]
    field, value = _unfold(data, "List-Unsubscribe")
    assert value == f"<{URL}>, <mailto:unsub@example.com?subject={TOKEN}>"
    assert all(len(line) <= 998 for line in field)
    _, mid = _unfold(data, "Message-ID")
    assert mid == f"<{TOKEN}.campaign-with-a-long-name@example.com>"
    refs, value = _unfold(data, "References")
    assert len(refs) == 2  # folded at the white space between the two ids
    assert value.split() == [
        "<first-message-with-a-long-identifier-0123456789@example.com>",
        "<second-message-with-a-long-identifier-0123456789@example.com>",
    ]


def test_the_template_writes_structured_fields_verbatim(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TEMPLATE)
    rendered = compile_template(tmp_path / "t.txt").render(
        {"email": "a@example.org", "token": TOKEN}, message_id="<x@example.com>"
    )
    _check_verbatim(rendered.data)
    parsed = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_the_sink_receives_them_verbatim(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TEMPLATE)
    (tmp_path / "rows.csv").write_text(f"email,token\na@example.org,{TOKEN}\n")
    out = tmp_path / "out"
    assert send(tmp_path / "rows.csv", tmp_path / "t.txt", "--sink", out, "--yes") == 0
    (eml,) = out.glob("*.eml")
    _check_verbatim(eml.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def test_a_value_with_no_fold_point_past_998_octets_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TEMPLATE)
    template = compile_template(tmp_path / "t.txt")
    with pytest.raises(RowError, match=r"List-Unsubscribe: .*998"):
        template.render({"email": "a@example.org", "token": "t" * 1000}, message_id="<x@y>")


def test_non_ascii_in_a_structured_field_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TEMPLATE)
    template = compile_template(tmp_path / "t.txt")
    with pytest.raises(RowError, match="List-Unsubscribe: non-ASCII"):
        template.render({"email": "a@example.org", "token": "café"}, message_id="<x@y>")
    (tmp_path / "c.txt").write_text(
        "From: a@example.com\nTo: b@example.com\nList-Id: Café <c.example.com>\n\nx\n"
    )
    with pytest.raises(TemplateError, match="List-Id"):
        compile_template(tmp_path / "c.txt")


def test_a_bad_row_names_the_header_and_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t.txt").write_text(TEMPLATE)
    (tmp_path / "rows.csv").write_text(
        f"email,token\na@example.org,{TOKEN}\nb@example.org,{'t' * 1000}\n"
    )
    status = send(tmp_path / "rows.csv", tmp_path / "t.txt", "--sink", tmp_path / "out", "--yes")
    assert status == 1
    err = capsys.readouterr().err
    assert "rows.csv:3: skipped: header List-Unsubscribe:" in err, err


def test_folding_is_at_white_space_or_after_a_top_level_comma() -> None:
    value = "<https://example.com/a,b?c=1>,<mailto:x@example.com>," + "<" + "y" * 80 + ">"
    folded = fold_structured("List-Unsubscribe", value)
    assert folded.split("\r\n")[:2] == [
        "List-Unsubscribe: <https://example.com/a,b?c=1>,<mailto:x@example.com>,",
        " <" + "y" * 80 + ">",
    ]


def newsletter() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["To"] = "a@example.org"
    msg["Subject"] = "Monthly"
    msg["List-Unsubscribe"] = f"<{URL}>, <mailto:unsub@example.com?subject={TOKEN}>"
    msg["Message-ID"] = f"<{TOKEN}.campaign-with-a-long-name@example.com>"
    msg["References"] = (
        "<first-message-with-a-long-identifier-0123456789@example.com> "
        "<second-message-with-a-long-identifier-0123456789@example.com>"
    )
    msg.set_content("Hello.\n")
    msg.add_attachment(
        b"x" * 10, maintype="application", subtype="octet-stream", cid=f"<{TOKEN}@example.com>"
    )
    return msg


async def test_an_email_message_keeps_them_verbatim_on_the_wire() -> None:
    async with SMTPSink(tls=False) as sink:
        async with triomail.connect(sink.host, sink.port, tls="none") as conn:
            result = await conn.send(newsletter())
        assert result.ok
        (captured,) = sink.messages
    _check_verbatim(captured.data)
    assert f"Content-ID: <{TOKEN}@example.com>".encode() in captured.data


def test_an_email_message_with_non_ascii_there_is_refused() -> None:
    msg = newsletter()
    del msg["List-Unsubscribe"]
    msg["List-Unsubscribe"] = "<https://example.com/café>"
    with pytest.raises(triomail.LocalProtocolError, match="List-Unsubscribe"):
        triomail.prepare(msg)
