"""The SQLite journal: states, batched commits, resume lookups, crash consistency."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from triomail._bulk.journal import Journal, JournalError, Settled


def entries(n: int, start: int = 0) -> list[tuple[str, int, str, str]]:
    return [(f"k{i}", i + 2, "c1", f"<m{i}@example.com>") for i in range(start, start + n)]


def test_fresh_journal_claim_record_lookup(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal, counts = Journal.open(path, resume=False, content="c1")
    assert sum(counts.values()) == 0
    assert journal.run == 1
    journal.claim(entries(3))
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
    journal.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_existing_journal_needs_resume(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal, _ = Journal.open(path, resume=False)
    campaign = journal.campaign
    journal.claim(entries(2))
    journal.close()
    with pytest.raises(JournalError, match="use --resume"):
        Journal.open(path, resume=False)
    journal, counts = Journal.open(path, resume=True)
    assert counts["in-flight"] == 2
    assert journal.run == 2
    assert journal.campaign == campaign  # Message-IDs stay stable across runs
    journal.close()


def test_resume_without_journal_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="nothing to resume"):
        Journal.open(tmp_path / "none.sqlite3", resume=True)


def test_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError):
        Journal.open(path, resume=True)


def test_outcomes_are_committed_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal, _ = Journal.open(path, resume=False)
    journal.batch_seconds = 3600
    journal.batch_size = 10
    journal.claim(entries(25))
    reader = sqlite3.connect(path)

    def accepted() -> int:
        return int(
            reader.execute("SELECT count(*) FROM messages WHERE state='accepted'").fetchone()[0]
        )

    for i in range(9):
        journal.record(Settled(f"k{i}", "accepted", 1, 250, None, "ok", ()))
    assert accepted() == 0  # buffered
    journal.record(Settled("k9", "accepted", 1, 250, None, "ok", ()))
    assert accepted() == 10  # one commit for the batch
    journal.claim(entries(1, start=25))  # a claim commits buffered outcomes too
    journal.record(Settled("k10", "accepted", 1, 250, None, "ok", ()))
    journal.claim(entries(1, start=26))
    assert accepted() == 11
    reader.close()
    journal.close()


def test_release_returns_unsent_claims_to_pending(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path / "j.sqlite3", resume=False)
    journal.claim(entries(3))
    journal.record(Settled("k0", "accepted", 1, 250, None, "ok", ()))
    journal.release(["k0", "k1", "k2"])  # k0 is already final: untouched
    states = {k: r.state for k, r in journal.lookup(["k0", "k1", "k2"]).items()}
    assert states == {"k0": "accepted", "k1": "pending", "k2": "pending"}
    journal.close()


def test_mark_and_in_memory_journal() -> None:
    journal, _ = Journal.open(None, resume=False)
    journal.mark(entries(2), "unknown")
    assert journal.counts()["unknown"] == 2
    journal.close()


def test_a_killed_process_leaves_claims_in_flight(tmp_path: Path) -> None:
    """kill -9 equivalent (os._exit): committed claims survive, unflushed outcomes don't."""
    path = tmp_path / "j.sqlite3"
    script = textwrap.dedent(
        f"""
        import os
        from triomail._bulk.journal import Journal, Settled
        j, _ = Journal.open({str(path)!r}, resume=False)
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
    journal, counts = Journal.open(path, resume=True)
    assert counts["accepted"] == 1
    assert counts["in-flight"] == 4
    journal.close()


def test_without_rowid_journal_of_an_earlier_version(tmp_path: Path) -> None:
    """Journals made with the earlier WITHOUT ROWID layout resume the same way."""
    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE messages (
                key TEXT PRIMARY KEY, line INTEGER NOT NULL, content TEXT NOT NULL,
                message_id TEXT NOT NULL, state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, code INTEGER, enhanced TEXT, text TEXT,
                done TEXT, run INTEGER NOT NULL, updated REAL NOT NULL
            ) WITHOUT ROWID;
            INSERT INTO meta VALUES ('schema', '1'), ('campaign', 'abc'), ('runs', '1');
            INSERT INTO messages (key, line, content, message_id, state, run, updated)
                VALUES ('k0', 2, 'c1', '<m0@example.com>', 'in-flight', 1, 0);
            """
        )
    journal, counts = Journal.open(path, resume=True)
    assert counts["in-flight"] == 1 and journal.campaign == "abc" and journal.run == 2
    journal.claim(entries(2))
    journal.record_outcome("k0", "accepted", 1, 250, "2.0.0", "2.0.0 Ok", None)
    journal.record_outcome("k1", "transient", 1, 451, "4.3.0", "4.3.0 Later", ["a@example.com"])
    journal.flush()
    found = journal.lookup(["k0", "k1"])
    assert found["k0"].state == "accepted" and found["k0"].run == 2
    assert found["k1"].state == "transient" and found["k1"].done == ("a@example.com",)
    journal.close()
    with sqlite3.connect(path) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name='messages'").fetchone()
    assert "WITHOUT ROWID" in sql  # left as it was


def test_new_journal_is_a_rowid_table(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path / "j.sqlite3", resume=False)
    journal.claim(entries(3))
    with pytest.raises(sqlite3.IntegrityError):  # the key stays unique
        journal._conn.execute(
            "INSERT INTO messages (key, line, content, message_id, state, run, updated) "
            "VALUES ('k0', 9, 'c', '<x@y>', 'pending', 1, 0)"
        )
    rowids = [r for (r,) in journal._conn.execute("SELECT rowid FROM messages ORDER BY rowid")]
    assert rowids == [1, 2, 3]  # appended in claim order
    journal.close()
