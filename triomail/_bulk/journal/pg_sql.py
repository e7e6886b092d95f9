"""The PostgreSQL journal's statements, its URL, and a connection that comes back.

Theory of operation
-------------------
:mod:`.postgres` says what the tables mean. Here are the statements themselves, the
``--journal`` URL's parsing (the password is refused: libpq reads ``PGPASSWORD`` or
``~/.pgpass``), :func:`join` (a worker joins its campaign), :func:`peek` for
``triomail status``, and :class:`Link`, one database connection used from synchronous
code: :meth:`Link.run` runs a piece of work on it and, when the connection was lost
(the server restarted), reopens it with a doubling backoff for up to
``RECONNECT_SECONDS`` before giving up with one line (:meth:`Link.lost`, which
:class:`.pg_async.AsyncLink` shares). Each connection asks the server for a
``statement_timeout``, so a statement stuck on the server cannot hold a worker (or its
cancellation) forever.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import STATES, JournalError, Snapshot

try:
    import psycopg
except ImportError:  # pragma: no cover - the extra is not installed
    psycopg = None  # type: ignore[assignment]

__all__ = [
    "GROUP_COMMIT",
    "LOOKUP",
    "RECONNECT_SECONDS",
    "RENEW",
    "RESERVE",
    "SCHEMA",
    "SETTLE",
    "WIRE",
    "Link",
    "file_digest",
    "join",
    "one_line",
    "parse_url",
    "peek",
    "psycopg",
]

_log = logging.getLogger("triomail.send")
_T = TypeVar("_T")

#: How long a lost database connection is retried before the run stops.
RECONNECT_SECONDS: Final = 60.0
#: A statement that takes longer than this is cancelled by the server (milliseconds).
STATEMENT_TIMEOUT_MS: Final = 30_000

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS triomail_campaigns (
    name TEXT PRIMARY KEY,       -- ?campaign=NAME
    campaign TEXT NOT NULL,      -- random: part of every Message-ID
    source TEXT NOT NULL,        -- digest of the recipients file
    content TEXT NOT NULL,       -- digest of the template
    runs INTEGER NOT NULL DEFAULT 0,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- --campaign-rate: the next free time (see pg_rate.py); added to older tables too.
ALTER TABLE triomail_campaigns
    ADD COLUMN IF NOT EXISTS rate_next TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE TABLE IF NOT EXISTS triomail_workers (
    name TEXT NOT NULL, run INTEGER NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    started TIMESTAMPTZ NOT NULL DEFAULT now(), seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished TIMESTAMPTZ, stale INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, run)
);
CREATE TABLE IF NOT EXISTS triomail_messages (
    name TEXT NOT NULL, key TEXT NOT NULL, line INTEGER NOT NULL, content TEXT NOT NULL,
    message_id TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    code INTEGER, enhanced TEXT, text TEXT, done TEXT,
    run INTEGER NOT NULL,        -- the worker that last claimed or settled the row
    fence BIGINT NOT NULL DEFAULT 0,
    lease_until TIMESTAMPTZ,
    updated TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The one index: a row's updates (state, lease, fence) change no indexed column,
    -- so PostgreSQL writes them beside the row without touching an index (HOT). The
    -- key leads: a plan (cached, or made while the table is empty or its statistics
    -- do not know the campaign) can then only find a chunk's rows by their keys,
    -- never by scanning the campaign's. Whole-campaign reads (counts, takeovers,
    -- renewals, status) scan the table; they are rare.
    PRIMARY KEY (key, name)
);
"""
# A reservation is one statement (one round trip, atomic). Rows new to the campaign
# are inserted already leased to this run (loading is idempotent: ON CONFLICT DO
# NOTHING, and a row another worker inserts meanwhile is theirs); rows that were there
# are taken if free, locked with FOR UPDATE SKIP LOCKED (a row another worker is taking
# right now is not waited for). Both parts of a WITH see the same snapshot, so the
# UPDATE never sees the rows the INSERT adds: a row is won once. No join, with an
# unnest() of the batch or with the locked rows: the planner, misled by statistics
# that do not know a new campaign yet, turned such joins into nested loops over the
# whole campaign. Every statement below finds its rows through the primary key, with
# ``key = ANY(array)`` (the locked keys as an array computed once, ``ARRAY(SELECT
# ...)``). (A claim's rows share the run's content digest.)
#
# A batch travels as one text parameter, not as arrays: psycopg dumps an array element
# by element in Python, about as long as the statement takes on the server. The keys
# (hex digests) are joined with spaces (``string_to_array``), the rows are a JSON array
# of arrays (``json_array_elements``), both written by C code.
RESERVE: Final = """
WITH loaded AS (
    INSERT INTO triomail_messages
        (name, key, line, content, message_id, state, run, fence, lease_until)
    SELECT %(name)s, v->>0, (v->>1)::int, v->>2, v->>3, 'pending', %(run)s, 1,
        now() + make_interval(secs => %(lease)s)
    FROM json_array_elements(%(rows)s::json) AS v
    ON CONFLICT DO NOTHING
    RETURNING key, fence
), free AS MATERIALIZED (
    SELECT key FROM triomail_messages
    WHERE name = %(name)s AND key = ANY(ARRAY(
        SELECT unnest(string_to_array(%(keys)s, ' ')) EXCEPT SELECT key FROM loaded
    ))
      AND (lease_until IS NULL OR lease_until < now())
      AND (state = ANY(%(states)s) OR state = 'in-flight')
    FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE triomail_messages m
    SET run = %(run)s, fence = m.fence + 1,
        lease_until = now() + make_interval(secs => %(lease)s),
        content = %(content)s, updated = now()
    WHERE m.name = %(name)s AND m.key = ANY(ARRAY(SELECT key FROM free))
    RETURNING m.key, m.fence
)
SELECT key, fence FROM loaded UNION ALL SELECT key, fence FROM taken
"""
# What the journal knows of a chunk's rows, before they are planned.
LOOKUP: Final = """
SELECT key, line, content, message_id, state, attempts, done, run FROM triomail_messages
WHERE name = %(name)s AND key = ANY(string_to_array(%(keys)s, ' '))
"""
# A worker's lease renewal and its heartbeat, in one statement.
RENEW: Final = """
WITH leases AS (
    UPDATE triomail_messages SET lease_until = now() + make_interval(secs => %(lease)s)
    WHERE name = %(name)s AND run = %(run)s AND lease_until IS NOT NULL
)
UPDATE triomail_workers SET seen = now() WHERE name = %(name)s AND run = %(run)s
"""
# The rows a connection is about to write, in flight; and a batch of outcomes, written
# where the fence still matches (``key = ANY(...)`` lets the planner use the primary
# key before there are statistics), returning the keys written.
WIRE: Final = """
UPDATE triomail_messages SET state = 'in-flight', updated = now()
WHERE name = %(name)s AND key = ANY(string_to_array(%(wire)s, ' ')) AND run = %(run)s
"""
SETTLE: Final = """
UPDATE triomail_messages m
SET state = v.state, attempts = m.attempts + v.attempts, code = v.code,
    enhanced = v.enhanced, text = v.text, done = v.done, lease_until = NULL,
    updated = now()
FROM (
    SELECT x->>0 AS key, x->>1 AS state, (x->>2)::int AS attempts, (x->>3)::int AS code,
        x->>4 AS enhanced, x->>5 AS text, x->>6 AS done, (x->>7)::bigint AS fence
    FROM json_array_elements(%(batch)s::json) AS x
) AS v
WHERE m.name = %(name)s AND m.key = ANY(string_to_array(%(keys)s, ' ')) AND m.key = v.key
  AND m.fence = v.fence
RETURNING m.key
"""
# Both in one statement (one round trip, atomic): a group commit from synchronous code.
GROUP_COMMIT: Final = f"WITH wire AS ({WIRE}), settled AS ({SETTLE}) SELECT key FROM settled"


def join(
    conn: Any, name: str, url: str, resume: bool, source: str, content: str
) -> tuple[str, str, int]:
    """Join (or start) campaign ``name`` in one transaction, creating the tables if
    needed; ``(campaign id, previous template digest, this worker's run)``."""
    with conn.transaction():
        # One creator of the tables and of the campaign at a time.
        conn.execute("SELECT pg_advisory_xact_lock(7236142)")
        conn.execute(SCHEMA)
        row = conn.execute(
            "SELECT campaign, source, content, runs FROM triomail_campaigns "
            "WHERE name = %s FOR UPDATE",
            (name,),
        ).fetchone()
        if row is None:
            if resume:
                raise JournalError(f"--resume: no campaign {name!r} in {url}")
            row = (secrets.token_hex(6), source, content, 0)
            conn.execute(
                "INSERT INTO triomail_campaigns (name, campaign, source, content) "
                "VALUES (%s, %s, %s, %s)",
                (name, row[0], source, content),
            )
        campaign, old_source, old_content, runs = row
        changed = [
            what
            for what, old, new in (("recipients file", old_source, source),
                                   ("template", old_content, content))
            if old and new and old != new
        ]  # fmt: skip
        if changed and not resume:
            raise JournalError(
                f"campaign {name!r} in {url} was started with another "
                f"{' and '.join(changed)}; use the same files, or --resume to send the "
                "rest with these, or another ?campaign=NAME"
            )
        run = runs + 1
        conn.execute(
            "UPDATE triomail_campaigns SET runs = %s, content = %s WHERE name = %s",
            (run, content or old_content, name),
        )
        conn.execute(
            "INSERT INTO triomail_workers (name, run, host, pid) VALUES (%s, %s, %s, %s)",
            (name, run, socket.gethostname(), os.getpid()),
        )
    return campaign, old_content, run


def parse_url(url: str) -> tuple[str, str, str]:
    """``(conninfo, campaign name, URL for messages)`` of a journal URL; one clear
    :class:`JournalError` for a password in it or a missing ``?campaign=``."""
    parts = urlsplit(url)
    if parts.password is not None:
        raise JournalError(
            "do not put the password in the journal URL; set PGPASSWORD or use ~/.pgpass"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [v for k, v in query if k == "campaign"]
    if not names or not names[0]:
        raise JournalError(f"--journal {url}: name the campaign with ?campaign=NAME")
    rest = urlencode([(k, v) for k, v in query if k != "campaign"])
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
    return conninfo, names[0], url


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def file_digest(source: str) -> str:
    """The recipients file's identity: a digest of its bytes (a path when unreadable)."""
    try:
        with open(source, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return source


class Link:
    """One connection to the journal's database, reopened when lost."""

    #: Settings of the connection's session. Statements are prepared (:meth:`query`)
    #: and keep one generic plan, made without the values: a plan for the values
    #: trusts statistics that do not know a new campaign yet (one row, they say) and
    #: scanned the whole campaign instead of finding a chunk's keys by primary key.
    options = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c plan_cache_mode=force_generic_plan"

    def __init__(self, conninfo: str, url: str) -> None:
        if psycopg is None:
            raise JournalError(
                "a postgresql:// journal needs psycopg: pip install 'triomail[postgres]'"
            )
        self._conninfo = conninfo
        self.url = url
        try:
            self.conn = self._connect()
        except psycopg.Error as exc:
            raise JournalError(f"cannot open journal {url}: {one_line(exc)}") from None

    def _connect(self) -> Any:
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=10,
            options=self.options,
            application_name="triomail send",
        )

    def run(self, work: Callable[[Any], _T]) -> _T:
        """``work(connection)``, reconnecting with backoff if the connection was lost;
        any other database error is one :class:`JournalError` line."""
        deadline = time.monotonic() + RECONNECT_SECONDS
        delay = 0.1
        while True:
            try:
                if self.conn.closed:
                    self.conn = self._connect()
                return work(self.conn)
            except psycopg.Error as exc:
                self.lost(exc, deadline, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def lost(self, exc: Exception, deadline: float, delay: float) -> None:
        """Close the connection after ``exc`` if it was lost and the backoff may wait
        ``delay`` more before ``deadline``; else raise the one line of
        :class:`JournalError` that stops the run."""
        conn = self.conn
        lost = isinstance(exc, psycopg.OperationalError) and (
            conn.closed or conn.broken or conn.pgconn.status == psycopg.pq.ConnStatus.BAD
        )
        if not lost:
            raise JournalError(f"journal {self.url}: {one_line(exc)}") from None
        if time.monotonic() + delay > deadline:
            raise JournalError(
                f"lost the journal database {self.url} for {RECONNECT_SECONDS:.0f} s "
                f"({one_line(exc)}); what was committed is consistent: continue "
                "with --resume"
            ) from None
        _log.warning("journal %s: %s; reconnecting", self.url, one_line(exc))
        conn.close()

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """The rows of one statement (:meth:`run`)."""
        return self.run(lambda c: list(c.execute(sql, params, prepare=True).fetchall()))

    def execute(self, sql: str, params: Any = None) -> None:
        """One statement without rows (:meth:`run`)."""
        self.run(lambda c: c.execute(sql, params, prepare=True))

    def close(self) -> None:
        self.conn.close()


def peek(url: str) -> Snapshot:
    """The campaign's states by worker, read-only (``triomail status``)."""
    conninfo, name, shown = parse_url(url)
    link = Link(conninfo, shown)
    try:
        c = link.conn
        try:
            row = c.execute(
                "SELECT campaign FROM triomail_campaigns WHERE name = %s", (name,)
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        if row is None:
            raise JournalError(f"no campaign {name!r} in {shown}")
        by_run: dict[int, dict[str, int]] = {}
        for run, state, n in c.execute(
            "SELECT run, state, count(*) FROM triomail_messages WHERE name = %s "
            "GROUP BY run, state",
            (name,),
        ):
            by_run.setdefault(run, dict.fromkeys(STATES, 0))[state] = n
        workers = {
            run: f"{host} pid {pid}, "
            + (f"finished{f', {stale} stale' if stale else ''}" if done else
               f"last seen {age:.0f} s ago")
            for run, host, pid, done, stale, age in c.execute(
                "SELECT run, host, pid, finished IS NOT NULL, stale, "
                "EXTRACT(EPOCH FROM now() - seen) FROM triomail_workers WHERE name = %s",
                (name,),
            )
        }  # fmt: skip
        return Snapshot(row[0], by_run, workers)
    finally:
        link.close()
