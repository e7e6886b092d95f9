"""Attachment paths from row data stay under the template's directory (issue 13, item 2).

A path the template's author wrote may name any file; one built from a row's values may
name only a file under the template's directory (or ``--attachments-dir``), checked
after ``..`` and symlinks are resolved: a row cannot attach ``/etc/passwd``.
"""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

import pytest

from triomail._bulk.template.compile import CompiledTemplate, compile_template
from triomail._bulk.template.rendered import RowError
from triomail._cli import main

MID = "<test.1@example.com>"
ROW_ATTACHMENT = "To: x@example.com\nFrom: s@example.com\nSubject: s\nATTACHMENT: {{f}}\n\nHi\n"
PER_ROW = ROW_ATTACHMENT.replace("ATTACHMENT", "{% if true %}ATTACHMENT").replace(
    "{{f}}\n", "{{f}}{% endif %}\n", 1
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/secret.txt outside, tmp/tpl/ with docs/a.txt and a symlink out."""
    (tmp_path / "secret.txt").write_text("secret")
    base = tmp_path / "tpl"
    (base / "docs").mkdir(parents=True)
    (base / "docs" / "a.txt").write_text("attached")
    os.symlink(tmp_path / "secret.txt", base / "docs" / "link.txt")
    return base


def make(base: Path, text: str, attachments_dir: Path | None = None) -> CompiledTemplate:
    path = base / "t.txt"
    path.write_text(text, encoding="utf-8")
    return compile_template(path, attachments_dir)


@pytest.mark.parametrize("text", [ROW_ATTACHMENT, PER_ROW], ids=["compiled", "per-row"])
@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("../secret.txt", "leaves"),
        ("docs/../../secret.txt", "leaves"),
        ("../../../../../../etc/passwd", "leaves"),
        ("/etc/passwd", "absolute"),
        ("~/.bashrc", "absolute"),
        ("docs/link.txt", "leaves"),
    ],
)
def test_a_row_cannot_attach_a_file_outside(tree: Path, text: str, spec: str, why: str) -> None:
    t = make(tree, text)
    with pytest.raises(RowError, match=why):
        t.render({"f": spec}, message_id=MID)


@pytest.mark.parametrize("text", [ROW_ATTACHMENT, PER_ROW], ids=["compiled", "per-row"])
def test_a_row_may_attach_a_file_inside(tree: Path, text: str) -> None:
    r = make(tree, text).render({"f": "docs/a.txt"}, message_id=MID)
    msg = email.message_from_bytes(r.data, policy=email.policy.default)
    assert [p.get_filename() for p in msg.iter_attachments()] == ["a.txt"]


def test_attachments_dir_is_the_root(tree: Path) -> None:
    shared = tree.parent / "shared"
    shared.mkdir()
    (shared / "b.txt").write_text("b")
    t = make(tree, ROW_ATTACHMENT.replace("{{f}}", "../shared/{{f}}"), attachments_dir=shared)
    assert b"b.txt" in t.render({"f": "b.txt"}, message_id=MID).data
    with pytest.raises(RowError, match="leaves"):
        t.render({"f": "../tpl/docs/a.txt"}, message_id=MID)


def test_the_templates_own_path_may_lead_anywhere(tree: Path) -> None:
    """The author's constant path is trusted, as before (only row data is confined)."""
    t = make(tree, ROW_ATTACHMENT.replace("{{f}}", "../secret.txt"))
    assert b"secret.txt" in t.render({}, message_id=MID).data


@pytest.mark.parametrize("render", ["inline", "process"])
def test_send_skips_the_row_with_a_clear_error(
    tree: Path, capsys: pytest.CaptureFixture[str], render: str
) -> None:
    rows = tree / "rows.csv"
    rows.write_text("email,f\nok@example.com,docs/a.txt\nbad@example.com,../secret.txt\n")
    template = tree / "t.txt"
    template.write_text(ROW_ATTACHMENT.replace("x@example.com", "{{email}}"), encoding="utf-8")
    outbox = tree.parent / "outbox"
    code = main(["send", str(rows), str(template), "--sink", str(outbox), "--render", render])
    err = capsys.readouterr().err
    assert code == 1
    assert "rows.csv:3: skipped: attachment '../secret.txt' from the row's data leaves" in err
    delivered = [f.read_bytes() for f in outbox.glob("*.eml")]
    assert len(delivered) == 1
    assert b"ok@example.com" in delivered[0]
