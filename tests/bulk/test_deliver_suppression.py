"""``--exclude`` and ``--suppress-to`` (issue 14): excluded rows are recorded
``suppressed`` in the summary, the journal and the report and never reach the server;
recipients refused for their address are appended for the next campaign. Against the
capture server with its faults; the summary groups refusals by enhanced code."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from test_cli_send import send_async, server, write_rows

from triomail._bulk.suppression import load_exclusions
from triomail.testing import Fault, SMTPSink

TEMPLATE = "From: news@example.com\nTo: {{email}}\nCc: {{name}}@example.net\nSubject: Hi\n\nHi.\n"


async def run(tmp_path: Path, sink: SMTPSink, *options: object) -> int:
    rows = write_rows(
        tmp_path / "rows.csv",
        [(f"u{i}@Example.ORG", f"n{i}", str(i)) for i in range(5)],
    )
    (tmp_path / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    url = server(sink).replace("smtp://", "smtp+plain://")
    return await send_async(
        rows, tmp_path / "t.txt", "--server", url, "--yes", "--journal", tmp_path / "j.db", *options
    )


@pytest.mark.parametrize("form", ["lines", "csv"])
async def test_excluded_rows_are_suppressed_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    exclude = tmp_path / "exclude.txt"
    if form == "lines":
        exclude.write_text("# unsubscribed\nu1@example.org\nu3@EXAMPLE.org\n\nn3@example.net\n")
    else:
        exclude.write_text("name,email\nA,u1@example.org\nB,u3@EXAMPLE.org\nC,n3@example.net\n")
    report = tmp_path / "report.jsonl"
    async with SMTPSink(tls=False) as sink:
        status = await run(tmp_path, sink, "--exclude", exclude, "--report", report)
        rcpts = sorted(r for m in sink.messages for r in m.rcpt_to)
    assert status == 0
    # Row 1 keeps its Cc (only u1 is excluded); row 3 has no recipient left.
    assert [r for r in rcpts if r.startswith("u")] == [
        "u0@Example.ORG", "u2@Example.ORG", "u4@Example.ORG",
    ]  # fmt: skip
    assert "n1@example.net" in rcpts and "n3@example.net" not in rcpts
    assert re.search(r"\nsuppressed \(--exclude\), not sent +1\n", capsys.readouterr().out)
    states = dict(sqlite3.connect(tmp_path / "j.db").execute("SELECT line, state FROM messages"))
    assert states[5] == "suppressed" and states[3] == "accepted"
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    (note,) = [x for x in lines if x.get("outcome") == "suppressed"]
    assert note["line"] == 5 and note["recipients"] == ["u3@Example.ORG", "n3@example.net"]


async def test_address_level_refusals_are_appended_for_the_next_campaign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = [
        Fault("RCPT", code=550, text="5.1.1 no such user", recipient="u1@Example.ORG"),
        Fault("RCPT", code=550, text="5.2.1 mailbox disabled", recipient="n2@example.net"),
        Fault("RCPT", code=550, text="5.7.1 policy", recipient="u4@Example.ORG"),
    ]
    suppress = tmp_path / "suppress.txt"
    suppress.write_text("earlier@example.com\n")
    async with SMTPSink(tls=False, faults=faults) as sink:
        status = await run(tmp_path, sink, "--suppress-to", suppress)
    assert status == 1  # a recipient was refused
    lines = suppress.read_text().splitlines()
    assert lines[0] == "earlier@example.com"  # appended to, in the order results came
    assert sorted(lines[1:]) == ["n2@example.net", "u1@Example.ORG"]
    out = capsys.readouterr().out
    assert "refusals by code" in out
    assert "5.1.1 x1" in out and "5.2.1 x1" in out and "5.7.1 x1" in out
    assert load_exclusions(suppress) >= {"u1@example.org", "n2@example.net"}


def test_a_csv_without_an_email_column_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("name,address\nA,a@example.com\n")
    with pytest.raises(Exception, match="needs an 'email' column"):
        load_exclusions(path)
