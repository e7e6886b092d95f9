"""The shared journal: one campaign in PostgreSQL, sent by any number of workers.

Theory of operation
-------------------
``--journal postgresql://USER@HOST:PORT/DB?campaign=NAME`` names a campaign; every
``triomail send`` started with the same URL, recipients file and template joins it.
Each worker reads the whole file and plans it as usual (:mod:`..planner`); what makes
the workers share the rows is the claim (:meth:`PostgresJournal.claim`), one
transaction per chunk:

* the chunk's rows are inserted as *pending* with ``ON CONFLICT DO NOTHING``, so the
  file is loaded once however many workers start together (loading is idempotent);
* then the claimable ones are locked with ``FOR UPDATE SKIP LOCKED`` (a row another
  worker is claiming right now is not waited for) and set *in-flight*, owned by this
  run, with a **lease** (an expiry) and the row's **fencing counter** incremented.

Claimable means pending, or in-flight with an expired lease (its worker died or
stalled), plus transient and unknown with ``--resume``. A worker renews the leases of
its rows in flight every third of the lease (:meth:`PostgresJournal.background`).
An outcome is written only if the row's fence is still the one the claim returned
(``WHERE fence = ...``): a worker that stalled past its lease and woke up finds its
row taken over, its late outcome is refused and logged as a possible duplicate, and
the outcome of the worker that took the row over stands.

When its file is done, a worker waits for rows that other workers hold and takes over
those whose lease expires (:meth:`takeover_keys`); it ends when no row of the
campaign is in flight elsewhere.

The driver is psycopg 3, synchronous: every statement runs in ``trio.to_thread`` on
one of two connections (claims, and outcomes with lease renewals), each behind a
one-token :class:`trio.CapacityLimiter`, so one thread uses a connection at a time; a
statement that hangs ends at ``statement_timeout``. A lost connection is reopened with
a doubling backoff for up to ``RECONNECT_SECONDS``, then the run stops with one line
(the journal is consistent; ``--resume`` continues). The password never comes from
the URL: libpq reads ``PGPASSWORD`` or ``~/.pgpass``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from ..settings import DEFAULT_LEASE
from .base import STATES, BaseJournal, Entry, JournalError, Record, State

try:
    import psycopg
except ImportError:  # pragma: no cover - the extra is not installed
    psycopg = None  # type: ignore[assignment]

__all__ = ["RECONNECT_SECONDS", "PostgresJournal", "parse_url"]

_log = logging.getLogger("triomail.send")
_T = TypeVar("_T")

#: How long a lost database connection is retried before the run stops.
RECONNECT_SECONDS: Final = 60.0
#: Seconds between commits of buffered outcomes (shared by all connections).
GROUP_COMMIT_SECONDS: Final = 0.005
#: A statement that takes longer than this is cancelled by the server (milliseconds).
STATEMENT_TIMEOUT_MS: Final = 30_000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS triomail_campaigns (
    name TEXT PRIMARY KEY,       -- ?campaign=NAME
    campaign TEXT NOT NULL,      -- random: part of every Message-ID
    source TEXT NOT NULL,        -- digest of the recipients file
    content TEXT NOT NULL,       -- digest of the template
    runs INTEGER NOT NULL DEFAULT 0,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
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
    PRIMARY KEY (name, key)
);
CREATE INDEX IF NOT EXISTS triomail_messages_state ON triomail_messages (name, state);
"""
_LOAD: Final = """
INSERT INTO triomail_messages (name, key, line, content, message_id, state, run)
SELECT %(name)s, key, line, content, message_id, 'pending', %(run)s
FROM unnest(%(keys)s::text[], %(lines)s::int[], %(contents)s::text[], %(mids)s::text[])
    AS v(key, line, content, message_id)
ON CONFLICT DO NOTHING
"""
_TAKE: Final = """
WITH c AS (
    SELECT key FROM triomail_messages
    WHERE name = %(name)s AND key = ANY(%(keys)s)
      AND (state = ANY(%(states)s) OR (state = 'in-flight' AND lease_until < now()))
    FOR UPDATE SKIP LOCKED
)
UPDATE triomail_messages m
SET state = 'in-flight', run = %(run)s, fence = m.fence + 1,
    lease_until = now() + make_interval(secs => %(lease)s), line = v.line,
    content = v.content, updated = now()
FROM c, unnest(%(keys)s::text[], %(lines)s::int[], %(contents)s::text[]) AS v(key, line, content)
WHERE m.name = %(name)s AND m.key = c.key AND v.key = c.key
RETURNING m.key, m.fence
"""
_OUTCOMES: Final = """
UPDATE triomail_messages m
SET state = v.state, attempts = m.attempts + v.attempts, code = v.code,
    enhanced = v.enhanced, text = v.text, done = v.done, lease_until = NULL, updated = now()
FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::text[], %s::text[],
            %s::text[], %s::bigint[]) AS v(key, state, attempts, code, enhanced, text, done, fence)
WHERE m.name = %s AND m.key = v.key AND m.fence = v.fence AND m.state = 'in-flight'
RETURNING m.key
"""


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _file_digest(source: str) -> str:
    """The recipients file's identity: a digest of its bytes (a path when unreadable)."""
    try:
        with open(source, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return source


class PostgresJournal(BaseJournal):
    """A campaign in PostgreSQL; see the module's theory of operation."""

    shared = True

    def __init__(self, conninfo: str, name: str, url: str, lease: float) -> None:
        self._conninfo = conninfo
        self.name = name
        self.url = url
        self.lease = lease
        self.resume = False
        self._conn = self._connect()
        self._out = self._connect()
        self._claimable = ["pending"]
        #: The fence each claimed row had when this run claimed it.
        self._fences: dict[str, int] = {}
        self._pending: list[tuple[Any, ...]] = []
        #: Late outcomes refused because another worker took the row over.
        self.stale = 0
        self.batch_seconds = GROUP_COMMIT_SECONDS
        self._limiters: dict[str, trio.CapacityLimiter] = {}

    @property
    def where(self) -> str:
        return self.url

    def _connect(self) -> Any:
        if psycopg is None:
            raise JournalError(
                "a postgresql:// journal needs psycopg: pip install 'triomail[postgres]'"
            )
        try:
            return psycopg.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=10,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="triomail send",
            )
        except psycopg.Error as exc:
            raise JournalError(f"cannot open journal {self.url}: {_one_line(exc)}") from None

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls,
        url: str,
        *,
        resume: bool,
        source: str = "",
        content: str = "",
        lease: float | None = None,
    ) -> tuple[PostgresJournal, dict[str, int]]:
        """Join (or start) the campaign; return the journal and its counts by state.

        A campaign started with another recipients file or template is refused
        unless ``resume`` (then, as with SQLite, unsent rows use the new template).
        """
        conninfo, name, shown = parse_url(url)
        journal = cls(conninfo, name, shown, DEFAULT_LEASE if lease is None else lease)
        try:
            journal._join(resume, _file_digest(source) if source else "", content)
            return journal, journal.counts()
        except BaseException:
            journal.close()
            raise

    def _join(self, resume: bool, source: str, content: str) -> None:
        self.resume = resume
        if resume:
            self._claimable = ["pending", "transient", "unknown"]
        with self._conn.transaction():
            # One creator of the tables and of the campaign at a time.
            self._conn.execute("SELECT pg_advisory_xact_lock(7236142)")
            self._conn.execute(_SCHEMA)
            row = self._conn.execute(
                "SELECT campaign, source, content, runs FROM triomail_campaigns "
                "WHERE name = %s FOR UPDATE",
                (self.name,),
            ).fetchone()
            if row is None:
                if resume:
                    raise JournalError(f"--resume: no campaign {self.name!r} in {self.url}")
                row = (secrets.token_hex(6), source, content, 0)
                self._conn.execute(
                    "INSERT INTO triomail_campaigns (name, campaign, source, content) "
                    "VALUES (%s, %s, %s, %s)",
                    (self.name, row[0], source, content),
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
                    f"campaign {self.name!r} in {self.url} was started with another "
                    f"{' and '.join(changed)}; use the same files, or --resume to send the "
                    "rest with these, or another ?campaign=NAME"
                )
            self.campaign = campaign
            self.previous_content = old_content
            self.run = runs + 1
            self._conn.execute(
                "UPDATE triomail_campaigns SET runs = %s, content = %s WHERE name = %s",
                (self.run, content or old_content, self.name),
            )
            self._conn.execute(
                "INSERT INTO triomail_workers (name, run, host, pid) VALUES (%s, %s, %s, %s)",
                (self.name, self.run, socket.gethostname(), os.getpid()),
            )

    def close(self) -> None:
        try:
            self.flush()
            if hasattr(self, "run"):
                self._retrying(
                    lambda c: c.execute(
                        "UPDATE triomail_workers SET finished = now(), seen = now(), stale = %s "
                        "WHERE name = %s AND run = %s",
                        (self.stale, self.name, self.run),
                    ),
                    conn=self._out,
                )
        finally:
            self._conn.close()
            self._out.close()

    # ----------------------------------------------------------------- the connection

    def _retrying(self, work: Callable[[Any], _T], *, conn: Any) -> _T:
        """``work(connection)``, reconnecting with backoff if the connection was lost."""
        deadline = time.monotonic() + RECONNECT_SECONDS
        delay = 0.1
        while True:
            try:
                if conn.closed:
                    conn = self._reopen(conn)
                return work(conn)
            except psycopg.OperationalError as exc:
                if not conn.closed and not conn.broken:
                    raise JournalError(f"journal {self.url}: {_one_line(exc)}") from None
                if time.monotonic() + delay > deadline:
                    raise JournalError(
                        f"lost the journal database {self.url} for {RECONNECT_SECONDS:.0f} s "
                        f"({_one_line(exc)}); what was committed is consistent: continue "
                        "with --resume"
                    ) from None
                _log.warning("journal %s: %s; reconnecting", self.url, _one_line(exc))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                conn.close()

    def _reopen(self, old: Any) -> Any:
        new = psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=10,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            application_name="triomail send",
        )
        if old is self._conn:
            self._conn = new
        else:
            self._out = new
        return new

    async def _in_thread(self, fn: Callable[..., _T], *args: Any, conn: str) -> _T:
        limiter = self._limiters.get(conn)
        if limiter is None:
            limiter = self._limiters[conn] = trio.CapacityLimiter(1)
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)

    # ----------------------------------------------------------------- messages

    def counts(self) -> dict[str, int]:
        self.flush()
        counts = dict.fromkeys(STATES, 0)
        rows = self._retrying(
            lambda c: c.execute(
                "SELECT state, count(*) FROM triomail_messages WHERE name = %s GROUP BY state",
                (self.name,),
            ).fetchall(),
            conn=self._conn,
        )
        for state, n in rows:
            counts[state] = n
        return counts

    def lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        rows = self._retrying(
            lambda c: c.execute(
                "SELECT key, line, content, message_id, state, attempts, done, run "
                "FROM triomail_messages WHERE name = %s AND key = ANY(%s)",
                (self.name, list(keys)),
            ).fetchall(),
            conn=self._conn,
        )
        return {r[0]: _record(r) for r in rows}

    def records(self) -> list[Record]:
        self.flush()
        rows = self._retrying(
            lambda c: c.execute(
                "SELECT key, line, content, message_id, state, attempts, done, run "
                "FROM triomail_messages WHERE name = %s ORDER BY line",
                (self.name,),
            ).fetchall(),
            conn=self._conn,
        )
        return [_record(r) for r in rows]

    def claim(self, entries: Iterable[Entry]) -> list[str]:
        rows = list(entries)
        if not rows:
            return []
        params = {
            "name": self.name,
            "run": self.run,
            "keys": [r[0] for r in rows],
            "lines": [r[1] for r in rows],
            "contents": [r[2] for r in rows],
            "mids": [r[3] for r in rows],
            "states": self._claimable,
            "lease": self.lease,
        }

        def work(conn: Any) -> list[tuple[str, int]]:
            with conn.transaction():
                conn.execute(_LOAD, params)
                return list(conn.execute(_TAKE, params).fetchall())

        won = dict(self._retrying(work, conn=self._conn))
        self._fences.update(won)
        return [r[0] for r in rows if r[0] in won]

    async def claim_async(self, entries: list[Entry]) -> list[str]:
        return await self._in_thread(self.claim, entries, conn="claims")

    def mark(self, entries: Iterable[Entry], state: State) -> None:
        rows = list(entries)
        if not rows:
            return
        self._retrying(
            lambda c: c.execute(
                "INSERT INTO triomail_messages AS m "
                "(name, key, line, content, message_id, state, run) "
                "SELECT %s, k, l, ct, mid, %s, %s FROM unnest(%s::text[], %s::int[], "
                "%s::text[], %s::text[]) AS v(k, l, ct, mid) "
                "ON CONFLICT (name, key) DO UPDATE SET state = excluded.state, "
                "run = excluded.run, line = excluded.line, updated = now(), lease_until = NULL "
                "WHERE m.state <> 'in-flight' OR m.lease_until < now() OR m.run = excluded.run",
                (self.name, state, self.run, [r[0] for r in rows], [r[1] for r in rows],
                 [r[2] for r in rows], [r[3] for r in rows]),
            ),
            conn=self._conn,
        )  # fmt: skip

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
        self._pending.append(
            (key, state, attempts, code, enhanced, text,
             json.dumps(list(done)) if done else None, self._fences.pop(key, 0))
        )  # fmt: skip

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        self._write_outcomes(batch)

    def _write_outcomes(self, batch: list[tuple[Any, ...]]) -> None:
        if not batch:
            return
        columns = [list(c) for c in zip(*batch, strict=True)]
        try:
            rows = self._retrying(
                lambda c: c.execute(_OUTCOMES, (*columns, self.name)).fetchall(), conn=self._out
            )
        except BaseException:
            self._pending[:0] = batch  # written by the next flush, or left in flight
            raise
        written = {r[0] for r in rows}
        for item in batch:
            if item[0] not in written:
                self.stale += 1
                _log.warning(
                    "journal: line key %s was taken over by another worker after this one's "
                    "lease expired; its late outcome (%s) is not recorded: possible duplicate",
                    item[0],
                    item[1],
                )

    def release(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        self.flush()
        for key in keys:
            self._fences.pop(key, None)
        self._retrying(
            lambda c: c.execute(
                "UPDATE triomail_messages SET state = 'pending', lease_until = NULL, "
                "updated = now() WHERE name = %s AND key = ANY(%s) AND state = 'in-flight' "
                "AND run = %s",
                (self.name, keys, self.run),
            ),
            conn=self._conn,
        )

    def in_flight_of_this_run(self) -> int:
        self.flush()
        (n,) = self._retrying(
            lambda c: c.execute(
                "SELECT count(*) FROM triomail_messages "
                "WHERE name = %s AND state = 'in-flight' AND run = %s",
                (self.name, self.run),
            ).fetchone(),
            conn=self._conn,
        )
        return int(n)

    # ----------------------------------------------------------------- workers

    def _renew(self) -> None:
        self._retrying(
            lambda c: c.execute(
                "UPDATE triomail_messages SET lease_until = now() + make_interval(secs => %s) "
                "WHERE name = %s AND state = 'in-flight' AND run = %s;"
                "UPDATE triomail_workers SET seen = now() WHERE name = %s AND run = %s",
                (self.lease, self.name, self.run, self.name, self.run),
            ),
            conn=self._out,
        )

    async def background(self) -> None:
        """Group-commit the buffered outcomes and renew the leases, until cancelled."""
        renew_every = self.lease / 3
        renewed = time.monotonic()
        while True:
            await trio.sleep(self.batch_seconds)
            if self._pending:
                batch, self._pending = self._pending, []
                await self._in_thread(self._write_outcomes, batch, conn="outcomes")
            if time.monotonic() - renewed >= renew_every:
                renewed = time.monotonic()
                await self._in_thread(self._renew, conn="outcomes")

    def takeover_wait(self) -> float | None:
        row = self._retrying(
            lambda c: c.execute(
                "SELECT count(*), EXTRACT(EPOCH FROM min(lease_until) - now()), "
                "count(*) FILTER (WHERE state = 'pending') FROM triomail_messages "
                "WHERE name = %s AND run <> %s AND state IN ('pending', 'in-flight')",
                (self.name, self.run),
            ).fetchone(),
            conn=self._conn,
        )
        count, seconds, pending = row
        if not count:
            return None
        if pending or seconds is None:
            return 0.0
        return max(0.0, float(seconds))

    def takeover_keys(self) -> set[str]:
        rows = self._retrying(
            lambda c: c.execute(
                "SELECT key FROM triomail_messages WHERE name = %s AND run <> %s "
                "AND (state = 'pending' OR (state = 'in-flight' AND lease_until < now()))",
                (self.name, self.run),
            ).fetchall(),
            conn=self._conn,
        )
        return {r[0] for r in rows}


def _record(r: Sequence[Any]) -> Record:
    done = tuple(json.loads(r[6])) if r[6] else ()
    return Record(r[0], r[1], r[2], r[3], r[4], r[5], done, r[7])
