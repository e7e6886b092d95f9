"""The compiled template: mailmerge-compatible output, built once and rendered per row."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triomail._bulk.template.addresses import unescape
from triomail._bulk.template.compile import CompiledTemplate, compile_template
from triomail._bulk.template.headers import encode_unstructured
from triomail._bulk.template.markdown import markdown_to_html
from triomail._bulk.template.rendered import Rendered, RowError, TemplateError

MID = "<test.1@example.com>"


def make(tmp_path: Path, text: str, name: str = "t.txt") -> CompiledTemplate:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return compile_template(path)


def parse(rendered: Rendered) -> EmailMessage:
    msg = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def wire_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    body = data[:-2]
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")
    return body.split(b"\r\n")


def check_wire(rendered: Rendered) -> None:
    """Canonical CRLF, 7-bit unless SMTPUTF8, every line within 998 octets (R16, R18, R19)."""
    lines = wire_lines(rendered.data)
    assert max(len(line) for line in lines) <= 998
    if not rendered.smtputf8:
        assert rendered.data.isascii()


def decoded(value: str) -> str:
    return str(make_header(decode_header(value)))


PLAIN = """\
TO: {{email}}
SUBJECT: Hello {{name}}
FROM: My Self <myself@example.com>

Hi, {{name}},

Your number is {{number}}.
"""


def test_plain_template(tmp_path: Path) -> None:
    t = make(tmp_path, PLAIN)
    assert t.mode == "compiled"
    r = t.render({"email": "bob@example.com", "name": "Bob", "number": "17"}, message_id=MID)
    check_wire(r)
    assert r.sender == "myself@example.com"
    assert r.recipients == ("bob@example.com",)
    assert r.message_id == MID
    msg = parse(r)
    assert msg["To"] == "bob@example.com"
    assert msg["Subject"] == "Hello Bob"
    assert msg["Message-ID"] == MID
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"]
    assert msg.get_content_type() == "text/plain"
    # Jinja2 drops the template's single trailing newline, as mailmerge's output does.
    assert msg.get_content() == "Hi, Bob,\r\n\r\nYour number is 17.\r\n"


def test_non_ascii_subject_and_name_are_rfc2047(tmp_path: Path) -> None:
    t = make(
        tmp_path,
        "To: {{name}} <{{email}}>\nSubject: Relevé — {{name}}, ça va ?\n"
        "From: Ünïcode Sender <s@example.com>\n\nBody {{name}}\n",
    )
    r = t.render({"email": "zoe@example.org", "name": "Zoë Lefèvre"}, message_id=MID)
    check_wire(r)
    assert not r.smtputf8
    head = r.data.split(b"\r\n\r\n")[0].decode("ascii")
    assert "=?utf-8?b?" in head
    msg = parse(r)
    assert str(msg["Subject"]) == "Relevé — Zoë Lefèvre, ça va ?"
    assert msg["To"].addresses[0].display_name == "Zoë Lefèvre"
    assert msg["To"].addresses[0].addr_spec == "zoe@example.org"
    assert msg["From"].addresses[0].display_name == "Ünïcode Sender"
    assert "Zoë Lefèvre" in msg.get_content()
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"


@given(st.text(min_size=1, max_size=300).filter(lambda s: "\r" not in s and "\n" not in s))
@settings(max_examples=200, deadline=None)
def test_unstructured_encoding_round_trips(value: str) -> None:
    value = value.strip()
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return
    line = encode_unstructured("Subject", value)
    assert line.isascii()
    assert all(len(part) <= 998 for part in line.split("\r\n"))
    assert line.endswith("\r\n")
    folded = line[len("Subject:") : -2]
    unfolded = folded.replace("\r\n", "")
    # A folded line never starts with CRLF directly after the colon.
    assert " ".join(decoded(unfolded).split()) == " ".join(value.split())


def test_long_subject_folds_within_78(tmp_path: Path) -> None:
    t = make(tmp_path, "To: a@example.com\nFrom: b@example.com\nSubject: {{s}}\n\nx\n")
    subject = " ".join(["word"] * 60) + " " + "ü" * 100
    r = t.render({"s": subject}, message_id=MID)
    check_wire(r)
    head = r.data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert str(parse(r)["Subject"]) == subject


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Bob\r\nBcc: evil@example.net"),
        ("name", "Bob\nBcc: evil@example.net"),
        ("name", "Bob\rX: y"),
        ("email", "bob@example.com\r\nBcc: evil@example.net"),
        ("name", "nul\x00byte"),
    ],
)
def test_header_injection_is_refused_for_the_row(tmp_path: Path, field: str, value: str) -> None:
    """R15: CR/LF (or another control) from a field into a header refuses that row."""
    t = make(tmp_path, "To: {{name}} <{{email}}>\nFrom: s@example.com\nSubject: Hi {{name}}\n\nx\n")
    row = {"email": "bob@example.com", "name": "Bob"}
    row[field] = value
    with pytest.raises(RowError, match=r"header injection refused|control character|line break"):
        t.render(row, message_id=MID)
    # The next row is fine: the template is not poisoned.
    ok = t.render({"email": "c@example.com", "name": "C"}, message_id=MID)
    assert ok.recipients == ("c@example.com",)


def test_line_breaks_in_body_fields_are_fine(tmp_path: Path) -> None:
    t = make(tmp_path, PLAIN)
    r = t.render({"email": "b@example.com", "name": "B", "number": "1\r\n2\r3\n4"}, message_id=MID)
    check_wire(r)
    assert "1\r\n2\r\n3\r\n4" in parse(r).get_content()


def test_long_body_line_is_quoted_printable(tmp_path: Path) -> None:
    """R19: a 5000-character line is re-encoded, never split or sent as is."""
    t = make(tmp_path, "To: a@example.com\nFrom: b@example.com\nSubject: s\n\n{{long}}\n")
    long = "x" * 5000
    r = t.render({"long": long}, message_id=MID)
    check_wire(r)
    msg = parse(r)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content().rstrip("\r\n") == long


@pytest.mark.parametrize(
    "value",
    ["bad", "", "a@", "@example.com", "a b@example.com", "a@exa mple.com", "x@-bad-.com"],
)
def test_invalid_address_refuses_the_row(tmp_path: Path, value: str) -> None:
    t = make(tmp_path, "To: {{email}}\nFrom: s@example.com\nSubject: s\n\nx\n")
    with pytest.raises(RowError):
        t.render({"email": value}, message_id=MID)


def test_missing_field_refuses_the_row(tmp_path: Path) -> None:
    t = make(tmp_path, PLAIN)
    with pytest.raises(RowError, match="number"):
        t.render({"email": "b@example.com", "name": "B"}, message_id=MID)


def test_utf8_local_part_uses_raw_utf8_headers(tmp_path: Path) -> None:
    t = make(tmp_path, "To: {{name}} <{{email}}>\nFrom: s@example.com\nSubject: Grüße\n\nx\n")
    r = t.render({"email": "jörg@例え.jp", "name": "Jörg"}, message_id=MID)
    assert r.smtputf8
    assert r.recipients == ("jörg@例え.jp",)
    head = r.data.split(b"\r\n\r\n")[0].decode("utf-8")
    assert "To: Jörg <jörg@例え.jp>" in head
    # Unstructured fields stay RFC 2047 encoded even then.
    assert "Subject: =?utf-8?b?" in head
    lines = wire_lines(r.data)
    assert max(len(line) for line in lines) <= 998


def test_idn_domain_with_ascii_local_part_becomes_a_labels(tmp_path: Path) -> None:
    t = make(tmp_path, "To: {{email}}\nFrom: s@example.com\nSubject: s\n\nx\n")
    r = t.render({"email": "info@bücher.example"}, message_id=MID)
    assert not r.smtputf8
    assert r.recipients == ("info@xn--bcher-kva.example",)
    assert parse(r)["To"] == "info@xn--bcher-kva.example"


def test_cc_bcc_envelope_and_bcc_stripped(tmp_path: Path) -> None:
    t = make(
        tmp_path,
        "To: {{email}}\nCc: {{cc1}}, {{cc2}}\nBcc: archive@example.com\nFrom: s@example.com\n"
        "Subject: s\n\nx\n",
    )
    r = t.render(
        {"email": "a@example.com", "cc1": "B <b@example.com>", "cc2": "c@example.com"},
        message_id=MID,
    )
    assert r.recipients == (
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "archive@example.com",
    )
    msg = parse(r)
    assert "Bcc" not in msg
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["b@example.com", "c@example.com"]


def test_undisclosed_recipients_group(tmp_path: Path) -> None:
    t = make(tmp_path, "To: undisclosed-recipients:;\nBcc: {{e}}\nFrom: s@example.com\n\nx\n")
    r = t.render({"e": "hidden@example.com"}, message_id=MID)
    assert r.recipients == ("hidden@example.com",)
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in b"\r\n" + r.data
    assert b"hidden@" not in r.data


def test_template_message_id_and_date_are_kept(tmp_path: Path) -> None:
    t = make(
        tmp_path,
        "To: a@example.com\nFrom: s@example.com\nMessage-ID: <{{id}}@example.com>\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\nSubject: s\n\nx\n",
    )
    r = t.render({"id": "abc"}, message_id=MID)
    assert r.message_id == "<abc@example.com>"
    msg = parse(r)
    assert msg.get_all("Message-ID") == ["<abc@example.com>"]
    assert r.data.count(b"\r\nDate: ") == 1
    assert b"\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n" in r.data


def test_template_errors(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="From"):
        make(tmp_path, "To: a@example.com\nSubject: s\n\nx\n")
    with pytest.raises(TemplateError, match="To, Cc or Bcc"):
        make(tmp_path, "From: a@example.com\nSubject: s\n\nx\n")
    with pytest.raises(TemplateError, match=r"t.txt:\d+: "):
        make(tmp_path, "To: {{ a\nFrom: a@example.com\n\nx\n")
    with pytest.raises(TemplateError, match="attachment not found"):
        make(tmp_path, "To: a@example.com\nFrom: b@example.com\nATTACHMENT: nope.pdf\n\nx\n")
    with pytest.raises(TemplateError, match="cannot read"):
        compile_template(tmp_path / "missing.txt")


# ------------------------------------------------------------------------- markdown

MARKDOWN = """\
TO: {{email}}
SUBJECT: Your {{plan}} statement
FROM: Sender <s@example.com>
CONTENT-TYPE: text/markdown

Hi **{{name}}**,

Your number is *{{number}}*, see [your account](https://example.com/u/{{number}}).

- one {{plan}}
- two

{{name}}
Thanks
"""


def alternative(msg: EmailMessage) -> tuple[str, str]:
    assert msg.get_content_type() == "multipart/related"
    alt = next(p for p in msg.walk() if p.get_content_type() == "multipart/alternative")
    text, html = [p for p in alt.iter_parts() if isinstance(p, EmailMessage)]
    assert text.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    return text.get_content(), html.get_content()


def test_markdown_becomes_text_and_html(tmp_path: Path) -> None:
    t = make(tmp_path, MARKDOWN)
    row = {"email": "a@example.com", "name": "Zoë", "number": "42", "plan": "Pro"}
    r = t.render(row, message_id=MID)
    check_wire(r)
    text, html = alternative(parse(r))
    source = unescape(t._full.render(row))
    body = source.split("\n\n", 1)[1]
    assert text.replace("\r\n", "\n") == body
    assert html.replace("\r\n", "\n") == markdown_to_html(body)
    assert "<strong>Zoë</strong>" in html


_VALUE = st.text(
    alphabet=st.sampled_from(list("abcXYZ019 .,'-_*`[]()<>&#!\\:/@?=+~|\"éü\n")),
    min_size=0,
    max_size=12,
)


@given(name=_VALUE, number=_VALUE, plan=_VALUE)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_markdown_fast_path_matches_markdown(
    tmp_path: Path, name: str, number: str, plan: str
) -> None:
    """Whatever the values, the HTML equals markdown run on the rendered body (mailmerge)."""
    t = _markdown_template(tmp_path)
    row = {"email": "a@example.com", "name": name, "number": number, "plan": plan}
    r = t.render(row, message_id=MID)
    check_wire(r)
    _, html = alternative(parse(r))
    body = unescape(t._full.render(row)).split("\n\n", 1)[1]
    assert html.replace("\r\n", "\n") == markdown_to_html(body).replace("\r\n", "\n")


_CACHE: dict[str, CompiledTemplate] = {}


def _markdown_template(tmp_path: Path) -> CompiledTemplate:
    if "md" not in _CACHE:
        _CACHE["md"] = make(tmp_path, MARKDOWN.replace("SUBJECT: Your {{plan}}", "SUBJECT: Your"))
    return _CACHE["md"]


# ---------------------------------------------------------------------- attachments


def test_attachment_is_read_and_encoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = bytes(range(256)) * 40
    (tmp_path / "report.pdf").write_bytes(payload)
    reads = []
    original = Path.read_bytes

    def counting(self: Path) -> bytes:
        if self.name == "report.pdf":
            reads.append(self)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    t = make(tmp_path, "To: {{e}}\nFrom: s@example.com\nSubject: s\nATTACHMENT: report.pdf\n\nHi\n")
    messages = [t.render({"e": f"u{i}@example.com"}, message_id=MID) for i in range(50)]
    assert len(reads) == 1
    for r in messages:
        check_wire(r)
    msg = parse(messages[0])
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "report.pdf"
    assert att.get_content_type() == "application/pdf"
    assert att.get_content() == payload
    assert msg.get_content_type() == "multipart/related"


def test_templated_attachment_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("A file\n")
    (tmp_path / "ünï.txt").write_text("U file\n")
    t = make(
        tmp_path, "To: x@example.com\nFrom: s@example.com\nSubject: s\nATTACHMENT: {{f}}\n\nHi\n"
    )
    r = t.render({"f": "a.txt"}, message_id=MID)
    [att] = list(parse(r).iter_attachments())
    assert att.get_content() == "A file\n"
    r = t.render({"f": "ünï.txt"}, message_id=MID)
    check_wire(r)
    [att] = list(parse(r).iter_attachments())
    assert att.get_filename() == "ünï.txt"
    with pytest.raises(RowError, match="attachment not found"):
        t.render({"f": "missing.txt"}, message_id=MID)


def test_inline_image_links_to_attachment(tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_bytes(b"\x89PNG fake")
    t = make(
        tmp_path,
        "To: {{e}}\nFrom: s@example.com\nSubject: s\nContent-Type: text/markdown\n"
        "ATTACHMENT: logo.png\n\n![logo](logo.png) Hi {{e}}\n",
    )
    r = t.render({"e": "a@example.com"}, message_id=MID)
    msg = parse(r)
    _, html = alternative(msg)
    [att] = list(msg.iter_attachments())
    cid = att["Content-ID"].strip("<>")
    assert f'src="cid:{cid}"' in html


def test_inline_image_in_an_html_template(tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_bytes(b"\x89PNG fake")
    t = make(
        tmp_path,
        "To: {{e}}\nFrom: s@example.com\nSubject: s\nContent-Type: text/html\n"
        'ATTACHMENT: logo.png\n\n<p><img src="logo.png"> Hi {{e}}</p>\n',
    )
    msg = parse(t.render({"e": "a@example.com"}, message_id=MID))
    html = next(p for p in msg.walk() if p.get_content_type() == "text/html")
    [att] = list(msg.iter_attachments())
    assert isinstance(html, EmailMessage)
    assert f'src="cid:{att["Content-ID"].strip("<>")}"' in html.get_content()


# ----------------------------------------------------------------- other structures


def test_statements_render_per_row(tmp_path: Path) -> None:
    t = make(
        tmp_path,
        "To: {{email}}\nFrom: s@example.com\nSubject: {% if vip %}VIP {% endif %}news\n\n"
        "{% for i in range(2) %}line {{i}}\n{% endfor %}",
    )
    assert t.mode == "per-row"
    r = t.render({"email": "a@example.com", "vip": True}, message_id=MID)
    check_wire(r)
    msg = parse(r)
    assert msg["Subject"] == "VIP news"
    assert msg.get_content() == "line 0\r\nline 1\r\n"


def test_multipart_template_goes_through_email_package(tmp_path: Path) -> None:
    t = make(
        tmp_path,
        """\
TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="boundary"

This is a MIME-encoded message.

--boundary
Content-Type: text/plain; charset=us-ascii

Hi, {{name}},

--boundary
Content-Type: text/html; charset=us-ascii

<html><body><p>Hi, {{name}},</p></body></html>
--boundary--
""",
    )
    r = t.render({"email": "a@example.com", "name": "Ünï"}, message_id=MID)
    check_wire(r)
    msg = parse(r)
    assert msg.get_content_type() == "multipart/alternative"
    parts = [p.get_content() for p in msg.iter_parts() if isinstance(p, EmailMessage)]
    assert "Hi, Ünï," in parts[0]
    assert "<p>Hi, Ünï,</p>" in parts[1]
    assert msg["Message-ID"] == MID


def test_self_check_falls_back_when_pieces_disagree(tmp_path: Path) -> None:
    t = make(tmp_path, PLAIN)
    row: dict[str, Any] = {"email": "a@example.com", "name": "B", "number": 3}
    t._pieces = [*t._pieces, "tampered"]
    r = t.render(row, message_id=MID)
    assert t.mode == "per-row"
    assert parse(r).get_content() == "Hi, B,\r\n\r\nYour number is 3.\r\n"


def test_jsonl_values_are_stringified_like_jinja(tmp_path: Path) -> None:
    t = make(tmp_path, PLAIN)
    r = t.render({"email": "a@example.com", "name": None, "number": 1.5}, message_id=MID)
    # JSON null is an empty value, as an empty CSV field (issue 13, item 9; was "None").
    assert parse(r).get_content() == "Hi, ,\r\n\r\nYour number is 1.5.\r\n"


def test_sender_domain(tmp_path: Path) -> None:
    assert make(tmp_path, PLAIN).sender_domain() == "example.com"
    t = make(tmp_path, "To: a@example.com\nFrom: {{f}}\n\nx\n", "u.txt")
    assert t.sender_domain() is None
