"""Failures are visible (issue 13, item 8).

Each failed row is named on stderr (the first few, then a count, and where the report
is); a row error repeated on every row is one line with a count; the report carries
the reply that decided a message (the recipient's 451 or 550), not DATA's
"554 no valid recipients".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from triomail._bulk.outcomes import MAX_PRINTED_ERRORS
from triomail._cli import main
from triomail.testing import Fault, SMTPSink

TEMPLATE = "TO: {{name}} <{{email}}>\nSUBJECT: Hi\nFROM: s@example.com\n\nHi {{number}}\n"


def rows_file(tmp_path: Path, n: int, header: str = "email,name,number") -> Path:
    path = tmp_path / "rows.csv"
    lines = [header] + [f"user{i}@example.com,User {i},{i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def template_file(tmp_path: Path, text: str = TEMPLATE) -> Path:
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    return path


async def send(tmp_path: Path, sink: SMTPSink, *args: object) -> int:
    assert sink.ca is not None
    ca = tmp_path / "ca.pem"
    sink.ca.cert_pem.write_to_path(str(ca))
    argv = ["send", *map(str, args), "--server", f"smtp://{sink.host}:{sink.port}"]
    argv += ["--ca-file", str(ca), "--yes", "--retries", "0", "--journal", str(tmp_path / "j")]
    return await trio.to_thread.run_sync(main, argv)


def report(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_each_failed_row_is_named_with_its_reply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = [
        Fault("RCPT", code=550, text="5.1.1 No such user", recipient="user1@example.com"),
        Fault("RCPT", code=451, text="4.3.0 Try later", recipient="user3@example.com"),
    ]
    out = tmp_path / "r.jsonl"
    async with SMTPSink(faults=faults) as sink:
        code = await send(
            tmp_path, sink, rows_file(tmp_path, 5), template_file(tmp_path), "--report", out
        )
    err = capsys.readouterr().err
    assert code == 1
    assert "rows.csv:3: permanent: 550 5.1.1 No such user" in err
    assert "rows.csv:5: transient: 451 4.3.0 Try later" in err
    assert f"every failed and skipped row is in the report: {out}" in err
    messages = {x["line"]: x for x in report(out) if x["type"] == "message"}
    # The deciding reply, not DATA's "554 no valid recipients".
    assert (messages[3]["outcome"], messages[3]["code"]) == ("permanent", 550)
    assert (messages[5]["outcome"], messages[5]["code"]) == ("transient", 451)
    assert messages[5]["enhanced_code"] == "4.3.0"


async def test_without_report_the_summary_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = [Fault("RCPT", code=550, recipient="user0@example.com")]
    async with SMTPSink(faults=faults) as sink:
        code = await send(tmp_path, sink, rows_file(tmp_path, 2), template_file(tmp_path))
    err = capsys.readouterr().err
    assert code == 1
    assert "rows.csv:2: permanent: 550" in err
    assert "run with --report FILE.jsonl" in err


async def test_many_failures_are_named_then_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = MAX_PRINTED_ERRORS + 7
    async with SMTPSink(faults=[Fault("RCPT", code=550)]) as sink:
        code = await send(tmp_path, sink, rows_file(tmp_path, n), template_file(tmp_path))
    err = capsys.readouterr().err
    assert code == 1
    assert err.count(": permanent: 550") == MAX_PRINTED_ERRORS
    assert "7 more failed or skipped row(s) not listed here" in err


@pytest.mark.parametrize("render", ["inline", "process"])
def test_a_repeated_row_error_is_one_line_with_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], render: str
) -> None:
    rows = rows_file(tmp_path, 30)
    tpl = template_file(tmp_path, TEMPLATE.replace("{{number}}", "{{numbr}}"))
    code = main(["send", str(rows), str(tpl), "--dry-run", "--render", render])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("'numbr' is undefined") == 2, err
    assert "rows.csv:2: skipped: template: 'numbr' is undefined" in err
    assert "rows.csv: 29 more row(s) skipped with the same error: template: 'numbr'" in err
