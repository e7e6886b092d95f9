"""``triomail send`` end to end, in process: the embedded sink, mailmerge parity, dry runs,
bad rows, exit codes, resume semantics and the JSONL report.

Runs that need a sink with faults run the CLI in a worker thread (its own ``trio.run``)
while the sink serves in the test's trio loop. Process-level behaviour (signals,
``kill -9``) is in ``test_cli_send_process.py``.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers.mail import message_id

from triomail._bulk.journal import Journal
from triomail._cli import main
from triomail.testing import Fault, SMTPSink

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MAILMERGE = Path(sys.executable).parent / "mailmerge"

TEMPLATE = """\
TO: {{name}} <{{email}}>
SUBJECT: Hello {{name}}
FROM: Sender <sender@example.com>

Hi {{name}}, your number is {{number}}.
"""


def send(*args: object) -> int:
    return main(["send", *(str(a) for a in args)])


async def send_async(*args: object) -> int:
    return await trio.to_thread.run_sync(lambda: send(*args))


def write_rows(
    path: Path, rows: list[tuple[str, str, str]], header: str = "email,name,number"
) -> Path:
    lines = [header] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def batch(tmp_path: Path, n: int, template: str = TEMPLATE) -> tuple[Path, Path]:
    rows = write_rows(
        tmp_path / "rows.csv", [(f"user{i}@example.com", f"User {i}", str(i)) for i in range(n)]
    )
    tpl = tmp_path / "template.txt"
    tpl.write_text(template, encoding="utf-8")
    return rows, tpl


def ca_file(sink: SMTPSink, tmp_path: Path) -> Path:
    assert sink.ca is not None
    path = tmp_path / "sink-ca.pem"
    sink.ca.cert_pem.write_to_path(str(path))
    return path


def server(sink: SMTPSink) -> str:
    return f"smtp://{sink.host}:{sink.port}"


def sink_options(sink: SMTPSink, tmp_path: Path) -> tuple[str | Path, ...]:
    """``--server`` and ``--ca-file`` for a run against ``sink``."""
    return ("--server", server(sink), "--ca-file", ca_file(sink, tmp_path))


def report_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


MESSAGE_KEYS = {
    "type": str,
    "line": int,
    "key": str,
    "message_id": str,
    "outcome": str,
    "attempts": int,
    "code": (int, type(None)),
    "enhanced_code": (str, type(None)),
    "text": (str, type(None)),
    "error": (str, type(None)),
    "sender": str,
    "recipients": list,
    "started": str,
    "finished": str,
}
RECIPIENT_KEYS = {
    "type": str,
    "line": int,
    "message_id": str,
    "recipient": str,
    "outcome": str,
    "code": (int, type(None)),
    "enhanced_code": (str, type(None)),
    "text": (str, type(None)),
    "attempts": int,
    "started": str,
    "finished": str,
}
OUTCOMES = {"accepted", "transient", "permanent", "unknown"}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00\Z")


def check_report_schema(lines: list[dict[str, Any]]) -> None:
    for line in lines:
        kind = line["type"]
        if kind == "bad_row":
            assert set(line) == {"type", "line", "error", "time"}
            assert isinstance(line["line"], int) and isinstance(line["error"], str)
            assert ISO.match(line["time"])
            continue
        schema = MESSAGE_KEYS if kind == "message" else RECIPIENT_KEYS
        assert kind in ("message", "recipient")
        for key, types in schema.items():
            assert key in line, (key, line)
            assert isinstance(line[key], types), (key, line)
        extra = set(line) - set(schema) - {"previous", "note"}
        assert not extra, extra
        assert line["outcome"] in OUTCOMES
        assert ISO.match(line["started"]) and ISO.match(line["finished"])
        assert line["started"] <= line["finished"]


# ------------------------------------------------------------------ the --sink demo


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of examples/ (the journal and outbox stay out of the checkout)."""
    target = tmp_path / "examples"
    shutil.copytree(EXAMPLES, target)
    return target


def test_readme_command_with_embedded_sink(
    examples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outbox = tmp_path / "outbox"
    report = tmp_path / "report.jsonl"
    code = send(
        examples / "recipients.csv", examples / "template.txt", "--sink", outbox, "--report", report
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "capture server on 127.0.0.1:" in err
    assert "Summary" in out and "accepted" in out
    files = sorted(outbox.glob("*.eml"))
    assert len(files) == 4
    parsed = [email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files]
    subjects = sorted(str(m["Subject"]) for m in parsed)
    assert any("Zoë Lefèvre" in s and "relevé" in s for s in subjects)
    assert not (examples / "recipients.csv.journal.sqlite3").exists()  # in memory with --sink
    lines = report_lines(report)
    check_report_schema(lines)
    assert [line["outcome"] for line in lines if line["type"] == "message"] == ["accepted"] * 4
    assert len({line["message_id"] for line in lines}) == 4


# ----------------------------------------------------------------- mailmerge parity


def _mailmerge_messages(examples: Path, tmp_path: Path) -> list[Message]:
    config = tmp_path / "mailmerge_server.conf"
    config.write_text("[smtp_server]\nhost = 127.0.0.1\nport = 1\n")
    out = subprocess.run(
        [
            str(MAILMERGE),
            "--dry-run",
            "--no-limit",
            "--output-format",
            "raw",
            "--template",
            str(examples / "template.txt"),
            "--database",
            str(examples / "recipients.csv"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=examples,
    ).stdout
    chunks = re.split(r"^>>> message \d+\n", out, flags=re.M)[1:]
    return [email.message_from_string(c.split("\n>>> message ")[0]) for c in chunks]


def _headers(msg: Message) -> dict[str, list[str]]:
    skip = {"date", "message-id", "mime-version", "content-type", "content-transfer-encoding"}
    out: dict[str, list[str]] = {}
    for key, value in msg.items():
        if key.lower() not in skip:
            text = str(make_header(decode_header(str(value))))
            out.setdefault(key.lower(), []).append(" ".join(text.split()))
    return out


def _parts(msg: Message) -> list[tuple[Any, ...]]:
    parts: list[tuple[Any, ...]] = []
    for part in msg.walk():
        if part.is_multipart():
            parts.append((part.get_content_type(),))
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_content_maintype() == "text" and not part.get_filename():
            text = payload.decode(part.get_content_charset() or "ascii")
            parts.append(("text", part.get_content_type(), text.replace("\r\n", "\n").rstrip("\n")))
        else:  # attachments: name and bytes (triomail guesses the type; mailmerge says octet-stream)
            parts.append(("attachment", part.get_filename(), payload))
    return parts


@pytest.mark.skipif(not MAILMERGE.exists(), reason="mailmerge is not installed in the venv")
def test_same_messages_as_mailmerge(examples: Path, tmp_path: Path) -> None:
    """The mailmerge sample template and database give the messages mailmerge gives."""
    theirs = _mailmerge_messages(examples, tmp_path)
    outbox = tmp_path / "outbox"
    assert send(examples / "recipients.csv", examples / "template.txt", "--sink", outbox) == 0
    ours = [email.message_from_bytes(f.read_bytes()) for f in sorted(outbox.glob("*.eml"))]
    assert len(theirs) == len(ours) == 4

    def key(m: Message) -> str:
        return str(make_header(decode_header(str(m["To"]))))

    for a, b in zip(sorted(theirs, key=key), sorted(ours, key=key), strict=True):
        assert _headers(a) == _headers(b)
        assert _parts(a) == _parts(b)


# --------------------------------------------------------------------------- dry run


def test_dry_run_connects_to_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, tpl = batch(tmp_path, 8)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    out_dir = tmp_path / "rendered"
    try:
        code = send(
            rows, tpl, "--dry-run", "--server", f"smtp://user@127.0.0.1:{port}", "--sink", out_dir
        )
        readable, _, _ = select.select([listener], [], [], 0.2)
    finally:
        listener.close()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert readable == []  # nobody connected
    assert ">>> message 1 (line 2) to user0@example.com" in out
    assert "Subject: Hello User 0" in out
    assert "8 message(s) rendered and checked" in err
    assert len(list(out_dir.glob("*.eml"))) == 8
    assert not (tmp_path / "rows.csv.journal.sqlite3").exists()


# ----------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("render", ["process", "inline"])
def test_bad_rows_are_reported_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], render: str
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_bytes(
        b"email,name,number\n"
        b"ok1@example.com,One,1\n"  # 2
        b"not-an-address,Two,2\n"  # 3
        b"ok3@example.com,Three\n"  # 4: missing field
        b"ok4@example.com,Four,4,extra\n"  # 5: a field too many (not UTF-8: the whole file)
        b'ok5@example.com,"Five\nBcc: evil@example.net",5\n'  # 6-7: header injection
        b",Six,6\n"  # 8: no address
        b"ok7@example.com,Seven,7\n"  # 9
        b"ok1@example.com,One,1\n"  # 10: duplicate of line 2
    )
    tpl = tmp_path / "t.txt"
    tpl.write_text(TEMPLATE)
    report = tmp_path / "r.jsonl"
    outbox = tmp_path / "outbox"
    code = send(rows, tpl, "--sink", outbox, "--report", report, "--render", render)
    out, err = capsys.readouterr()
    assert code == 1
    for line in (3, 4, 5, 6, 8, 10):
        assert f"rows.csv:{line}: skipped:" in err
    assert "header injection refused" in err
    assert "duplicate of line 2" in err
    delivered = sorted(f.read_bytes() for f in outbox.glob("*.eml"))
    assert len(delivered) == 2
    assert not any(b"evil@example.net" in d for d in delivered)
    lines = report_lines(report)
    check_report_schema(lines)
    assert sorted(x["line"] for x in lines if x["type"] == "bad_row") == [3, 4, 5, 6, 8, 10]
    assert "bad rows skipped" in out


# ---------------------------------------------------------------------- exit codes


def test_exit_2_for_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, tpl = batch(tmp_path, 2)
    cases: list[tuple[list[object], str]] = [
        ([rows, tpl], "no server"),
        ([rows, tmp_path / "missing.txt", "--sink", tmp_path / "o"], "cannot read template"),
        ([tmp_path / "missing.csv", tpl, "--sink", tmp_path / "o"], "cannot read"),
        ([rows, tpl, "--server", "smtp://u:secret@127.0.0.1:1"], "password in the URL"),
        ([rows, tpl, "--server", "http://127.0.0.1:1"], "unknown scheme"),
        ([rows, tpl, "--sink", tmp_path / "o", "--server", "smtp://h"], "not both"),
        ([rows, tpl, "--sink", tmp_path / "o", "--at-most-once"], "only applies with --resume"),
        ([rows, tpl, "--sink", tmp_path / "o", "--resume", "--journal", tmp_path / "j"], "nothing"),
        ([rows, tpl, "--sink", tmp_path / "o", "--resume"], "needs --journal"),
    ]
    for args, message in cases:
        assert send(*args) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


def test_exit_2_for_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, tpl = batch(tmp_path, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    code = send(
        rows, tpl, "--server", f"smtp+plain://127.0.0.1:{port}", "--journal", tmp_path / "j"
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot" in err and f"127.0.0.1:{port}" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_exit_2_for_authentication_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, tpl = batch(tmp_path, 2)
    monkeypatch.setenv("TRIOMAIL_PASSWORD", "wrong")
    async with SMTPSink(auth={"ann": "right"}) as sink:
        code = await send_async(
            rows, tpl, "--server", f"smtp://ann@{sink.host}:{sink.port}",
            "--ca-file", ca_file(sink, tmp_path), "--journal", tmp_path / "j",
        )  # fmt: skip
        assert code == 2
        assert sink.received == 0
        monkeypatch.setenv("TRIOMAIL_PASSWORD", "right")
        code = await send_async(
            rows, tpl, "--server", f"smtp://ann@{sink.host}:{sink.port}",
            "--ca-file", ca_file(sink, tmp_path), "--journal", tmp_path / "j2",
        )  # fmt: skip
        assert code == 0
        assert sink.received == 2
        assert all(m.authenticated_as == "ann" and m.tls for m in sink.messages)


async def test_exit_1_when_a_recipient_is_refused(tmp_path: Path) -> None:
    rows, tpl = batch(tmp_path, 3)
    report = tmp_path / "r.jsonl"
    faults = [Fault("RCPT", code=550, text="5.1.1 No such user", recipient="user1@example.com")]
    async with SMTPSink(faults=faults) as sink:
        code = await send_async(
            rows, tpl, *sink_options(sink, tmp_path),
            "--journal", tmp_path / "j", "--report", report,
        )  # fmt: skip
    assert code == 1
    lines = report_lines(report)
    check_report_schema(lines)
    refused = [x for x in lines if x["type"] == "recipient" and x["outcome"] == "permanent"]
    assert [(x["recipient"], x["code"], x["enhanced_code"]) for x in refused] == [
        ("user1@example.com", 550, "5.1.1")
    ]
    journal, counts = Journal.open(tmp_path / "j", resume=True)
    journal.close()
    assert counts["accepted"] == 2 and counts["permanent"] == 1
    async with SMTPSink() as sink:
        code = await send_async(
            rows, tpl, *sink_options(sink, tmp_path),
            "--journal", tmp_path / "j", "--resume",
        )  # fmt: skip
        assert code == 1  # a refusal recorded earlier is still a failure of the batch
        assert sink.received == 0  # and it is not sent again


def test_confirmation_without_a_terminal_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, tpl = batch(tmp_path, 6)
    code = send(rows, tpl, "--server", "smtp+plain://127.0.0.1:1")
    err = capsys.readouterr().err
    assert code == 2
    assert "pass --yes" in err
    # --limit 5 needs no confirmation (and then fails to connect: still exit 2, no prompt).
    assert send(rows, tpl, "--server", "smtp+plain://127.0.0.1:1", "--limit", "5") == 2
    assert "pass --yes" not in capsys.readouterr().err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["send", "--help"])
    out = capsys.readouterr().out
    for text in ("exit status:", "0 ", "1 ", "2 ", "130", "TRIOMAIL_PASSWORD", "--at-most-once"):
        assert text in out


# ------------------------------------------------------------------- config file


async def test_config_file(tmp_path: Path) -> None:
    rows, tpl = batch(tmp_path, 3)
    async with SMTPSink() as sink:
        config = tmp_path / "send.toml"
        config.write_text(
            "[send]\n"
            f'server = "{server(sink)}"\n'
            f'ca-file = "{ca_file(sink, tmp_path)}"\n'
            "connections = 2\n"
            'journal = "journal.sqlite3"\n'
            'report = "out.jsonl"\n'
        )
        assert await send_async(rows, tpl, "--config", config) == 0
        assert sink.received == 3
    assert (tmp_path / "journal.sqlite3").exists()
    assert len(report_lines(tmp_path / "out.jsonl")) == 6
    bad = tmp_path / "bad.toml"
    bad.write_text('password = "x"\n')
    assert await send_async(rows, tpl, "--config", bad) == 2
    bad.write_text("conections = 2\n")
    assert await send_async(rows, tpl, "--config", bad) == 2


# ------------------------------------------------------------------- resume


def sink_ids(sink: SMTPSink) -> list[str]:
    return [message_id(m.data) for m in sink.messages]


@pytest.mark.parametrize("render", ["process", "inline"])
async def test_resume_sends_only_what_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], render: str
) -> None:
    rows, tpl = batch(tmp_path, 10)
    journal = tmp_path / "j.sqlite3"
    report = tmp_path / "r.jsonl"
    transient = [
        Fault("RCPT", code=451, text="4.3.0 Try later", recipient=f"user{i}@example.com", times=1)
        for i in (2, 5)
    ]
    async with SMTPSink(faults=transient) as sink:
        common = (*sink_options(sink, tmp_path), "--render", render)
        code = await send_async(
            rows, tpl, *common, "--journal", journal, "--yes", "--retries", "0", "--report", report
        )
        assert code == 1
        assert sink.received == 8
        first_ids = set(sink_ids(sink))
        # A second run without --resume is refused: the journal records this batch.
        assert await send_async(rows, tpl, *common, "--journal", journal, "--yes") == 2
        assert "use --resume" in capsys.readouterr().err
        code = await send_async(
            rows, tpl, *common, "--journal", journal, "--resume", "--report", report
        )
        assert code == 0
        assert sink.received == 10
        ids = sink_ids(sink)
        assert len(set(ids)) == 10  # every row exactly once
        assert first_ids < set(ids)
        # Nothing is left: a third run sends nothing and succeeds.
        assert await send_async(rows, tpl, *common, "--journal", journal, "--resume") == 0
        assert sink.received == 10
    lines = report_lines(report)
    check_report_schema(lines)
    retried = [x for x in lines if x["type"] == "message" and x.get("previous") == "transient"]
    assert sorted(x["line"] for x in retried) == [4, 7]


async def test_unknown_then_transient_is_recorded_unknown(tmp_path: Path) -> None:
    """R38: a retry that fails transiently does not hide an earlier unknown outcome."""
    rows, tpl = batch(tmp_path, 1)
    journal_path = tmp_path / "j.sqlite3"
    report = tmp_path / "r.jsonl"
    faults = [
        Fault(".", drop="before_reply", message=1),  # stored, reply lost: unknown
        Fault("MAIL", code=451, text="4.3.0 Try later", message=2),  # the retry: transient
    ]
    async with SMTPSink(faults=faults) as sink:
        common = sink_options(sink, tmp_path)
        code = await send_async(
            rows, tpl, *common, "--journal", journal_path, "--retries", "1",
            "--retry-backoff", "0.01", "--report", report,
        )  # fmt: skip
        assert code == 1
        assert sink.received == 1
        journal, _ = Journal.open(journal_path, resume=True)
        [record] = journal.records()
        journal.close()
        assert record.state == "unknown"
        [message] = [x for x in report_lines(report) if x["type"] == "message"]
        assert message["outcome"] == "unknown"
        assert "possible duplicate" in message["error"]
        # --at-most-once leaves it alone; the default resends it with the same Message-ID.
        code = await send_async(
            rows, tpl, *common, "--journal", journal_path, "--resume", "--at-most-once"
        )
        assert code == 1 and sink.received == 1
        assert await send_async(rows, tpl, *common, "--journal", journal_path, "--resume") == 0
        assert sink_ids(sink) == [record.message_id, record.message_id]


@pytest.mark.parametrize("render", ["process", "inline"])
async def test_resume_unknown_outcomes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], render: str
) -> None:
    """In-flight messages of a crashed run: resent with the same Message-ID, or skipped."""
    rows, tpl = batch(tmp_path, 4)
    journal_path = tmp_path / "j.sqlite3"
    async with SMTPSink() as sink:
        common = (*sink_options(sink, tmp_path), "--render", render)
        assert await send_async(rows, tpl, *common, "--journal", journal_path) == 0
        ids = sink_ids(sink)
        # Pretend the run crashed with two messages in flight.
        journal, _ = Journal.open(journal_path, resume=True)
        crashed = journal.records()[:2]
        journal.close()

        def crash() -> None:
            with sqlite3.connect(journal_path) as conn:
                conn.executemany(
                    "UPDATE messages SET state='in-flight', done=NULL WHERE key=?",
                    [(r.key,) for r in crashed],
                )

        crash()
        sink.clear()
        code = await send_async(
            rows, tpl, *common, "--journal", journal_path, "--resume", "--at-most-once"
        )
        assert code == 1  # unknown outcomes are not a success
        assert sink.received == 0
        assert "2 with an unknown outcome: skipped" in capsys.readouterr().err
        crash()
        assert await send_async(rows, tpl, *common, "--journal", journal_path, "--resume") == 0
        assert sorted(sink_ids(sink)) == sorted(r.message_id for r in crashed)
        assert set(sink_ids(sink)) <= set(ids)  # the very same Message-IDs


@pytest.mark.parametrize("render", ["process", "inline"])
async def test_default_journal_next_to_the_recipients_and_limit(
    tmp_path: Path, render: str
) -> None:
    rows, tpl = batch(tmp_path, 3)
    async with SMTPSink() as sink:
        common = (*sink_options(sink, tmp_path), "--render", render)
        assert await send_async(rows, tpl, *common, "--limit", "2") == 0
        assert sink.received == 2
        journal_path = tmp_path / "rows.csv.journal.sqlite3"
        assert journal_path.exists()
        assert await send_async(rows, tpl, *common, "--resume") == 0
        assert sink.received == 3
        assert len(set(sink_ids(sink))) == 3
