"""The PostgreSQL journal's hot statements, driven from trio through libpq's non-blocking API.

Theory of operation
-------------------
The statements a run issues all the time (a chunk's reservation, the group commits
of rows going on the wire and of outcomes, lease renewals) were run by psycopg's
synchronous API in ``trio.to_thread``. Each one then paid two thread hops, and the
worker thread had to win the GIL back from a busy trio loop (rendering, SMTP) to read
its reply: a group commit of 0.3 ms alone took about ten times that inside a run.

:class:`AsyncLink` does the same round trip without a thread. libpq's asynchronous
command processing (PostgreSQL documentation, "Asynchronous Command Processing" and
"Non-Blocking Mode"): ``PQsendQueryParams`` queues the statement, ``PQflush`` writes it
(waiting with :func:`trio.lowlevel.wait_writable` while the socket is full),
``PQconsumeInput`` reads what has arrived (waiting with
:func:`trio.lowlevel.wait_readable`) until ``PQisBusy`` says the results are whole. No
call blocks, so the brief's rule (blocking libraries in ``trio.to_thread``) does not
apply; opening a connection (``psycopg.connect``) does block and runs in a thread.
Parameters are converted and results loaded by psycopg's own :class:`Transformer`, the
one its cursors use, so values travel exactly as through ``cursor.execute``. Each
statement is prepared on the server the first time (``PQsendPrepare``), then only
executed (``PQsendQueryPrepared``): parsed and planned once per connection, as psycopg
does for a statement it sees often.

A round trip is shielded from cancellation, as ``trio.to_thread.run_sync`` was: once a
statement is sent it may commit, and the caller must know whether it did. The server's
``statement_timeout`` (:data:`.pg_sql.STATEMENT_TIMEOUT_MS`) bounds the wait. A lost
connection is reopened with the same doubling backoff as :class:`.pg_sql.Link`, up to
:data:`.pg_sql.RECONNECT_SECONDS`, then the run stops with one line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import trio

from .pg_sql import RECONNECT_SECONDS, Link, psycopg

__all__ = ["AsyncLink", "numbered"]

_NAMED = re.compile(r"%\((\w+)\)s")


def numbered(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """``%(name)s`` placeholders as libpq's ``$1, $2...``; the names in that order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return _NAMED.sub(number, sql).encode(), tuple(names)


class AsyncLink(Link):
    """One connection whose statements are awaited from trio (never from a thread)."""

    def __init__(self, conninfo: str, url: str) -> None:
        super().__init__(conninfo, url)
        self.conn.pgconn.nonblocking = 1
        self._lock = trio.Lock()
        self._statements: dict[str, tuple[bytes, tuple[str, ...]]] = {}
        #: Server-side prepared statements of this connection, by text and parameter
        #: types (as psycopg's own cache keys them): parsed and planned once.
        self._prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = {}

    async def query_async(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement (``%(name)s`` placeholders), reconnecting with
        backoff if the connection was lost; any other error is one
        :class:`JournalError` line."""
        statement = self._statements.get(sql)
        if statement is None:
            statement = self._statements[sql] = numbered(sql)
        command, names = statement
        values = [params[name] for name in names]
        deadline = time.monotonic() + RECONNECT_SECONDS
        delay = 0.1
        async with self._lock:
            while True:
                try:
                    if self.conn.closed:
                        self.conn = await trio.to_thread.run_sync(self._connect)
                        self.conn.pgconn.nonblocking = 1
                        self._prepared.clear()
                    with trio.CancelScope(shield=True):
                        return await self._round_trip(command, values)
                except psycopg.Error as exc:
                    self.lost(exc, deadline, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _round_trip(self, command: bytes, values: list[Any]) -> list[tuple[Any, ...]]:
        """Run one prepared statement (preparing it the first time), waiting for its
        results without blocking; its rows."""
        pgconn = self.conn.pgconn
        tx = psycopg.adapt.Transformer(self.conn)
        dumped = tx.dump_sequence(values, [_AUTO] * len(values))
        key = (command, tuple(tx.types or ()))
        name = self._prepared.get(key)
        if name is None:
            name = f"triomail_{len(self._prepared)}".encode()
            pgconn.send_prepare(name, command, tx.types)
            self._rows(tx, await self._results())
            self._prepared[key] = name
        pgconn.send_query_prepared(name, dumped, tx.formats)
        return self._rows(tx, await self._results())

    async def _results(self) -> list[Any]:
        """The results of what was sent, read without blocking. (Each libpq call raises
        psycopg.OperationalError when the socket fails.)"""
        pgconn = self.conn.pgconn
        while pgconn.flush():
            await trio.lowlevel.wait_writable(pgconn.socket)
        results: list[Any] = []
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    return results
                results.append(result)
            await trio.lowlevel.wait_readable(pgconn.socket)

    def _rows(self, tx: Any, results: list[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for result in results:
            if result.status == _FATAL:
                raise psycopg.errors.error_from_result(result, self.conn.info.encoding)
            if result.status == _TUPLES_OK:
                tx.set_pgresult(result)
                rows.extend(tx.load_rows(0, result.ntuples, tuple))
        return rows


if psycopg is not None:
    import psycopg.adapt

    _AUTO = psycopg.adapt.PyFormat.AUTO
    _FATAL = psycopg.pq.ExecStatus.FATAL_ERROR
    _TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
