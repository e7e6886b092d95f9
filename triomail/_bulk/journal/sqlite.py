"""The embedded journal: one SQLite row per message, so a batch can be resumed safely.

Theory of operation
-------------------
The states and their meaning are :mod:`.base`'s. A message is marked *in-flight* in
a committed transaction **before** it is handed to the pool (:meth:`Journal.claim`,
one transaction per chunk of messages), and its final state is recorded when the pool
reports it (:meth:`Journal.record`, buffered and committed in batches, so SQLite does
not cap throughput). After a crash or ``kill -9`` a message is therefore never
"forgotten": it is either final, or still in-flight, which ``--resume`` treats as an
unknown outcome (R37, R38): resend with the same Message-ID (at-least-once, the
default), or skip (``--at-most-once``). Accepted and permanently refused messages are
never sent again; per-recipient outcomes are kept so that a message that was accepted
for some recipients is resent only to the others.

The database runs in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the process being killed (only a power loss can roll back the last commits,
which then look in-flight or pending, never accepted).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .base import STATES, BaseJournal, Entry, JournalError, Record, Snapshot, State

__all__ = ["Journal"]

_SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    key TEXT NOT NULL UNIQUE,    -- row identity: hash of the row's fields
    line INTEGER NOT NULL,       -- line number in the recipients file (last seen)
    content TEXT NOT NULL,       -- content hash: the template's digest
    message_id TEXT NOT NULL,    -- stable across retries and --resume
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    code INTEGER,
    enhanced TEXT,
    text TEXT,                   -- the deciding reply's lines as received, or the error
    done TEXT,                   -- JSON list of recipients with a final outcome
    run INTEGER NOT NULL,        -- the run that last touched the message
    updated REAL NOT NULL
);
"""
# A rowid table (not WITHOUT ROWID, keyed by the random-looking row hash): a claim
# appends rows at the end of the table and an outcome updates recently appended ones,
# so a commit writes a few table pages (plus the small key index) instead of one page
# per message scattered over the whole table. Journals made with the WITHOUT ROWID
# layout work the same (every statement goes through the key).


class Journal(BaseJournal):
    """An open SQLite journal. Use :meth:`open`; call :meth:`close` (or use ``with``)."""

    def __init__(self, conn: sqlite3.Connection, path: Path | None, run: int, campaign: str):
        self._conn = conn
        self.path = path
        self.run = run
        #: Random per journal: part of every Message-ID, so two batches never share one.
        self.campaign = campaign
        self._pending: list[tuple[object, ...]] = []
        self._last_commit = time.monotonic()
        #: Commit buffered outcomes after this many, or this many seconds.
        self.batch_size = 500
        self.batch_seconds = 0.25

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        resume: bool,
        source: str = "",
        content: str = "",
    ) -> tuple[Journal, dict[str, int]]:
        """Open (or create) the journal; return it and the state counts found in it.

        ``path=None`` keeps the journal in memory (dry runs, the capture server).
        Without ``resume``, a journal that already records messages is refused: it
        belongs to an earlier batch that may be half sent.
        """
        where = None if path is None else Path(path)
        existed = where is not None and where.exists() and where.stat().st_size > 0
        if resume and not existed:
            raise JournalError(f"--resume: no journal at {where}; nothing to resume")
        try:
            conn = sqlite3.connect(
                ":memory:" if where is None else str(where),
                isolation_level=None,
                check_same_thread=False,
            )
            if where is not None:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                # 16 MiB of page cache: a million random keys stay mostly in memory.
                conn.execute("PRAGMA cache_size=-16384")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {where}: {exc}") from None
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        counts = cls._count(conn)
        if meta and meta.get("schema") != _SCHEMA_VERSION:
            conn.close()
            raise JournalError(f"{where}: not a triomail journal (schema {meta.get('schema')})")
        if sum(counts.values()) and not resume:
            conn.close()
            summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            raise JournalError(
                f"journal {where} already records an earlier batch ({summary}); "
                "use --resume to continue it, or --journal NEW_PATH (or delete it) to start over"
            )
        campaign = meta.get("campaign") or secrets.token_hex(6)
        run = int(meta.get("runs", "0")) + 1
        conn.execute("BEGIN")
        for name, value in (
            ("schema", _SCHEMA_VERSION),
            ("campaign", campaign),
            ("runs", str(run)),
            ("source", source),
            ("content", content),
        ):
            conn.execute(
                "INSERT INTO meta VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                (name, value),
            )
        conn.execute("COMMIT")
        journal = cls(conn, where, run, campaign)
        journal.previous_content = meta.get("content", "")
        return journal, counts

    @staticmethod
    def peek(path: Path) -> Snapshot:
        """The journal's states by run, read-only (``triomail status``)."""
        if not path.is_file():
            raise JournalError(f"no journal at {path}")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            with contextlib.closing(conn):
                meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                rows = conn.execute(
                    "SELECT run, state, count(*) FROM messages GROUP BY run, state"
                ).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {path}: {exc}") from None
        by_run: dict[int, dict[str, int]] = {}
        for run, state, n in rows:
            by_run.setdefault(run, dict.fromkeys(STATES, 0))[state] = n
        return Snapshot(meta.get("campaign", "?"), by_run, {})

    @property
    def where(self) -> str:
        return "(in memory)" if self.path is None else str(self.path)

    @staticmethod
    def _count(conn: sqlite3.Connection) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, n in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
            counts[state] = n
        return counts

    def counts(self) -> dict[str, int]:
        self.flush()
        return self._count(self._conn)

    def close(self) -> None:
        self.flush()
        if self.path is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    # ----------------------------------------------------------------- messages

    def lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        """The records of those keys that the journal has."""
        found: dict[str, Record] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._conn.execute(
                "SELECT key, line, content, message_id, state, attempts, done, run "
                f"FROM messages WHERE key IN ({marks})",
                chunk,
            ):
                done = tuple(json.loads(row[6])) if row[6] else ()
                found[row[0]] = Record(row[0], row[1], row[2], row[3], row[4], row[5], done, row[7])
        return found

    def records(self) -> list[Record]:
        """Every record, in line order (for tests and inspection; loads them all)."""
        self.flush()
        keys = [k for (k,) in self._conn.execute("SELECT key FROM messages ORDER BY line")]
        found = self.lookup(keys)
        return [found[k] for k in keys]

    def claim(self, entries: Iterable[Entry]) -> list[str]:
        """Mark messages in-flight and commit (with any buffered outcomes) at once.

        ``entries`` are ``(key, line, content, message_id)``; one process owns the file,
        so every key is claimed. After this returns, a crash leaves these messages
        in-flight, never forgotten.
        """
        now = time.time()
        rows = [(key, line, content, mid, self.run, now) for key, line, content, mid in entries]
        conn = self._conn
        conn.execute("BEGIN")
        try:
            self._write_outcomes()
            conn.executemany(
                "INSERT INTO messages (key, line, content, message_id, state, run, updated) "
                "VALUES (?, ?, ?, ?, 'in-flight', ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET state='in-flight', line=excluded.line, "
                "content=excluded.content, run=excluded.run, updated=excluded.updated",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._last_commit = time.monotonic()
        return [row[0] for row in rows]

    def mark(self, entries: Iterable[Entry], state: State) -> None:
        """Record messages that were not sent in this run (e.g. skipped unknowns)."""
        now = time.time()
        rows = [
            (key, line, content, mid, state, self.run, now) for key, line, content, mid in entries
        ]
        self._conn.execute("BEGIN")
        self._conn.executemany(
            "INSERT INTO messages (key, line, content, message_id, state, run, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET state=excluded.state, run=excluded.run, "
            "line=excluded.line, updated=excluded.updated",
            rows,
        )
        self._conn.execute("COMMIT")

    def record_outcome(
        self,
        key: str,
        state: State,
        attempts: int,
        code: int | None,
        enhanced: str | None,
        text: str | None,
        done: Sequence[str] | None,
    ) -> None:
        """:meth:`record` without building a :class:`Settled` (the CLI's hot path)."""
        pending = self._pending
        pending.append(
            (state, attempts, code, enhanced, text, json.dumps(list(done)) if done else None,
             time.time(), key)
        )  # fmt: skip
        if (
            len(pending) >= self.batch_size
            or time.monotonic() - self._last_commit >= self.batch_seconds
        ):
            self.flush()

    def _write_outcomes(self) -> None:
        if self._pending:
            self._conn.executemany(
                "UPDATE messages SET state=?, attempts=attempts+?, code=?, enhanced=?, text=?, "
                "done=?, updated=? WHERE key=?",
                self._pending,
            )
            self._pending = []

    def flush(self) -> None:
        """Commit buffered outcomes now."""
        if not self._pending:
            return
        conn = self._conn
        conn.execute("BEGIN")
        try:
            self._write_outcomes()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._last_commit = time.monotonic()

    def release(self, keys: Iterable[str]) -> None:
        """Put claimed messages that were never handed to the pool back to pending."""
        rows = [(time.time(), key) for key in keys]
        if not rows:
            return
        self.flush()
        self._conn.execute("BEGIN")
        self._conn.executemany(
            "UPDATE messages SET state='pending', updated=? WHERE key=? AND state='in-flight'",
            rows,
        )
        self._conn.execute("COMMIT")

    def in_flight_of_this_run(self) -> int:
        self.flush()
        (n,) = self._conn.execute(
            "SELECT count(*) FROM messages WHERE state='in-flight' AND run=?", (self.run,)
        ).fetchone()
        return int(n)
