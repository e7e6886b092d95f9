"""The SQLite journal's redo log: rows going on the wire, committed with one write.

Theory of operation
-------------------
A row is committed in flight just before its first byte is written (:mod:`.base`). An
SQLite commit costs tens of microseconds (a page into the WAL, and checkpoints), as
much as the rest of a message's work: one per message would cut a pipelined run's
rate by a third, and grouping them means committing rows long before they are written.
So the SQLite journal appends what it must not lose -- rows going on the wire, and the
outcomes settled since -- to ``JOURNAL.wire`` in one ``write`` (the kernel has it: a
``kill -9`` loses nothing), and commits the database every ``LOG_COMMIT_SECONDS``,
after which the log is emptied. Opening the journal replays what the log holds into the
database first, in order (each record says what a commit would have said, so one
applied twice changes nothing); a last line cut short by a crash is ignored: the
write of a row going on the wire ends before its first byte is sent. ``triomail
status`` reads the log without changing anything (:func:`recount`).

Like the database's ``synchronous=NORMAL``, the log survives the process being
killed; only a power loss can drop its last lines.
"""

from __future__ import annotations

import json
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


def log_path(journal: Path) -> Path:
    """Where the redo log of the journal at ``journal`` is."""
    return journal.with_name(journal.name + ".wire")


class WireLog:
    """The open log: appends with one ``write``, emptied after each database commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.empty = True

    def append(
        self, now: float, keys: Sequence[str], outcomes: Sequence[tuple[object, ...]]
    ) -> None:
        """Rows ``keys`` in flight and ``outcomes`` settled, in one write (OSError if
        the disk is full: nothing of them may then be written on the wire)."""
        records: list[object] = [("o", *outcome) for outcome in outcomes]
        records += [("w", now, key) for key in keys]
        data = (_encode(records) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.empty = False

    def clear(self) -> None:
        """Everything logged is in a committed database transaction now."""
        if not self.empty:
            os.ftruncate(self.fd, 0)
            self.empty = True

    def close(self) -> None:
        os.close(self.fd)
        if self.empty:
            self.path.unlink(missing_ok=True)


def read(path: Path) -> Iterator[Line]:
    """The lines of the log at ``path`` (none if there is none), in order; a line a
    crash cut short ends it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
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
