"""Item 10's leftovers (issue 13): Ctrl-C under a very low --rate exits at once, and
--limit says how many rows it left unsent."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
import trio
from test_cli_send import batch, sink_ids, sink_options
from test_cli_send_process import finish, start, wait_until

from triomail._cli import main
from triomail.testing import SMTPSink


async def test_ctrl_c_does_not_wait_for_the_rate(tmp_path: Path) -> None:
    """At 0.001 message/s the second message is 1,000 s away: the first Ctrl-C must not
    wait for it (before the fix it never exited); --resume then sends each row once."""
    n = 20
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    async with SMTPSink() as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path), "--journal", journal, "--yes")
        child = await start(tmp_path, "slow", *common, "--rate", "0.001")
        await wait_until(lambda: sink.received >= 1)
        await trio.sleep(0.5)  # the workers now wait for the rate
        child.proc.send_signal(signal.SIGINT)
        assert await finish(child, 15) == 130, child.stderr
        assert "Traceback" not in child.stderr
        child = await start(tmp_path, "resume", *common, "--resume")
        assert await finish(child) == 0, child.stderr
    counts = Counter(sink_ids(sink))
    assert len(counts) == n and set(counts.values()) == {1}


def test_limit_names_the_rows_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, tpl = batch(tmp_path, 200)
    assert main(["send", str(rows), str(tpl), "--sink", str(tmp_path / "out"), "--limit", "5"]) == 0
    err = capsys.readouterr().err
    assert "--limit 5: stopped after line 6; about 195 more row(s) were not sent" in err
    assert len(list((tmp_path / "out").glob("*.eml"))) == 5


def test_a_limit_that_covers_the_file_says_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, tpl = batch(tmp_path, 3)
    assert main(["send", str(rows), str(tpl), "--sink", str(tmp_path / "out"), "--limit", "3"]) == 0
    assert "--limit" not in capsys.readouterr().err
