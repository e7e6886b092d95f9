"""The embedded journal: one SQLite row per message, so a batch can be resumed safely.

Theory of operation
-------------------
The states and their meaning are :mod:`.base`'s. A chunk's rows are *reserved* when
they are planned (:meth:`Journal.reserve`), and each message is marked *in-flight* just
before its content is written: the mark, with the outcomes settled since, is one
append to the redo log beside the journal (:mod:`.wirelog`, which ``kill -9`` does not
lose), and the database catches up from the log every ``LOG_COMMIT_SECONDS``; opening a
journal replays what the log holds. After a crash a message is therefore never
"forgotten": it is either final, or still in-flight, which ``--resume`` treats as an
unknown outcome (R37, R38): resend with the same Message-ID (at-least-once, the
default), or skip (``--at-most-once``). Accepted and permanently refused messages are
never sent again; per-recipient outcomes are kept so that a message that was accepted
for some recipients is resent only to the others.

A full disk must not lose what is known: a file of ``RESERVE_BYTES`` is kept next to
the journal, and when a commit fails for lack of space it is deleted and the commit
tried again, so the outcomes already received are recorded; then no more messages
are claimed, the run finishes what is on the wire and stops with one line (exit 2),
and ``--resume`` once space is freed sends nothing twice. A damaged file is found by
``PRAGMA quick_check`` when a journal is resumed (one line, exit 2).

The database runs in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the process being killed (only a power loss can roll back the last commits,
which then look in-flight or pending, never accepted).

The module is longer than our usual 400 lines because it is the one owner of the
SQLite schema and of every transaction on it (open, reserve, wire, outcomes, release,
counts); the log's own format is kept apart in :mod:`.wirelog`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .base import STATES, BaseJournal, Entry, JournalError, Record, Snapshot, State
from .wirelog import WireLog, log_path, recount, replay

__all__ = ["RESERVE_BYTES", "Journal"]

#: Space kept in ``JOURNAL.reserve`` and given back when the disk fills up.
RESERVE_BYTES = 256 * 1024
#: SQLite's result code for "database or disk is full".
_SQLITE_FULL = 13

#: A row going on the wire, and an outcome (as ``record_outcome`` buffers it).
_IN_FLIGHT = "UPDATE messages SET state='in-flight', updated=? WHERE key=?"
_OUTCOME = (
    "UPDATE messages SET state=?, attempts=attempts+?, code=?, enhanced=?, text=?, "
    "done=?, updated=? WHERE key=?"
)
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

    #: Rows go on the wire through the redo log (:mod:`.wirelog`): one write, at once.
    inline_commits = True

    def __init__(self, conn: sqlite3.Connection, path: Path | None, run: int, campaign: str):
        self._conn = conn
        self.path = path
        self.run = run
        #: Random per journal: part of every Message-ID, so two batches never share one.
        self.campaign = campaign
        self._pending: list[tuple[object, ...]] = []
        #: Rows in flight and outcomes (the first ``_logged`` of ``_pending``) that
        #: the redo log holds and the database does not yet.
        self._marks: list[str] = []
        self._logged = 0
        #: Keys with an outcome in ``_pending`` (a commit writes rows in flight first).
        self._settled: set[str] = set()
        self._log = None if path is None else WireLog(log_path(path))
        self._last_commit = time.monotonic()
        #: Commit buffered outcomes after this many, or this many seconds.
        self.batch_size = 500
        self.batch_seconds = 0.25
        #: Why no more messages may be claimed (the disk filled up), if so.
        self.full: str | None = None
        self._reserve = None if path is None else path.with_name(path.name + ".reserve")
        if self._reserve is not None:
            try:
                self._reserve.write_bytes(bytes(RESERVE_BYTES))
            except OSError:  # no room even for that: the journal works without it
                self._reserve.unlink(missing_ok=True)
                self._reserve = None

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
            if where is not None:
                replay(conn, log_path(where), _IN_FLIGHT, _OUTCOME)
            if existed:
                (check,) = conn.execute("PRAGMA quick_check(1)").fetchone()
                if check != "ok":
                    conn.close()
                    raise JournalError(
                        f"journal {where} is damaged ({' '.join(check.split())}); restore it "
                        "from a copy, or start over with another --journal"
                    )
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            counts = cls._count(conn)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {where}: {exc}") from None
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
        journal = cls(conn, where, run, campaign)
        journal.previous_content = meta.get("content", "")
        values = [
            ("schema", _SCHEMA_VERSION),
            ("campaign", campaign),
            ("runs", str(run)),
            ("source", source),
            ("content", content),
        ]
        try:
            journal._write(
                lambda c: c.executemany(
                    "INSERT INTO meta VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                    values,
                ),
                reserve=False,
            )
        except JournalError:
            journal.close()
            raise
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
                by_run: dict[int, dict[str, int]] = {}
                for run, state, n in rows:
                    by_run.setdefault(run, dict.fromkeys(STATES, 0))[state] = n
                recount(conn, log_path(path), by_run)  # as the redo log will leave them
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {path}: {exc}") from None
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
        try:
            try:
                self.flush()
            except JournalError:
                if self.full is None:
                    raise  # else the run said so already
            if self.path is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
            if self._log is not None:
                self._log.close()
            if self._reserve is not None:
                self._reserve.unlink(missing_ok=True)

    def _write(self, work: Callable[[sqlite3.Connection], object], *, reserve: bool) -> None:
        """``work`` in one committed transaction; a failure is one :class:`JournalError`
        line. Out of space, with ``reserve`` the reserve is given back and the commit
        tried once more (only for outcomes: a claim's new keys would take it all)."""
        conn = self._conn
        while True:
            try:
                conn.execute("BEGIN")
                work(conn)
                conn.execute("COMMIT")
                self._last_commit = time.monotonic()
                return
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if getattr(exc, "sqlite_errorcode", None) != _SQLITE_FULL:
                    raise JournalError(f"journal {self.where}: {exc}") from None
                self.full = f"journal {self.where}: the disk is full (free some space)"
                if not reserve or self._reserve is None:
                    raise JournalError(self.full) from None
                self._reserve.unlink(missing_ok=True)
                self._reserve = None
                # A checkpoint would grow the database file into the space given back.
                conn.execute("PRAGMA wal_autocheckpoint=0")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # ----------------------------------------------------------------- messages

    def lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        """The records of those keys that the journal has."""
        try:
            return self._lookup(keys)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"journal {self.where}: {exc}") from None

    def _lookup(self, keys: Sequence[str]) -> dict[str, Record]:
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

    def reserve(self, entries: Iterable[Entry]) -> list[str]:
        """Record the rows as this run's (new ones pending), not yet in flight."""
        if self.full is not None:
            raise JournalError(self.full)
        now = time.time()
        rows = [(key, line, content, mid, self.run, now) for key, line, content, mid in entries]
        self._write(
            lambda c: c.executemany(
                "INSERT INTO messages (key, line, content, message_id, state, run, updated) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET line=excluded.line, "
                "content=excluded.content, run=excluded.run, updated=excluded.updated",
                rows,
            ),
            reserve=False,
        )
        return [row[0] for row in rows]

    def commit_wire(self, keys: list[str]) -> None:
        """Mark the rows in flight, with the buffered outcomes, in one commit."""
        if self.full is not None and keys:
            raise JournalError(self.full)
        self._commit(keys, reserve=False)

    def wire_now(self, keys: list[str]) -> None:
        """Mark the rows in flight, with the buffered outcomes, in the redo log (one
        write; the database follows within ``LOG_COMMIT_SECONDS``)."""
        log = self._log
        if log is None:  # in memory: nothing survives a crash anyway
            self.commit_wire(keys)
            return
        if self.full is not None:
            raise JournalError(self.full)
        if not self._settled.isdisjoint(keys):
            # Going again with its last outcome not committed (a retry within a few
            # milliseconds): that outcome first, so the row ends in flight.
            self._commit([], reserve=False)
        pending = self._pending
        if not keys and len(pending) == self._logged:
            return
        try:
            log.append(time.time(), keys, pending[self._logged :])
        except OSError as exc:
            raise JournalError(f"journal {self.where}: {exc.strerror}") from None
        self._logged = len(pending)
        self._marks += keys

    def _commit(self, keys: list[str], *, reserve: bool) -> None:
        """One transaction: the buffered outcomes, the rows the redo log has in
        flight, and ``keys`` in flight; then the redo log is emptied."""
        pending, marks = self._pending, self._marks + keys
        if not marks and not pending:
            return
        now = time.time()
        # A row whose outcome this commit writes needs no in-flight mark first (a row
        # going again after its outcome had that outcome committed, see wire_now):
        # most of the log's marks, so most of a commit's updates, are skipped.
        settled = self._settled
        if settled:
            marks = [key for key in marks if key not in settled]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(_IN_FLIGHT, [(now, key) for key in marks])
            self._write_outcomes(conn, pending)

        self._write(work, reserve=reserve)
        del pending[:]
        self._marks, self._logged = [], 0
        self._settled.clear()
        if self._log is not None:
            self._log.clear()

    def mark(self, entries: Iterable[Entry], state: State) -> None:
        """Record messages that were not sent in this run (e.g. skipped unknowns)."""
        now = time.time()
        rows = [
            (key, line, content, mid, state, self.run, now) for key, line, content, mid in entries
        ]
        self._write(
            lambda c: c.executemany(
                "INSERT INTO messages (key, line, content, message_id, state, run, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET state=excluded.state, run=excluded.run, "
                "line=excluded.line, updated=excluded.updated",
                rows,
            ),
            reserve=False,
        )

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
        self._settled.add(key)
        if self.full is not None:
            return  # the disk is full: one last commit at the end, into the reserve
        if (
            len(pending) >= self.batch_size
            or time.monotonic() - self._last_commit >= self.batch_seconds
        ):
            try:
                self.flush(reserve=False)
            except JournalError:
                if self.full is None:
                    raise  # else kept for the last commit

    @staticmethod
    def _write_outcomes(conn: sqlite3.Connection, pending: list[tuple[object, ...]]) -> None:
        if pending:
            conn.executemany(_OUTCOME, pending)

    def flush(self, *, reserve: bool = True) -> None:
        """Commit buffered outcomes now (kept buffered if the commit fails); out of
        space, into the reserve unless ``reserve`` is false."""
        self._commit([], reserve=reserve)

    def release(self, keys: Iterable[str]) -> None:
        """Put claimed messages that were never handed to the pool back to pending."""
        rows = [(time.time(), key) for key in keys]
        if not rows:
            return
        self.flush()
        self._write(
            lambda c: c.executemany(
                "UPDATE messages SET state='pending', updated=? WHERE key=? AND state='in-flight'",
                rows,
            ),
            reserve=False,
        )

    def in_flight_of_this_run(self) -> int:
        self.flush()
        (n,) = self._conn.execute(
            "SELECT count(*) FROM messages WHERE state='in-flight' AND run=?", (self.run,)
        ).fetchone()
        return int(n)
