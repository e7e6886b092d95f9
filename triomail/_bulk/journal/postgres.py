"""The shared journal: one campaign in PostgreSQL, sent by any number of workers.

Theory of operation
-------------------
``--journal postgresql://USER@HOST:PORT/DB?campaign=NAME`` names a campaign; every
``triomail send`` started with the same URL, recipients file and template joins it.
Each worker reads the whole file and plans it as usual (:mod:`..planner`); what makes
the workers share the rows is the reservation (:meth:`PostgresJournal.reserve`), one
statement per chunk (:data:`.pg_sql.RESERVE`):

* the chunk's rows new to the campaign are inserted with ``ON CONFLICT DO NOTHING``,
  already this run's, so the file is loaded once however many workers start together
  (loading is idempotent);
* the rows that were there are locked with ``FOR UPDATE SKIP LOCKED`` if free (a row
  another worker is taking right now is not waited for) and become this run's;
* either way a row won has a **lease** (an expiry) and its **fencing counter**
  incremented; it goes *in-flight* only when its bytes are about to be written
  (:meth:`.base.BaseJournal.on_wire`).

Free means no live lease: pending, or in flight after its worker died or stalled, plus
transient and unknown with ``--resume``. A worker renews the leases of its rows every
third of the lease. A dead worker's rows that never
went on the wire are taken over as pending (never sent); those in flight as unknown.
An outcome is written only if the row's fence is still the one the claim returned
(``WHERE fence = ...``): a worker that stalled past its lease and woke up finds its
row taken over, its late outcome is refused and logged as a possible duplicate, and
the outcome of the worker that took the row over stands.

When its file is done, a worker waits for rows that other workers hold and takes over
those whose lease expires (:meth:`takeover_keys`); it ends when no row of the
campaign is in flight elsewhere.

The driver is psycopg 3 on three connections. What a run says all the time is awaited
from trio through libpq's non-blocking API (:class:`.pg_async.AsyncLink`, no thread):
on one connection only the group commits of :mod:`.base` (rows going on the wire with
the outcomes buffered meanwhile), which connections wait for before writing; on
another the reservations and the lease renewals, so that neither delays a commit. The
third serves the synchronous calls (joining, lookups, counts, the last flush;
:class:`.pg_sql.Link`). A lost connection is reopened with a backoff, then the run
stops with one line: the journal is consistent, ``--resume`` continues.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..settings import DEFAULT_LEASE
from .base import STATES, BaseJournal, Entry, Record, State
from .pg_async import AsyncLink
from .pg_rate import CampaignRate
from .pg_sql import (
    GROUP_COMMIT,
    LOOKUP,
    RENEW,
    RESERVE,
    SETTLE,
    WIRE,
    Link,
    file_digest,
    join,
    parse_url,
)  # fmt: skip

__all__ = ["PostgresJournal"]

_log = logging.getLogger("triomail.send")


class PostgresJournal(BaseJournal):
    """A campaign in PostgreSQL; see the module's theory of operation."""

    shared = True

    def __init__(
        self, conninfo: str, name: str, url: str, lease: float, rate: float | None = None
    ) -> None:
        self.name = name
        self.url = url
        self.lease = lease
        #: Everything said from synchronous code (joining, lookups, counts, the last
        #: flush); then, awaited from trio without a thread: the group commits (what
        #: connections wait for, so nothing else queues on it), and the reservations
        #: and lease renewals.
        self._claims = Link(conninfo, url)
        self._links: list[Link] = [self._claims]
        try:
            self._wire = AsyncLink(conninfo, url)
            self._links.append(self._wire)
            self._writer = AsyncLink(conninfo, url)
            self._links.append(self._writer)
        except BaseException:
            self._close_links()
            raise
        self._claimable = ["pending"]
        #: The fence each claimed row had when this run claimed it.
        self._fences: dict[str, int] = {}
        self._pending: list[tuple[Any, ...]] = []
        #: Late outcomes refused because another worker took the row over.
        self.stale = 0
        self._renewed = time.monotonic()
        self._rate = None if rate is None else CampaignRate(self._writer, name, rate)
        self.paced = self._rate is not None

    @property
    def where(self) -> str:
        return self.url

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
        rate: float | None = None,
    ) -> tuple[PostgresJournal, dict[str, int]]:
        """Join (or start) the campaign; return the journal and its counts by state.

        A campaign started with another recipients file or template is refused
        unless ``resume`` (then, as with SQLite, unsent rows use the new template).
        ``rate``: the campaign's messages per second, shared by all its workers.
        """
        conninfo, name, shown = parse_url(url)
        lease = DEFAULT_LEASE if lease is None else lease
        journal = cls(conninfo, name, shown, lease, rate)
        try:
            journal._join(resume, file_digest(source) if source else "", content)
            return journal, journal.counts()
        except BaseException:
            journal.close()
            raise

    def _join(self, resume: bool, source: str, content: str) -> None:
        if resume:
            self._claimable = ["pending", "transient", "unknown"]
        joined = self._claims.run(
            lambda conn: join(conn, self.name, self.url, resume, source, content)
        )
        self.campaign, self.previous_content, self.run = joined

    def close(self) -> None:
        try:
            self.flush()
            if hasattr(self, "run"):
                self._claims.execute(
                    "UPDATE triomail_workers SET finished = now(), seen = now(), stale = %s "
                    "WHERE name = %s AND run = %s",
                    (self.stale, self.name, self.run),
                )
        finally:
            self._close_links()

    def _close_links(self) -> None:
        for link in self._links:
            link.close()

    # ----------------------------------------------------------------- messages

    def counts(self) -> dict[str, int]:
        self.flush()
        counts = dict.fromkeys(STATES, 0)
        rows = self._claims.query(
            "SELECT state, count(*) FROM triomail_messages WHERE name = %s GROUP BY state",
            (self.name,),
        )
        for state, n in rows:
            counts[state] = n
        return counts

    def lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        rows = self._claims.query(LOOKUP, {"name": self.name, "keys": " ".join(keys)})
        return {r[0]: _record(r) for r in rows}

    async def lookup_async(self, keys: list[str]) -> dict[str, Record]:
        if not keys:
            return {}
        params = {"name": self.name, "keys": " ".join(keys)}
        return {r[0]: _record(r) for r in await self._writer.query_async(LOOKUP, params)}

    def records(self) -> list[Record]:
        self.flush()
        rows = self._claims.query(
            "SELECT key, line, content, message_id, state, attempts, done, run "
            "FROM triomail_messages WHERE name = %s ORDER BY line",
            (self.name,),
        )
        return [_record(r) for r in rows]

    def reserve(self, entries: Iterable[Entry]) -> list[str]:
        rows = list(entries)
        if not rows:
            return []
        return self._won(rows, self._claims.query(RESERVE, self._reserve_params(rows)))

    async def reserve_async(self, entries: list[Entry]) -> list[str]:
        if not entries:
            return []
        params = self._reserve_params(entries)
        return self._won(entries, await self._writer.query_async(RESERVE, params))

    def _reserve_params(self, rows: list[Entry]) -> dict[str, Any]:
        return {
            "name": self.name,
            "run": self.run,
            "keys": " ".join([r[0] for r in rows]),
            "rows": json.dumps(rows),
            "states": self._claimable,
            "lease": self.lease,
            "content": rows[0][2],
        }

    def _won(self, rows: list[Entry], taken: list[tuple[Any, ...]]) -> list[str]:
        """The keys won, in the chunk's order; their fences remembered."""
        won = dict(taken)
        self._fences.update(won)
        return [r[0] for r in rows if r[0] in won]

    def unreserve(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            self._fences.pop(key, None)
        if keys:
            self._claims.execute(
                "UPDATE triomail_messages SET lease_until = NULL, updated = now() "
                "WHERE name = %s AND key = ANY(%s) AND run = %s",
                (self.name, keys, self.run),
            )

    def commit_wire(self, keys: list[str]) -> None:
        batch, self._pending = self._pending, []
        self._write_outcomes(batch, keys)

    async def commit_wire_async(self, keys: list[str]) -> None:
        batch, self._pending = self._pending, []  # here: record_outcome appends here
        if not keys and not batch:
            return
        # The outcomes buffered so far go with the rows going on the wire: a connection
        # sends its next messages only once its last ones are settled, so after a crash
        # the rows in flight are those on the wire. The cheapest statement that does it.
        sql = GROUP_COMMIT if keys and batch else WIRE if keys else SETTLE
        try:
            rows = await self._wire.query_async(sql, self._commit_params(batch, keys))
        except BaseException:
            self._pending[:0] = batch  # written by the next flush, or left in flight
            raise
        self._refused(batch, rows)

    def mark(self, entries: Iterable[Entry], state: State) -> None:
        rows = list(entries)
        if not rows:
            return
        self._claims.execute(
            "INSERT INTO triomail_messages AS m "
            "(name, key, line, content, message_id, state, run) "
            "SELECT %s, k, l, ct, mid, %s, %s FROM unnest(%s::text[], %s::int[], "
            "%s::text[], %s::text[]) AS v(k, l, ct, mid) "
            "ON CONFLICT (name, key) DO UPDATE SET state = excluded.state, "
            "run = excluded.run, line = excluded.line, updated = now(), lease_until = NULL "
            "WHERE m.lease_until IS NULL OR m.lease_until < now() OR m.run = excluded.run",
            (self.name, state, self.run, [r[0] for r in rows], [r[1] for r in rows],
             [r[2] for r in rows], [r[3] for r in rows]),
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
        self._write_outcomes(batch, [])

    def _write_outcomes(self, batch: list[tuple[Any, ...]], wire: list[str]) -> None:
        """The outcomes (fenced) and the rows going on the wire, in one commit."""
        if not batch and not wire:
            return
        try:
            rows = self._claims.query(GROUP_COMMIT, self._commit_params(batch, wire))
        except BaseException:
            self._pending[:0] = batch  # written by the next flush, or left in flight
            raise
        self._refused(batch, rows)

    def _commit_params(self, batch: list[tuple[Any, ...]], wire: list[str]) -> dict[str, Any]:
        if batch and wire:
            # A message refused before its content has its outcome in the same commit as
            # its mark: the outcome alone (one statement must not update a row twice).
            settled = {item[0] for item in batch}
            wire = [key for key in wire if key not in settled]
        return {
            "name": self.name,
            "run": self.run,
            "wire": " ".join(wire),
            "keys": " ".join([item[0] for item in batch]),
            "batch": json.dumps(batch),
        }

    def _refused(self, batch: list[tuple[Any, ...]], rows: list[tuple[Any, ...]]) -> None:
        """Count and log the outcomes the fence refused (another worker has the row)."""
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
        self._claims.execute(
            "UPDATE triomail_messages SET lease_until = NULL, updated = now(), state = "
            "CASE WHEN state = 'in-flight' THEN 'pending' ELSE state END "
            "WHERE name = %s AND key = ANY(%s) AND run = %s",
            (self.name, keys, self.run),
        )

    def in_flight_of_this_run(self) -> int:
        self.flush()
        ((n,),) = self._claims.query(
            "SELECT count(*) FROM triomail_messages "
            "WHERE name = %s AND state = 'in-flight' AND run = %s",
            (self.name, self.run),
        )
        return int(n)

    # ----------------------------------------------------------------- workers

    async def pace(self) -> None:
        if self._rate is not None:
            await self._rate.take()

    async def periodic(self) -> None:
        """Renew this worker's leases every third of the lease."""
        if time.monotonic() - self._renewed >= self.lease / 3:
            self._renewed = time.monotonic()
            params = {"name": self.name, "run": self.run, "lease": self.lease}
            await self._writer.query_async(RENEW, params)

    def takeover_wait(self) -> float | None:
        ((count, free, seconds),) = self._claims.query(
            "SELECT count(*), count(*) FILTER (WHERE lease_until IS NULL "
            "OR lease_until < now()), EXTRACT(EPOCH FROM min(lease_until) - now()) "
            "FROM triomail_messages "
            "WHERE name = %s AND run <> %s AND state IN ('pending', 'in-flight')",
            (self.name, self.run),
        )
        if not count:
            return None
        if free or seconds is None:
            return 0.0
        return max(0.0, float(seconds))

    def takeover_keys(self) -> set[str]:
        rows = self._claims.query(
            "SELECT key FROM triomail_messages WHERE name = %s AND run <> %s "
            "AND state IN ('pending', 'in-flight') "
            "AND (lease_until IS NULL OR lease_until < now())",
            (self.name, self.run),
        )
        return {r[0] for r in rows}


def _record(r: Sequence[Any]) -> Record:
    done = tuple(json.loads(r[6])) if r[6] else ()
    return Record(r[0], r[1], r[2], r[3], r[4], r[5], done, r[7])
