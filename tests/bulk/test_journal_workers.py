"""Several ``triomail send`` workers share one campaign on PostgreSQL.

Each worker is a real process (``python -m triomail send``) sending to a capture server
run here (:class:`triomail.testing.SMTPSink`, which counts what it accepts per
recipient: every row has its own address); the journal is a private PostgreSQL
cluster (tests/helpers/postgres.py). The failure cases are real signals: SIGKILL,
SIGSTOP past the lease then SIGCONT, and the database restarted mid-campaign.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from helpers.campaign import campaign_files
from helpers.postgres import Cluster, postgres

from triomail._bulk.journal import open_journal
from triomail.testing import CapturedMessage, SMTPSink

__all__ = ["postgres"]

#: Rows of the three-worker campaign.
ROWS = 30_000
_names = itertools.count()


class Counting:
    """A capture server that counts the messages it accepts, per recipient."""

    def __init__(self, **faults: object) -> None:
        self.got: collections.Counter[str] = collections.Counter()
        self.times: list[float] = []  # when each message was accepted
        self.total = 0
        self._waiting: list[tuple[int, trio.Event]] = []
        self.sink = SMTPSink(
            tls=False, store=False, max_connections=256, on_message=self._seen, **faults
        )  # type: ignore[arg-type]

    def _seen(self, message: CapturedMessage) -> None:
        self.times.append(time.monotonic())
        self.got.update(message.rcpt_to)
        self.total += len(message.rcpt_to)
        for n, event in self._waiting:
            if self.total >= n:
                event.set()

    async def wait_for(self, n: int) -> None:
        """Until at least ``n`` messages were accepted."""
        event = trio.Event()
        if self.total < n:
            self._waiting.append((n, event))
            await event.wait()

    @property
    def server(self) -> str:
        return f"smtp+plain://{self.sink.host}:{self.sink.port}"


class Worker:
    """One ``triomail send`` process."""

    def __init__(self, proc: trio.Process, out: Path, err: Path, report: Path) -> None:
        self.proc, self.out, self.err, self.report = proc, out, err, report

    def accepted(self) -> int:
        """The "accepted" line of its summary."""
        for line in self.out.read_text().splitlines():
            if line.startswith("accepted"):
                return int(line.split()[-1].replace(",", ""))
        raise AssertionError(f"no summary: {self.out.read_text()} {self.err.read_text()}")

    def reported(self, outcome: str = "accepted") -> list[str]:
        """The recipients of its report's messages with that outcome."""
        found = []
        for line in self.report.read_text().splitlines():
            obj = json.loads(line)
            if obj["type"] == "message" and obj["outcome"] == outcome:
                found.extend(obj["recipients"])
        return found


async def start_worker(
    tmp_path: Path, server: str, journal: str, *extra: str, name: str | None = None
) -> Worker:
    rows, tpl = tmp_path / "rows.csv", tmp_path / "template.txt"
    name = name or f"w{next(_names)}"
    out, err, report = (tmp_path / f"{name}.{x}" for x in ("out", "err", "jsonl"))
    args: Sequence[str] = [
        sys.executable, "-m", "triomail", "send", str(rows), str(tpl), "--server", server,
        "--journal", journal, "--yes", "--render", "inline", "--connections", "4",
        "--retry-backoff", "0.05", "--report", str(report), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    with out.open("wb") as o, err.open("wb") as e:
        proc = await trio.lowlevel.open_process(args, stdout=o, stderr=e, env=env)
    return Worker(proc, out, err, report)


def status(journal: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "triomail", "status", journal],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def final_counts(journal: str) -> dict[str, int]:
    j, counts = open_journal(journal, resume=True)
    j.close()
    return counts


async def test_three_workers_share_a_campaign(postgres: Cluster, tmp_path: Path) -> None:
    campaign_files(tmp_path, ROWS)
    journal = postgres.journal(f"three{next(_names)}")
    counting = Counting()
    async with counting.sink:
        workers = [await start_worker(tmp_path, counting.server, journal) for _ in range(3)]
        for w in workers:
            assert await w.proc.wait() == 0, w.err.read_text()
    assert len(counting.got) == ROWS
    assert set(counting.got.values()) == {1}  # every row accepted exactly once
    assert sum(w.accepted() for w in workers) == ROWS  # the summaries add up
    assert all(w.accepted() > 0 for w in workers)  # the rows were shared
    assert final_counts(journal)["accepted"] == ROWS
    text = status(journal)
    assert f"accepted {ROWS:,}" in " ".join(text.split())
    for w in workers:
        assert f"{w.accepted():,}" in text


async def test_a_campaign_rate_holds_for_all_workers_together(
    postgres: Cluster, tmp_path: Path
) -> None:
    """``--campaign-rate``: two workers share one rate, held in the database."""
    rows, rate = 600, 200.0
    campaign_files(tmp_path, rows)
    journal = postgres.journal(f"rate{next(_names)}")
    counting = Counting()
    async with counting.sink:
        workers = [
            await start_worker(tmp_path, counting.server, journal, "--campaign-rate", "200")
            for _ in range(2)
        ]
        for w in workers:
            assert await w.proc.wait() == 0, w.err.read_text()
    assert len(counting.got) == rows and set(counting.got.values()) == {1}
    assert all(w.accepted() > 0 for w in workers)  # both sent, at one shared rate
    times = sorted(counting.times)
    # Unpaced, the two send these rows in well under a second here. Paced, no second
    # holds more than the rate and one block (a tenth of a second) of each worker, give
    # or take a quarter of a second of arrivals bunched by a busy machine.
    assert times[-1] - times[0] >= (rows - 2 * 20) / rate
    most = max(sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times))
    assert most <= 1.25 * rate + 2 * 20


async def test_a_campaign_rate_needs_a_shared_journal(tmp_path: Path) -> None:
    rows, tpl = campaign_files(tmp_path, 3)
    proc = await trio.run_process(
        [sys.executable, "-m", "triomail", "send", str(rows), str(tpl), "--sink",
         str(tmp_path / "out"), "--campaign-rate", "10", "--yes"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert b"--campaign-rate needs a shared journal" in proc.stderr


def in_flight_of(journal: str, pid: int) -> set[str]:
    """The recipients of the rows a worker (by pid) holds in flight now."""
    import psycopg

    url, _, name = journal.partition("?campaign=")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT m.line FROM triomail_messages m JOIN triomail_workers w "
            "ON w.name = m.name AND w.run = m.run "
            "WHERE m.name = %s AND w.pid = %s AND m.state = 'in-flight'",
            (name, pid),
        ).fetchall()
    return {f"user{line - 2}@example.com" for (line,) in rows}


async def test_a_killed_worker_is_taken_over(postgres: Cluster, tmp_path: Path) -> None:
    n = 3_000
    campaign_files(tmp_path, n)
    journal = postgres.journal(f"kill{next(_names)}")
    counting = Counting()
    lease = ("--lease", "3")
    async with counting.sink:
        victim = await start_worker(tmp_path, counting.server, journal, *lease)
        await counting.wait_for(200)
        others = [await start_worker(tmp_path, counting.server, journal, *lease) for _ in range(2)]
        await counting.wait_for(600)
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        unknown = in_flight_of(journal, victim.proc.pid)  # before its lease expires
        for w in others:
            assert await w.proc.wait() == 0, w.err.read_text()
    assert len(counting.got) == n  # nothing lost
    duplicates = {r for r, c in counting.got.items() if c > 1}
    assert unknown  # it had rows in flight, taken over by the others
    # Every duplicate is a row the journal reported unknown (in flight) for the victim.
    assert duplicates <= unknown
    assert final_counts(journal)["accepted"] == n


async def test_a_stalled_worker_is_fenced_off(postgres: Cluster, tmp_path: Path) -> None:
    n = 2_000
    campaign_files(tmp_path, n)
    journal = postgres.journal(f"stop{next(_names)}")
    counting = Counting()
    async with counting.sink:
        stalled = await start_worker(
            tmp_path, counting.server, journal, "--lease", "1", "--rate", "200"
        )
        await counting.wait_for(100)
        stalled.proc.send_signal(signal.SIGSTOP)
        other = await start_worker(tmp_path, counting.server, journal, "--lease", "1")
        assert await other.proc.wait() == 0, other.err.read_text()
        stalled.proc.send_signal(signal.SIGCONT)
        await stalled.proc.wait()
    assert len(counting.got) == n  # nothing lost
    counts = final_counts(journal)
    assert counts["accepted"] == n  # no late write overwrote an outcome
    assert counts["in-flight"] == 0
    # Its late outcomes were refused by the fencing counter and named as duplicates.
    duplicates = sum(c - 1 for c in counting.got.values())
    if duplicates:
        assert "possible duplicate" in stalled.err.read_text() + stalled.out.read_text()


async def test_postgres_restarted_mid_campaign(postgres: Cluster, tmp_path: Path) -> None:
    n = 3_000
    campaign_files(tmp_path, n)
    journal = postgres.journal(f"restart{next(_names)}")
    counting = Counting()
    async with counting.sink:
        workers = [
            await start_worker(tmp_path, counting.server, journal, "--rate", "300")
            for _ in range(2)
        ]
        await counting.wait_for(300)
        await trio.to_thread.run_sync(postgres.restart)
        codes = [await w.proc.wait() for w in workers]
        assert set(codes) <= {0, 2}, [w.err.read_text() for w in workers]
        if 2 in codes:  # stopped with one clear line: --resume finishes
            for w in workers:
                assert "Traceback" not in w.err.read_text()
            again = await start_worker(tmp_path, counting.server, journal, "--resume")
            assert await again.proc.wait() in (0, 1), again.err.read_text()
    assert len(counting.got) == n  # nothing lost
    assert final_counts(journal)["accepted"] == n


def in_flight(journal: str) -> int:
    """Rows in flight, read without changing the journal."""
    from triomail._bulk.journal import Journal
    from triomail._bulk.journal.pg_sql import peek

    snap = peek(journal) if journal.startswith("postgresql:") else Journal.peek(Path(journal))
    return sum(counts["in-flight"] for counts in snap.by_run.values())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("at_most_once", [False, True])
async def test_kill_9_leaves_little_in_doubt(
    request: pytest.FixtureRequest, tmp_path: Path, at_most_once: bool, backend: str
) -> None:
    """kill -9 at full speed, then --resume: the unknown rows are what was on the wire."""
    n, connections = 3_000, 10
    campaign_files(tmp_path, n)
    common: tuple[str, ...] = ("--connections", str(connections))
    if backend == "postgres":
        cluster: Cluster = request.getfixturevalue("postgres")
        journal = cluster.journal(f"k9{next(_names)}")
        common += ("--lease", "0.5")
    else:
        journal = str(tmp_path / "j.sqlite3")
    counting = Counting()
    async with counting.sink:
        victim = await start_worker(tmp_path, counting.server, journal, *common)
        await counting.wait_for(n // 3)
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        unknown = in_flight(journal)
        await trio.sleep(0.6)  # a shared journal's leases expire
        extra = ("--at-most-once",) if at_most_once else ()
        again = await start_worker(tmp_path, counting.server, journal, *common, "--resume", *extra)
        assert await again.proc.wait() in (0, 1), again.err.read_text()
    assert unknown <= 2 * connections
    duplicates = sum(c - 1 for c in counting.got.values())
    never = n - len(counting.got)
    print(f"kill -9, {backend}: {unknown} unknown, {duplicates} duplicates, {never} never sent")
    if at_most_once:
        assert never <= 2 * connections
    else:
        assert never == 0
    assert duplicates <= 2 * connections
