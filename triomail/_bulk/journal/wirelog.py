"""The SQLite journal's redo log: rows going on the wire, committed with one write.

Theory of operation
-------------------
A row is committed in flight just before its content is written (:mod:`.base`). An
SQLite commit costs tens of microseconds (a page into the WAL, and checkpoints), as
much as the rest of a message's work: one per message would cut a pipelined run's
rate by a third, and grouping them means committing rows long before they are written.
So the SQLite journal appends what it must not lose -- rows going on the wire, and the
outcomes settled since -- to ``JOURNAL.wire``, and commits the database every
``LOG_COMMIT_SECONDS``, after which the log is emptied. Opening the journal replays
what the log holds into the database first, in order (each record says what a commit
would have said, so one applied twice changes nothing). ``triomail status`` reads the
log without changing anything (:func:`recount`).

The log is a file mapped into memory (``MAP_SHARED``): an append is a copy into the
kernel's page cache, with no system call, and a ``kill -9`` loses nothing of it. Its
space is allocated before use (``posix_fallocate``: a full disk is an error then, not a
``SIGBUS`` on a later copy) and doubled when needed. The content ends at the first NUL
byte. An append writes its line and a NUL after it, and the line's first byte last, over
the NUL that ended the log: until then the log ends before the line, so a line cut
short by a crash is never read, and the append of a row going on the wire ends before
its first byte is sent. Emptying the log writes one NUL at its start.

Like the database's ``synchronous=NORMAL``, the log survives the process being
killed; only a power loss can drop its last lines.
"""

from __future__ import annotations

import json
import mmap
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["WireLog", "log_path", "read", "recount", "replay"]

#: A line of the log is the JSON array of one append's records, each
#: ``["w", updated, key]`` (in flight) or ``["o", *outcome]`` (an outcome as the
#: journal's UPDATE takes it: state ... updated, key).
Line = list[object]
_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
#: The log's first size (bytes); it doubles when an append needs more.
FIRST_SIZE = 64 * 1024


def log_path(journal: Path) -> Path:
    """Where the redo log of the journal at ``journal`` is."""
    return journal.with_name(journal.name + ".wire")


class WireLog:
    """The open log: appends copied into a shared mapping, emptied after each database
    commit (see the module's theory of operation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        self.map: mmap.mmap | None = None
        self.end = 0  # where the content ends (a NUL)
        try:
            self._grow(FIRST_SIZE)
        except OSError:
            os.close(self.fd)
            raise

    @property
    def empty(self) -> bool:
        return self.end == 0

    def _grow(self, size: int) -> None:
        os.posix_fallocate(self.fd, 0, size)  # OSError (ENOSPC) now, not SIGBUS later
        if self.map is not None:
            self.map.close()
        self.map = mmap.mmap(self.fd, size)
        self.size = size

    def append(
        self, now: float, keys: Sequence[str], outcomes: Sequence[tuple[object, ...]]
    ) -> None:
        """Rows ``keys`` in flight and ``outcomes`` settled, as one line (OSError if
        the disk is full: nothing of them may then be written on the wire)."""
        records: list[object] = [("o", *outcome) for outcome in outcomes]
        records += [("w", now, key) for key in keys]
        data = (_encode(records) + "\n").encode()
        start = self.end
        end = start + len(data)
        if end >= self.size:
            self._grow(max(2 * self.size, end + FIRST_SIZE))
        view = self.map
        assert view is not None
        view[start + 1 : end] = data[1:]
        view[end] = 0
        view[start] = data[0]  # now the line is in the log
        self.end = end

    def clear(self) -> None:
        """Everything logged is in a committed database transaction now."""
        if self.end:
            assert self.map is not None
            self.map[0] = 0
            self.end = 0

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)
        if self.empty:
            self.path.unlink(missing_ok=True)


def read(path: Path) -> Iterator[Line]:
    """The lines of the log at ``path`` (none if there is none), in order; a line a
    crash cut short ends it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    end = data.find(0)
    text = data[: None if end < 0 else end].decode("utf-8", errors="replace")
    for raw in text.splitlines():
        try:
            records = json.loads(raw)
        except ValueError:
            return
        for line in records:
            if not isinstance(line, list) or not line or line[0] not in ("w", "o"):
                return
            yield line


def recount(conn: sqlite3.Connection, path: Path, by_run: dict[int, dict[str, int]]) -> None:
    """Move the database's counts per run and state (``by_run``) to what they will be
    once the log at ``path`` is replayed (``triomail status`` changes nothing)."""
    states: dict[str, str] = {}
    for line in read(path):
        states[str(line[-1])] = "in-flight" if line[0] == "w" else str(line[1])
    if not states:
        return
    found = conn.execute(
        "SELECT key, run, state FROM messages WHERE key IN (SELECT value FROM json_each(?))",
        (json.dumps(list(states)),),
    )
    for key, run, state in found:
        by_run[run][state] -= 1
        by_run[run][states[key]] += 1


def replay(conn: sqlite3.Connection, path: Path, in_flight: str, outcome: str) -> None:
    """Apply what the log at ``path`` holds (a run that was killed) in one transaction,
    through the journal's statements for a row in flight and an outcome; then remove
    it."""
    lines = list(read(path))
    if lines:
        conn.execute("BEGIN")
        for line in lines:
            conn.execute(in_flight if line[0] == "w" else outcome, line[1:])
        conn.execute("COMMIT")
    path.unlink(missing_ok=True)
