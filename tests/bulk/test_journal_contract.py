"""The journal contract: the same tests against the SQLite and the PostgreSQL journal.

The PostgreSQL runs use a private cluster (tests/helpers/postgres.py), one campaign
per test; every test here must pass on both stores (the send command sees only
:class:`triomail._bulk.journal.BaseJournal`).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.postgres import Cluster, postgres

from triomail._bulk.journal import BaseJournal, JournalError, Settled, open_journal

__all__ = ["postgres"]

_names = itertools.count()
Target = Callable[[], str]


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A factory of the journal's ``--journal`` value (the same each call)."""
    if request.param == "sqlite":
        path = str(tmp_path / "j.sqlite3")
        return lambda: path
    cluster: Cluster = request.getfixturevalue("postgres")
    url = cluster.journal(f"contract{next(_names)}")
    return lambda: url


def entries(n: int, start: int = 0) -> list[tuple[str, int, str, str]]:
    return [(f"k{i}", i + 2, "c1", f"<m{i}@example.com>") for i in range(start, start + n)]


def opened(target: Target, *, resume: bool = False) -> tuple[BaseJournal, dict[str, int]]:
    return open_journal(target(), resume=resume, content="c1")


def test_claim_record_lookup(target: Target) -> None:
    journal, counts = opened(target)
    assert sum(counts.values()) == 0
    assert journal.claim(entries(3)) == ["k0", "k1", "k2"]
    assert journal.counts()["in-flight"] == 3
    journal.record(Settled("k0", "accepted", 1, 250, "2.0.0", "Ok", ("a@example.com",)))
    journal.record(Settled("k1", "transient", 2, 451, "4.3.0", "Later", ()))
    journal.flush()
    found = journal.lookup(["k0", "k1", "k2", "nope"])
    assert set(found) == {"k0", "k1", "k2"}
    assert found["k0"].state == "accepted"
    assert found["k0"].done == ("a@example.com",)
    assert found["k0"].message_id == "<m0@example.com>"
    assert found["k1"].attempts == 2
    assert found["k2"].state == "in-flight"
    assert [r.key for r in journal.records()] == ["k0", "k1", "k2"]
    journal.close()


def test_resume_keeps_the_campaign(target: Target) -> None:
    journal, _ = opened(target)
    campaign, run = journal.campaign, journal.run
    journal.claim(entries(2))
    journal.close()
    journal, counts = opened(target, resume=True)
    assert counts["in-flight"] == 2
    assert journal.run > run
    assert journal.campaign == campaign  # Message-IDs stay stable across runs
    journal.close()


def test_resume_without_journal_is_an_error(target: Target) -> None:
    with pytest.raises(JournalError, match="resume"):
        opened(target, resume=True)


def test_release_returns_unsent_claims_to_pending(target: Target) -> None:
    journal, _ = opened(target)
    journal.claim(entries(3))
    journal.record(Settled("k0", "accepted", 1, 250, None, "ok", ()))
    journal.release(["k0", "k1", "k2"])  # k0 is already final: untouched
    states = {k: r.state for k, r in journal.lookup(["k0", "k1", "k2"]).items()}
    assert states == {"k0": "accepted", "k1": "pending", "k2": "pending"}
    assert journal.in_flight_of_this_run() == 0
    journal.close()


def test_an_outcome_in_the_commit_of_its_mark_wins(target: Target) -> None:
    """A message refused before its content (a 550 to its only RCPT) may have its
    outcome committed together with its in-flight mark: the row ends refused, whatever
    the order the store applies them in, many times over."""
    journal, _ = opened(target)
    keys = [key for key, *_ in entries(40)]
    assert journal.reserve(entries(40)) == keys
    for key in keys:
        journal.record(Settled(key, "permanent", 1, 550, "5.1.1", "no such user", ()))
    journal.commit_wire(keys)
    assert {r.state for r in journal.lookup(keys).values()} == {"permanent"}
    journal.close()


def test_mark(target: Target) -> None:
    journal, _ = opened(target)
    journal.mark(entries(2), "unknown")
    assert journal.counts()["unknown"] == 2
    journal.close()


def test_a_killed_process_leaves_claims_in_flight(target: Target) -> None:
    """kill -9 equivalent (os._exit): committed claims survive, unflushed outcomes don't."""
    script = textwrap.dedent(
        f"""
        import os
        from triomail._bulk.journal import Settled, open_journal
        j, _ = open_journal({target()!r}, resume=False, content="c1")
        j.batch_seconds = 3600
        j.claim([(f"k{{i}}", i, "c", f"<m{{i}}@x>") for i in range(5)])
        j.record(Settled("k0", "accepted", 1, 250, None, "ok", ()))
        j.flush()
        j.record(Settled("k1", "accepted", 1, 250, None, "ok", ()))  # never committed
        os._exit(9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 9
    journal, counts = opened(target, resume=True)
    assert counts["accepted"] == 1
    assert counts["in-flight"] == 4
    journal.close()


# -- what only a shared journal does -------------------------------------------------------


def test_workers_claim_disjoint_rows_and_load_once(postgres: Cluster) -> None:
    """Five workers opened at once on one campaign: each row claimed by exactly one."""

    url = postgres.journal("five")
    won: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            journal, _ = open_journal(url, resume=False, content="c1")
            got: list[str] = []
            for start in range(0, 200, 20):
                got += journal.claim(entries(20, start))
            won.append(got)
            journal.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    claimed = [k for got in won for k in got]
    assert sorted(claimed) == sorted(f"k{i}" for i in range(200))  # once each
    journal, counts = open_journal(url, resume=False, content="c1")
    assert sum(counts.values()) == 200  # loaded once
    journal.close()


def test_lease_expiry_takeover_and_fencing(postgres: Cluster) -> None:
    url = postgres.journal("fence")
    stalled, _ = open_journal(url, resume=False, content="c1", lease=0.2)
    assert stalled.claim(entries(2)) == ["k0", "k1"]
    other, _ = open_journal(url, resume=False, content="c1", lease=30)
    assert other.claim(entries(2)) == []  # leased
    assert other.takeover_wait() is not None

    time.sleep(0.3)
    assert other.takeover_keys() == {"k0", "k1"}
    assert other.claim(entries(2)) == ["k0", "k1"]  # taken over
    other.record(Settled("k0", "accepted", 1, 250, None, "by the other", ()))
    other.flush()
    # The stalled worker wakes up: its late outcomes are refused (fencing).
    stalled.record(Settled("k0", "permanent", 1, 550, None, "late", ()))
    stalled.record(Settled("k1", "accepted", 1, 250, None, "late", ()))
    stalled.flush()
    assert stalled.stale == 2
    found = other.lookup(["k0", "k1"])
    assert found["k0"].state == "accepted" and found["k1"].state == "in-flight"
    other.record(Settled("k1", "accepted", 1, 250, None, "ok", ()))
    other.flush()
    assert other.takeover_wait() is None
    stalled.close()
    other.close()


def test_url_checks(postgres: Cluster) -> None:
    with pytest.raises(JournalError, match="password"):
        open_journal(f"postgresql://u:secret@127.0.0.1:{postgres.port}/x?campaign=a", resume=False)
    with pytest.raises(JournalError, match="campaign=NAME"):
        open_journal(postgres.url, resume=False)
    with pytest.raises(JournalError, match="cannot open journal"):
        open_journal("postgresql://nobody@127.0.0.1:1/x?campaign=a", resume=False)


def test_changed_template_is_refused(postgres: Cluster) -> None:
    url = postgres.journal("changed")
    journal, _ = open_journal(url, resume=False, content="c1")
    journal.close()
    with pytest.raises(JournalError, match="another template"):
        open_journal(url, resume=False, content="c2")
    journal, _ = open_journal(url, resume=True, content="c2")
    assert journal.previous_content == "c1"
    journal.close()


def test_rows_going_on_the_wire_survive_a_kill(target: Target) -> None:
    """What :meth:`on_wire` and :meth:`committed` returned is kept by a kill -9, with
    the outcomes recorded before it; a row only asked for ahead is not in flight."""
    script = textwrap.dedent(
        f"""
        import os, trio
        from triomail._bulk.journal import Settled, open_journal
        j, _ = open_journal({target()!r}, resume=False, content="c1")
        j.batch_seconds = 3600
        j.reserve([(f"k{{i}}", i, "c", f"<m{{i}}@x>") for i in range(5)])

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(j.background)
                await trio.sleep(0.01)
                await j.on_wire(["k0", "k1"])
                j.record(Settled("k0", "accepted", 1, 250, None, "ok", ()))
                j.request(["k2"])
                while not j.wired(["k2"]):
                    await trio.sleep(0.001)
                os._exit(9)

        trio.run(main)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 9
    journal, counts = opened(target, resume=True)
    assert counts["accepted"] == 1
    assert counts["in-flight"] == 2
    assert counts["pending"] == 2
    journal.close()


def test_the_sqlite_redo_log_is_read_by_status_and_replayed(tmp_path: Path) -> None:
    """The SQLite journal's marks in flight live in ``JOURNAL.wire`` until its next
    commit: ``triomail status`` (peek) counts them, opening replays them, and a last
    line a crash cut short is ignored."""
    from triomail._bulk.journal import Journal
    from triomail._bulk.journal.wirelog import log_path, read

    path = tmp_path / "j.sqlite3"
    journal, _ = Journal.open(path, resume=False)
    journal.reserve(entries(4))
    journal.wire_now(["k0", "k1"])
    journal.record(Settled("k0", "accepted", 1, 250, None, "ok", ()))
    journal.wire_now(["k2"])
    # A crash in the middle of an append: the line is there but for its first byte,
    # still the NUL that ends the log, so it is not read (and k3 was never sent).
    with log_path(path).open("r+b") as log:
        end = log.read().index(0)
        log.seek(end + 1)
        log.write(b'["w", 1.0, "k3"]]\n\0')
    by_state = Journal.peek(path).by_run[journal.run]
    assert (by_state["accepted"], by_state["in-flight"], by_state["pending"]) == (1, 2, 1)
    # A crash: nothing committed on the way out.
    journal._conn.close()
    assert journal._log is not None
    journal._log.close()
    journal, counts = Journal.open(path, resume=True)
    assert (counts["accepted"], counts["in-flight"], counts["pending"]) == (1, 2, 1)
    assert list(read(log_path(path))) == []  # replayed into the database
    journal.close()
    assert not log_path(path).exists()
