"""The SQLite journal under a full disk and with a damaged file (issue 13, item 5).

The full disk is real: a small tmpfs mounted for the test (root only; skipped where
``mount`` is not permitted), grown again with ``mount -o remount`` to "free space".
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.campaign import campaign_files

from triomail.testing import CapturedMessage, SMTPSink


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the journal's reserve takes a quarter), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def send(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "triomail", "send", *(str(a) for a in args)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return await trio.run_process(
        cmd, capture_stdout=True, capture_stderr=True, check=False, env=env
    )  # type: ignore[return-value]


async def test_full_disk_then_resume_sends_nothing_twice(tmp_path: Path, small_disk: Path) -> None:
    n = 4_000
    rows, tpl = campaign_files(tmp_path, n)
    journal = small_disk / "j.sqlite3"
    got: collections.Counter[str] = collections.Counter()

    def seen(message: CapturedMessage) -> None:
        got.update(message.rcpt_to)

    async with SMTPSink(tls=False, store=False, on_message=seen) as sink:
        common = (rows, tpl, "--server", f"smtp+plain://{sink.host}:{sink.port}",
                  "--journal", journal, "--render", "inline", "--yes")  # fmt: skip
        first = await send(*common)
        err = first.stderr.decode()
        assert first.returncode == 2, err
        assert "the disk is full" in err
        assert "Traceback" not in err and "rollback" not in err
        assert 0 < len(got) < n, err  # it stopped part of the way
        await trio.run_process(["mount", "-o", "remount,size=64m", str(small_disk)])
        again = await send(*common, "--resume")
        assert again.returncode == 0, again.stderr.decode()
    assert len(got) == n  # everything sent...
    assert max(got.values()) == 1  # ...and nothing twice


async def test_damaged_journal_is_one_line(tmp_path: Path) -> None:
    rows, tpl = campaign_files(tmp_path, 300)
    journal = tmp_path / "j.sqlite3"
    async with SMTPSink(tls=False, store=False) as sink:
        common = (rows, tpl, "--server", f"smtp+plain://{sink.host}:{sink.port}",
                  "--journal", journal, "--render", "inline", "--yes")  # fmt: skip
        assert (await send(*common)).returncode == 0
        data = bytearray(journal.read_bytes())
        page = 4096
        assert len(data) > 3 * page
        data[2 * page : 3 * page] = b"\xa5" * page  # a page in the middle, not the header
        journal.write_bytes(bytes(data))
        damaged = await send(*common, "--resume")
    err = damaged.stderr.decode()
    assert damaged.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "journal" in err, err
