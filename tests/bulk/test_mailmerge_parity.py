"""mailmerge templates render as mailmerge renders them (issue 13, item 12).

Each case runs mailmerge itself (``--dry-run --output-format raw``, installed in the
venv) and compares the parts that matter with triomail's rendering of the same row.
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import sys
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from triomail._bulk.template.compile import compile_template

MAILMERGE = Path(sys.executable).parent / "mailmerge"
pytestmark = pytest.mark.skipif(not MAILMERGE.exists(), reason="mailmerge is not installed")
ROW = {"email": "bob@example.com", "name": "Bob", "url": "https://example.com/unsubscribe/17"}


def mailmerge(tmp_path: Path, template: str) -> Message:
    (tmp_path / "template.txt").write_text(template, encoding="utf-8")
    (tmp_path / "db.csv").write_text(
        "email,name,url\n" + ",".join(ROW.values()) + "\n", encoding="utf-8"
    )
    config = tmp_path / "server.conf"
    config.write_text("[smtp_server]\nhost = 127.0.0.1\nport = 1\n")
    out = subprocess.run(
        [str(MAILMERGE), "--dry-run", "--no-limit", "--output-format", "raw",
         "--template", "template.txt", "--database", "db.csv", "--config", str(config)],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    (chunk,) = re.split(r"^>>> message \d+\n", out, flags=re.M)[1:]
    return email.message_from_string(chunk.split("\n>>> message ")[0])


def triomail(tmp_path: Path, template: str, message_id: str = "<1.a@example.com>") -> EmailMessage:
    path = tmp_path / "template.txt"
    path.write_text(template, encoding="utf-8")
    r = compile_template(path).render(ROW, message_id=message_id)
    msg = email.message_from_bytes(r.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def texts(msg: Message) -> dict[str, str]:
    out = {}
    for part in msg.walk():
        if part.get_content_maintype() == "text" and not part.get_filename():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            text = payload.decode(part.get_content_charset() or "ascii")
            out[part.get_content_type()] = text.replace("\r\n", "\n").rstrip("\n")
    return out


def test_no_blank_line_before_the_body(tmp_path: Path) -> None:
    template = "TO: {{email}}\nSUBJECT: Hi\nFROM: s@example.com\nHello {{name}},\n\nbye: now\n"
    theirs, ours = mailmerge(tmp_path, template), triomail(tmp_path, template)
    assert texts(ours) == texts(theirs) == {"text/plain": "Hello Bob,\n\nbye: now"}
    assert str(ours["Subject"]) == "Hi"


def test_markdown_autolink_around_a_value(tmp_path: Path) -> None:
    template = (
        "TO: {{email}}\nFROM: s@example.com\nCONTENT-TYPE: text/markdown\n\n"
        "Hi {{name}}. Visit <{{url}}>\n"
    )
    theirs, ours = mailmerge(tmp_path, template), triomail(tmp_path, template)
    html = texts(ours)["text/html"]
    assert '<a href="https://example.com/unsubscribe/17">' in html
    assert texts(ours) == texts(theirs)


@pytest.mark.parametrize("src", ["logo.jpg", '"logo.jpg"', "'logo.jpg'"])
def test_inline_image_points_at_its_part(tmp_path: Path, src: str) -> None:
    (tmp_path / "logo.jpg").write_bytes(b"\xff\xd8\xff fake jpeg")
    template = (
        "TO: {{email}}\nFROM: s@example.com\nCONTENT-TYPE: text/markdown\nATTACHMENT: logo.jpg\n\n"
        f"Hi {{{{name}}}} <img src={src}>\n"
    )
    for msg in (mailmerge(tmp_path, template), triomail(tmp_path, template)):
        (part,) = [p for p in msg.walk() if p.get_filename() == "logo.jpg"]
        cid = str(part["Content-ID"]).strip("<>")
        assert f'src="cid:{cid}"' in texts(msg)["text/html"].replace("'", '"')


def test_content_id_unique_per_part_and_message(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    template = "TO: {{email}}\nFROM: s@example.com\nATTACHMENT: a.txt\nATTACHMENT: a.txt\n\nHi\n"
    cids = []
    for mid in ("<1.a@example.com>", "<2.a@example.com>"):
        msg = triomail(tmp_path, template, mid)
        cids += [str(p["Content-ID"]) for p in msg.walk() if p.get_filename() == "a.txt"]
    assert len(cids) == 4
    assert len(set(cids)) == 4
    assert all(re.fullmatch(r"<[^<>@\s]+@example\.com>", c) for c in cids)
