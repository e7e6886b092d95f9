"""``triomail send --render``: rows rendered in a second process, and its failures.

The CLI runs as ``python -m triomail send`` (a child of the test) so that its own
child, the render process, can be found in ``/proc`` and killed. The frame reader is
also driven by real processes that write garbage, an error frame, or die.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio
from test_cli_send import (
    TEMPLATE,
    batch,
    report_lines,
    send,
    send_async,
    sink_ids,
    sink_options,
)
from test_cli_send_process import finish, records, start, wait_until

from triomail._bulk.journal import Journal
from triomail._bulk.main import GC_THRESHOLDS
from triomail._bulk.render_process import RenderProcess, RenderProcessError
from triomail._bulk.template.compile import compile_template
from triomail.testing import Fault, SMTPSink

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# A body of ~8 KB: 1,000 messages are far more than the pipe (1 MiB) and the pool's
# queue hold, so the render process is still there, blocked in write, while the
# batch is being sent.
BIG_TEMPLATE = (
    "TO: {{name}} <{{email}}>\n"
    "SUBJECT: Hello {{name}}\n"
    "FROM: Sender <sender@example.com>\n"
    "\n"
    "Hi {{name}}, your number is {{number}}.\n" + ("All work and no play. " * 3 + "\n") * 120
)


def render_processes(parent: int) -> list[int]:
    """The pids of the render processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b"triomail._bulk.render_child" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# ----------------------------------------------------------------- the mode is used


async def test_render_process_renders_the_batch(tmp_path: Path) -> None:
    n = 1000
    rows, tpl = batch(tmp_path, n, BIG_TEMPLATE)
    async with SMTPSink(faults=[Fault(".", delay=0.002)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        first = ("--journal", tmp_path / "first.sqlite3", "--yes", "--render", "process")
        child = await start(tmp_path, "process", *common, *first)
        await wait_until(lambda: sink.received >= 10)
        renderers = render_processes(child.proc.pid)
        assert len(renderers) == 1  # a render process, still running: the pipe is full
        assert alive(renderers[0])
        assert await finish(child) == 0, child.stderr
        assert not alive(renderers[0])  # ended and reaped with the batch
        counts = Counter(sink_ids(sink))
        assert len(counts) == n and set(counts.values()) == {1}

        sink.clear()
        second = ("--journal", tmp_path / "second.sqlite3", "--yes", "--render", "inline")
        child = await start(tmp_path, "inline", *common, *second)
        await wait_until(lambda: sink.received >= 10)
        assert render_processes(child.proc.pid) == []
        assert await finish(child) == 0, child.stderr
        assert sink.received == n


async def test_journal_message_id_differs_renders_here(tmp_path: Path) -> None:
    """A journal record with another Message-ID: the row is rendered again, with it."""
    rows, tpl = batch(tmp_path, 4)
    journal_path = tmp_path / "j.sqlite3"
    async with SMTPSink() as sink:
        common = sink_options(sink, tmp_path)
        common += ("--journal", journal_path, "--render", "process")
        assert await send_async(rows, tpl, *common) == 0
        journal, _ = Journal.open(journal_path, resume=True)
        first = journal.records()[:2]
        journal.close()
        with sqlite3.connect(journal_path) as conn:
            conn.executemany(
                "UPDATE messages SET state='transient', message_id=? WHERE key=?",
                [(f"<earlier-{i}@example.com>", r.key) for i, r in enumerate(first)],
            )
        sink.clear()
        assert await send_async(rows, tpl, *common, "--resume") == 0
        assert sorted(sink_ids(sink)) == ["<earlier-0@example.com>", "<earlier-1@example.com>"]


# ---------------------------------------------------------------- the process fails


async def test_render_process_killed_mid_batch(tmp_path: Path) -> None:
    """One line, exit 2, a consistent journal; --resume sends the rest exactly once."""
    n = 1000
    rows, tpl = batch(tmp_path, n, BIG_TEMPLATE)
    journal = tmp_path / "j.sqlite3"
    async with SMTPSink(faults=[Fault(".", delay=0.002)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", journal, "--yes", "--connections", "2")
        child = await start(tmp_path, "first", *common, "--render", "process")
        await wait_until(lambda: sink.received >= 10)
        (renderer,) = render_processes(child.proc.pid)
        os.kill(renderer, 9)
        assert await finish(child) == 2, child.stderr
        err = child.stderr
        assert "Traceback" not in err
        error = [line for line in err.splitlines() if "error:" in line]
        assert len(error) == 1
        assert "the render process was killed (SIGKILL) before the end of the file" in error[0]
        assert "continue with --resume" in error[0]
        assert "Summary" in child.stdout
        state = Counter(r.state for r in records(journal))
        assert state["in-flight"] == 0
        assert state["accepted"] == sink.received < n
        assert set(state) <= {"accepted", "pending"}
        child = await start(tmp_path, "resume", *common, "--resume")
        assert await finish(child) == 0, child.stderr
    assert all(r.state == "accepted" for r in records(journal))
    counts = Counter(sink_ids(sink))
    assert len(counts) == n and set(counts.values()) == {1}


def _frame(body: str) -> str:
    """Python code writing one frame whose marshal body is ``body``."""
    return (
        "import marshal, sys\n"
        f"p = marshal.dumps({body})\n"
        "sys.stdout.buffer.write(len(p).to_bytes(4, 'big') + p)\n"
        "sys.stdout.flush()\n"
    )


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("import sys; sys.stdout.buffer.write(b'\\0\\0\\0\\x07garbage')", "does not decode"),
        ("import sys; sys.stdout.buffer.write(b'\\xff\\xff\\xff\\xff')", "length out of range"),
        (_frame("('rows', [(1, 'not a row')])"), "an unexpected frame"),
        (_frame("('end', 5)"), "an unexpected frame"),
        (_frame("('error', 'RecipientsError: no\\nsuch file')"), "RecipientsError: no such file"),
        (_frame("('rows', [(0, 2, 'bad')])") + "import os; os._exit(3)", r"exited \(status 3\)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", r"killed \(SIGKILL\)"),
    ],
)
async def test_render_process_failures_are_one_line(script: str, expected: str) -> None:
    renderer = RenderProcess.spawn([sys.executable, "-c", script])
    try:
        with trio.fail_after(20), pytest.raises(RenderProcessError, match=expected) as info:
            while await renderer.receive() is not None:
                pass
        assert "\n" not in str(info.value)
    finally:
        renderer.close()
    assert renderer.proc.returncode is not None


async def every_record(tpl: Path, rows: Path) -> list[tuple[object, ...]]:
    """Start the real render process on ``rows`` and read it to the end."""
    renderer = RenderProcess.start(tpl, rows)
    try:
        renderer.begin("c4mpaign", "example.com", compile_template(tpl).digest)
        got = []
        with trio.fail_after(20):
            while (batch_ := await renderer.receive()) is not None:
                got.extend(batch_)
    finally:
        renderer.close()
    return got


async def test_render_process_frames_end_to_end(tmp_path: Path) -> None:
    """The real child: rows in file order, bad rows and template refusals as records."""
    rows = tmp_path / "rows.csv"
    rows.write_text("email,name,number\na@example.com,A,1\nnot-an-address,B,2\nc@example.com,C\n")
    tpl = tmp_path / "t.txt"
    tpl.write_text(BIG_TEMPLATE)
    got = await every_record(tpl, rows)
    assert [r[:2] for r in got] == [(1, 2), (2, 3), (0, 4)]
    _, _, key, fields, data, sender, recipients, mid, utf8, eight_bit = got[0]
    assert fields == {"email": "a@example.com", "name": "A", "number": "1"}
    assert mid == f"<{key}.c4mpaign@example.com>"
    assert f"Message-ID: {mid}\r\n".encode() in data
    assert sender == "sender@example.com" and recipients == ("a@example.com",)
    assert utf8 is False
    assert eight_bit is False  # canonical CRLF text, ASCII only
    assert "not-an-address" in got[1][4]
    assert "expected 3 fields" in got[2][2]


async def test_render_process_imports_the_package_it_was_started_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an editable install's import hook (as after ``pip install``), the child
    finds the package through the directory it is given: triomail/, not its _bulk/."""
    import triomail

    started: list[list[str]] = []
    real_spawn = RenderProcess.spawn

    def spawn(argv: list[str]) -> RenderProcess:
        started.append(list(argv))
        code = argv.index("-c") + 1
        no_hook = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        return real_spawn([*argv[:code], no_hook + argv[code], *argv[code + 1 :]])

    monkeypatch.setattr(RenderProcess, "spawn", spawn)
    rows, tpl = batch(tmp_path, 3)
    got = await every_record(tpl, rows)
    assert len(got) == 3
    (argv,) = started
    assert (Path(argv[argv.index("-c") + 2]) / "__init__.py").samefile(triomail.__file__)


def test_header_row_not_utf8_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, tpl = batch(tmp_path, 1)
    rows.write_bytes(b"em\xffail,name,number\na@example.com,A,1\n")
    assert send(rows, tpl, "--sink", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "header row is not UTF-8" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("template", [TEMPLATE, BIG_TEMPLATE], ids=["light", "heavy"])
async def test_auto_switches_to_the_render_process_mid_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    template: str,
) -> None:
    """--render auto: rows rendered here first, then the process's: each row once.

    The render process (the real one) starts 0.3 s late, so the sender renders the
    first rows itself. Bad rows are spread over the file, so some fall before the
    switch (reported from here), some after (from the render process's records),
    each once, in file order. With a heavy template (rendered here as fast as there)
    the switch comes after a few chunks all the same (CATCH_UP_CHUNKS).
    """
    import triomail._bulk.render_process

    late = "import time\ntime.sleep(0.3)\n" + triomail._bulk.render_process._BOOTSTRAP
    monkeypatch.setattr(triomail._bulk.render_process, "_BOOTSTRAP", late)
    caplog.set_level(logging.DEBUG, logger="triomail.send")
    n = 6000 if template is TEMPLATE else 3000  # time for the process to start
    bad_lines = set(range(50, n + 2, 97))
    lines = ["email,name,number"]
    for line in range(2, n + 2):
        address = "not-an-address" if line in bad_lines else f"user{line}@example.com"
        lines.append(f"{address},User {line},{line}")
    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(lines) + "\n")
    tpl = tmp_path / "t.txt"
    tpl.write_text(template)
    report = tmp_path / "r.jsonl"
    async with SMTPSink() as sink:
        common = sink_options(sink, tmp_path)
        code = await send_async(rows, tpl, *common, "--yes", "--report", report, "--render", "auto")
        assert code == 1  # the bad rows
        counts = Counter(sink_ids(sink))
    assert len(counts) == n - len(bad_lines) and set(counts.values()) == {1}
    reported = [x for x in report_lines(report) if x["type"] == "bad_row"]
    assert [x["line"] for x in reported] == sorted(bad_lines)
    sent = [x["line"] for x in report_lines(report) if x["type"] == "message"]
    assert sorted(sent) == sorted(set(range(2, n + 2)) - bad_lines)
    (switch,) = [r.getMessage() for r in caplog.records if "taking its rows" in r.getMessage()]
    after = int(switch.rsplit(" ", 1)[1])
    assert min(bad_lines) < after < n  # mid-file, with bad rows on both sides


async def test_render_process_refuses_another_template_version(tmp_path: Path) -> None:
    """The template changed between the sender's compile and the render process's."""
    rows, tpl = batch(tmp_path, 3)
    digest = compile_template(tpl).digest
    tpl.write_text(TEMPLATE.replace("Hello", "Goodbye"))
    renderer = RenderProcess.start(tpl, rows)
    try:
        renderer.begin("c4mpaign", "example.com", digest)
        with trio.fail_after(20), pytest.raises(RenderProcessError, match="changed while"):
            await renderer.receive()
    finally:
        renderer.close()


async def test_render_process_writing_garbage_mid_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real render process, made to write garbage as its third frame: the rows of
    the first two are sent and recorded, then one line, exit 2; --resume finishes."""
    import triomail._bulk.render_process

    garbage = (
        "import os, sys, types\n"
        "package = types.ModuleType('triomail')\n"
        "package.__path__ = [sys.argv[1]]\n"
        "sys.modules.setdefault('triomail', package)\n"
        "import triomail._bulk.render_child as render\n"
        "real, frames = render._write, []\n"
        "def write(fd, kind, body):\n"
        "    frames.append(kind)\n"
        "    if len(frames) == 3:\n"
        "        os.write(fd, bytes([0, 0, 0, 9]) + b'not a frame'[:9])\n"
        "    else:\n"
        "        real(fd, kind, body)\n"
        "render._write = write\n"
        "raise SystemExit(render.child_main(sys.argv[2:]))\n"
    )
    monkeypatch.setattr(triomail._bulk.render_process, "_BOOTSTRAP", garbage)
    n = 200
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    async with SMTPSink() as sink:
        common = sink_options(sink, tmp_path)
        common += ("--journal", journal, "--yes")
        assert await send_async(rows, tpl, *common, "--render", "process") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (error,) = [line for line in err.splitlines() if "error:" in line]
        assert "the render process wrote a frame that does not decode" in error
        state = Counter(r.state for r in records(journal))
        assert state == {"accepted": 16 + 32}  # its first two frames, nothing in flight
        assert sink.received == 48
        monkeypatch.undo()
        assert await send_async(rows, tpl, *common, "--resume") == 0
    assert all(r.state == "accepted" for r in records(journal))
    counts = Counter(sink_ids(sink))
    assert len(counts) == n and set(counts.values()) == {1}


async def test_render_process_ends_when_the_sender_is_killed(tmp_path: Path) -> None:
    """kill -9 of the sender: the render process (blocked on the full pipe) ends too."""
    rows, tpl = batch(tmp_path, 1000, BIG_TEMPLATE)
    async with SMTPSink(faults=[Fault(".", delay=0.002)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", tmp_path / "j.sqlite3", "--yes", "--render", "process")
        child = await start(tmp_path, "first", *common)
        await wait_until(lambda: sink.received >= 10)
        (renderer,) = render_processes(child.proc.pid)
        child.proc.kill()
        assert await finish(child) == -9
        await wait_until(lambda: not alive(renderer), 10)  # a broken pipe, not an orphan


def test_gc_thresholds_are_restored(tmp_path: Path) -> None:
    """A run raises the collector's thresholds (GC_THRESHOLDS) and puts them back."""
    import gc

    before = gc.get_threshold()
    rows, tpl = batch(tmp_path, 3)
    assert send(rows, tpl, "--dry-run") == 0
    assert gc.get_threshold() == before != GC_THRESHOLDS
