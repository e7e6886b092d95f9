"""The PostgreSQL journal in ``python -m bench.bulk`` (issue 15): ``--postgres``.

Three measurements on the same rows, template and Postfix ``smtp-sink``, each the
median of ``--runs``:

* one worker with the SQLite journal against one worker with a PostgreSQL journal on
  a private cluster (``initdb``/``pg_ctl`` in a temporary directory, as the tests do),
  in messages per second of wall time, with the run's ``--connections`` and with
  ``--pg-connections`` (32): each connection waits for its message's commit once a
  message (at most two messages of a connection are in flight, so that a crash leaves
  few in doubt), so a journal over the network needs more connections to hide its
  commit's latency;
* two workers against one on the same PostgreSQL campaign: the campaign's rows over
  the wall time until the last worker exits (the ratio depends on the CPU count, which
  is printed: every worker renders every row it plans);
* the CPU time (user + system, ``wait4``) of one SQLite worker per message, the
  journal's share of which is what the millisecond-lag change moved.

``BENCH_PG_BASELINE=DIR`` (a directory holding another ``triomail`` package, e.g.
``git -C MAIN archive HEAD triomail | tar -x -C DIR``) also runs one PostgreSQL worker
of that tree in each run, interleaved: before and after in one command.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["postgres_section"]


@dataclass
class _Timed:
    seconds: float
    cpu: float


def _send(
    rows: Path, template: Path, port: int, journal: str, connections: int, work: Path, name: str,
    tree: str | None = None,
) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [
        sys.executable, "-m", "triomail", "send", str(rows), str(template),
        "--server", f"smtp+plain://127.0.0.1:{port}", "--yes", "--journal", journal,
        "--connections", str(connections), "--progress-interval", "3600",
    ]  # fmt: skip
    log = (work / f"{name}.log").open("wb")
    env = None if tree is None else dict(os.environ, PYTHONPATH=tree)
    return subprocess.Popen(
        argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )


def _wait_all(procs: list[subprocess.Popen[bytes]], start: float) -> _Timed:
    cpu = 0.0
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"triomail send exited {proc.returncode} (see the work directory)")
        cpu += usage.ru_utime + usage.ru_stime
    return _Timed(time.perf_counter() - start, cpu)


def _run(
    workers: int, rows: Path, template: Path, port: int, journal: str, connections: int, work: Path,
    tree: str | None = None,
) -> _Timed:  # fmt: skip
    start = time.perf_counter()
    procs = [
        _send(rows, template, port, journal, connections, work, f"pg{i}", tree)
        for i in range(workers)
    ]
    return _wait_all(procs, start)


def postgres_section(
    work: Path,
    rows: Path,
    n: int,
    template: Path,
    port: int,
    connections: int,
    runs: int,
    wide: int = 32,
) -> None:
    """Print the PostgreSQL section (see the module's docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.postgres import pg_binaries, start_postgres

    if pg_binaries() is None:
        print("\nPostgreSQL: not installed (Debian package postgresql), section skipped")
        return
    sqlite: list[float] = []
    one: list[float] = []
    sqlite_wide: list[float] = []
    one_wide: list[float] = []
    two: list[float] = []
    cpu: list[float] = []
    baseline = os.environ.get("BENCH_PG_BASELINE")
    before: list[float] = []
    with start_postgres() as cluster:
        journal = work / "pg-bench.sqlite3"

        def fresh() -> str:
            for suffix in ("", "-wal", "-shm", ".wire"):
                Path(f"{journal}{suffix}").unlink(missing_ok=True)
            return str(journal)

        for i in range(runs):
            s = _run(1, rows, template, port, fresh(), connections, work)
            p1 = _run(1, rows, template, port, cluster.journal(f"one{i}"), connections, work)
            sw = _run(1, rows, template, port, fresh(), wide, work)
            pw = _run(1, rows, template, port, cluster.journal(f"wide{i}"), wide, work)
            sqlite_wide.append(n / sw.seconds)
            one_wide.append(n / pw.seconds)
            p2 = _run(2, rows, template, port, cluster.journal(f"two{i}"), connections, work)
            if baseline:
                b = _run(1, rows, template, port, cluster.journal(f"base{i}"), connections, work,
                         baseline)  # fmt: skip
                before.append(n / b.seconds)
                print(f"  run {i + 1} PostgreSQL, {baseline}: {n / b.seconds:7,.0f} msg/s")
            sqlite.append(n / s.seconds)
            one.append(n / p1.seconds)
            two.append(n / p2.seconds)
            cpu.append(s.cpu / n)
            print(
                f"  run {i + 1} journal: SQLite {n / s.seconds:7,.0f} msg/s, PostgreSQL "
                f"{n / p1.seconds:7,.0f} msg/s, two PostgreSQL workers {n / p2.seconds:7,.0f}; "
                f"{wide} connections: SQLite {n / sw.seconds:7,.0f}, PostgreSQL "
                f"{n / pw.seconds:7,.0f}",
                flush=True,
            )
    s_med, one_med, two_med = (statistics.median(v) for v in (sqlite, one, two))
    sw_med, pw_med = statistics.median(sqlite_wide), statistics.median(one_wide)
    print(
        f"\njournal, one worker, {n:,} rows, {connections} connections: SQLite {s_med:,.0f} "
        f"msg/s, PostgreSQL {one_med:,.0f} msg/s ({one_med / s_med:.2f}x SQLite)\n"
        f"journal, one worker, {wide} connections: SQLite {sw_med:,.0f} msg/s, PostgreSQL "
        f"{pw_med:,.0f} msg/s ({pw_med / sw_med:.2f}x SQLite)\n"
        f"two workers on one PostgreSQL campaign: {two_med:,.0f} msg/s, "
        f"{two_med / one_med:.2f}x one worker ({os.cpu_count()} CPUs, shared with the sink "
        f"and the database)\n"
        f"CPU per message of one SQLite worker (user + system, whole command): "
        f"{statistics.median(cpu) * 1e6:,.0f} us"
    )
    if before:
        b_med = statistics.median(before)
        print(
            f"PostgreSQL journal of {baseline}: {b_med:,.0f} msg/s ({b_med / s_med:.2f}x "
            f"SQLite; this tree {one_med / b_med:.2f}x that)"
        )
