"""Encodings and inputs (issue 13, item 9): the encoding is decided once for the file.

A Windows-1252 file was sent by halves (ASCII rows went, accented rows were skipped);
now a file that is not UTF-8 is refused whole before anything is sent, with the line
of the first bad byte and the ``--encoding`` option that reads it.
"""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from triomail._cli import main

TEMPLATE = "TO: {{name}} <{{email}}>\nSUBJECT: Hi {{name}}\nFROM: s@example.com\n\nHi {{name}}\n"
ROWS = "email,name\nann@example.com,Ann\nzoe@example.com,Zoë Lefèvre\n"


def files(tmp_path: Path, data: bytes) -> tuple[Path, Path]:
    rows = tmp_path / "rows.csv"
    rows.write_bytes(data)
    tpl = tmp_path / "t.txt"
    tpl.write_text(TEMPLATE, encoding="utf-8")
    return rows, tpl


def names(outbox: Path) -> list[str]:
    out = []
    for f in sorted(outbox.glob("*.eml")):
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        out.append(msg["To"].addresses[0].display_name)  # type: ignore[union-attr]
    return sorted(out)


def test_a_windows_1252_file_is_refused_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, tpl = files(tmp_path, ROWS.encode("cp1252"))
    outbox = tmp_path / "outbox"
    code = main(["send", str(rows), str(tpl), "--sink", str(outbox)])
    err = capsys.readouterr().err
    assert code == 2
    assert "rows.csv:3: the file is not UTF-8 (byte 0xeb)" in err
    assert "--encoding" in err
    assert not list(outbox.glob("*.eml"))


@pytest.mark.parametrize("render", ["inline", "process"])
def test_encoding_reads_every_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], render: str
) -> None:
    rows, tpl = files(tmp_path, ROWS.encode("cp1252"))
    outbox = tmp_path / "outbox"
    argv = ["send", str(rows), str(tpl), "--sink", str(outbox), "--encoding", "cp1252"]
    code = main([*argv, "--render", render])
    assert code == 0, capsys.readouterr().err
    assert names(outbox) == ["Ann", "Zoë Lefèvre"]


def test_utf8_with_bom(tmp_path: Path) -> None:
    rows, tpl = files(tmp_path, b"\xef\xbb\xbf" + ROWS.encode("utf-8"))
    outbox = tmp_path / "outbox"
    assert main(["send", str(rows), str(tpl), "--sink", str(outbox)]) == 0
    assert names(outbox) == ["Ann", "Zoë Lefèvre"]


def test_unknown_encoding_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, tpl = files(tmp_path, ROWS.encode())
    code = main(["send", str(rows), str(tpl), "--dry-run", "--encoding", "no-such-codec"])
    assert code == 2
    assert "unknown encoding 'no-such-codec'" in capsys.readouterr().err


# ------------------------------------------------------------------ pipes


def run_cli(tmp_path: Path, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "triomail", "send", *args],
        input=stdin,
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("render", ["inline", "process"])
def test_recipients_from_standard_input(tmp_path: Path, render: str) -> None:
    _, tpl = files(tmp_path, b"")
    outbox = tmp_path / "outbox"
    done = run_cli(
        tmp_path, "-", str(tpl), "--sink", str(outbox), "--render", render, stdin=ROWS.encode()
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert names(outbox) == ["Ann", "Zoë Lefèvre"]


def test_json_lines_from_standard_input(tmp_path: Path) -> None:
    _, tpl = files(tmp_path, b"")
    lines = (
        b'{"email": "ann@example.com", "name": "Ann"}\n{"email": "b@example.com", "name": null}\n'
    )
    done = run_cli(tmp_path, "-", str(tpl), "--dry-run", "--show", "2", stdin=lines)
    assert done.returncode == 0, done.stderr.decode()
    assert b"to ann@example.com" in done.stdout and b"to b@example.com" in done.stdout
    assert b"None" not in done.stdout  # JSON null renders empty


def test_a_pipe_without_journal_is_a_clear_error(tmp_path: Path) -> None:
    _, tpl = files(tmp_path, b"")
    done = run_cli(tmp_path, "-", str(tpl), "--server", "smtp://127.0.0.1:1", stdin=b"email\n")
    assert done.returncode == 2
    assert b"need --journal" in done.stderr
    assert b"Traceback" not in done.stderr


# ------------------------------------------------------------------ the report


def test_an_existing_report_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, tpl = files(tmp_path, ROWS.encode())
    report = tmp_path / "r.jsonl"
    report.write_text("earlier run\n")
    code = main(
        ["send", str(rows), str(tpl), "--sink", str(tmp_path / "o"), "--report", str(report)]
    )
    assert code == 2
    assert f"--report {report} exists" in capsys.readouterr().err
    assert report.read_text() == "earlier run\n"


def test_report_to_standard_output(tmp_path: Path) -> None:
    rows, tpl = files(tmp_path, ROWS.encode())
    done = run_cli(tmp_path, str(rows), str(tpl), "--sink", "out", "--report", "-", stdin=b"")
    assert done.returncode == 0, done.stderr.decode()
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert sorted(x["outcome"] for x in lines if x["type"] == "message") == ["accepted"] * 2
    assert b"Summary" in done.stderr
