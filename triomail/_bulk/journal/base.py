"""The one journal interface that the send command uses, whatever stores the states.

Theory of operation
-------------------
Every message is identified by its recipients-file row (:attr:`.recipients.Row.key`, a
hash of the row's content) and carries the template's hash as its content hash. Its
state moves

    pending -> in-flight -> accepted | transient | permanent | unknown | refused

The send command *reserves* a chunk's rows when it plans them (:meth:`BaseJournal.reserve`:
this run's, a shared journal's other workers keep off them), and a message is marked
*in-flight* in a committed transaction before its content is written, the part that can
deliver it: the pool asks for the commit when it takes the message for a run and writes
its envelope (:meth:`BaseJournal.request`, see triomail/_pool/wire.py) and awaits
:meth:`BaseJournal.on_wire` just before the content. Those commits are grouped: every
connection that asks while one commit runs waits for the next, which carries all their
rows and the outcomes buffered meanwhile (:meth:`BaseJournal.background`, every
``GROUP_COMMIT_SECONDS`` at least); a store with :attr:`BaseJournal.inline_commits`
(SQLite: a redo log, :mod:`.wirelog`) commits each row when it is awaited instead. So after a
crash the rows in flight are those that were on the wire, a few per connection, and
their outcomes lag their replies by milliseconds: only those are unknown, which
``--resume`` resends with the same Message-ID or, with ``--at-most-once``, skips (R37,
R38). A reserved row never written is sent again as if never tried.

Two stores implement the interface: :mod:`.sqlite` (one file, one process; the default)
and :mod:`.postgres` (one campaign shared by any number of processes on any number of
machines). A shared journal may refuse a claim (another worker holds the row: the
claim returns only the keys won) and hands rows of a dead worker to the survivors
(:meth:`BaseJournal.takeover_wait`). The same contract suite
(tests/bulk/test_journal_contract.py) runs against both.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import trio

__all__ = [
    "FINAL_STATES",
    "GROUP_COMMIT_SECONDS",
    "LOG_COMMIT_SECONDS",
    "STATES",
    "BaseJournal",
    "Snapshot",
    "Entry",
    "JournalError",
    "Record",
    "Settled",
    "State",
]

State = Literal[
    "pending", "in-flight", "accepted", "transient", "permanent", "unknown", "refused",
    "suppressed",
]  # fmt: skip
#: ``refused``: refused locally, before any server saw it (larger than the server's
#: SIZE, a UTF-8 address without SMTPUTF8). No server said no, so it is not final: each
#: --resume checks it again, against the server and the message as they are then.
#: ``suppressed``: every recipient was excluded (--exclude); not final either, each run
#: checks the row against its own exclusions.
STATES: Final = (
    "pending", "in-flight", "accepted", "transient", "permanent", "unknown", "refused",
    "suppressed",
)  # fmt: skip
#: States that --resume never sends again.
FINAL_STATES: Final = frozenset({"accepted", "permanent"})
#: Seconds between two commits of buffered outcomes while no message goes on the wire.
GROUP_COMMIT_SECONDS: Final = 0.005
#: ... with :attr:`BaseJournal.inline_commits` (a redo log keeps what is not committed:
#: the database commit is bookkeeping, each one costs the same whatever it carries).
LOG_COMMIT_SECONDS: Final = 0.05
#: What a claim or a mark is given per message: ``(key, line, content, message_id)``.
Entry = tuple[str, int, str, str]


class JournalError(Exception):
    """The journal cannot be used as asked (exists without --resume, unreadable...)."""


@dataclass(frozen=True, slots=True)
class Record:
    """What the journal knows about one message."""

    key: str
    line: int
    content: str
    message_id: str
    state: State
    attempts: int
    done: tuple[str, ...]
    run: int


@dataclass(frozen=True, slots=True)
class Settled:
    """A final (for this run) state to record for one message."""

    key: str
    state: State
    attempts: int
    code: int | None
    enhanced: str | None
    text: str | None
    done: Sequence[str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A journal's state as ``triomail status`` shows it (read without changing it)."""

    #: The campaign's random id (in every Message-ID).
    campaign: str
    #: Messages per state, per run (a worker of a shared journal, or one run of a file).
    by_run: dict[int, dict[str, int]]
    #: Per run, who it is (host, pid, running or finished), where the store knows.
    workers: dict[int, str]


class _WireBatch:
    """Rows waiting for the next group commit, and the event their writers wait on."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.wake = trio.Event()
        self.done = trio.Event()
        self.error: str | None = None


class BaseJournal(abc.ABC):
    """An open journal: the send command's only view of the stored states."""

    #: Random per campaign: part of every Message-ID, so two batches never share one.
    campaign: str
    #: This run's number (unique per worker in a shared journal).
    run: int
    #: The template digest recorded by the previous run ("" if none).
    previous_content: str = ""
    #: Other processes may share the campaign (claims can be refused, rows taken over).
    shared: bool = False

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the journal is, for messages (a path, a URL without password)."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """The number of messages in each state (committing buffered outcomes first)."""

    @abc.abstractmethod
    def lookup(self, keys: Sequence[str]) -> dict[str, Record]:
        """The records of those keys that the journal has."""

    @abc.abstractmethod
    def records(self) -> list[Record]:
        """Every record, in line order (for tests and inspection; loads them all)."""

    def claim(self, entries: Iterable[Entry]) -> list[str]:
        """:meth:`reserve`, then :meth:`commit_wire` (with any buffered outcomes).

        Returns the keys claimed, in order: all of them unless another worker holds
        some. After this returns, a crash leaves them in-flight, never forgotten.
        """
        keys = self.reserve(entries)
        self.commit_wire(keys)
        return keys

    @abc.abstractmethod
    def mark(self, entries: Iterable[Entry], state: State) -> None:
        """Record messages that were not sent in this run (e.g. skipped unknowns)."""

    @abc.abstractmethod
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
        """Buffer a message's outcome (the hot path); committed by :meth:`flush`."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Commit buffered outcomes now."""

    @abc.abstractmethod
    def release(self, keys: Iterable[str]) -> None:
        """Put claimed messages that were never handed to the pool back to pending."""

    @abc.abstractmethod
    def in_flight_of_this_run(self) -> int:
        """Messages this run left in flight."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commit what is buffered and close."""

    def record(self, outcome: Settled) -> None:
        """Buffer a message's outcome given as a :class:`Settled`."""
        self.record_outcome(
            outcome.key,
            outcome.state,
            outcome.attempts,
            outcome.code,
            outcome.enhanced,
            outcome.text,
            outcome.done,
        )

    @abc.abstractmethod
    def reserve(self, entries: Iterable[Entry]) -> list[str]:
        """Take rows for this run without marking them in flight (see :meth:`on_wire`);
        the keys taken (a shared journal's other workers may hold some)."""

    def unreserve(self, keys: Iterable[str]) -> None:
        """Give back reserved rows never handed to the pool (a shared journal's leases)."""
        return None

    @abc.abstractmethod
    def commit_wire(self, keys: list[str]) -> None:
        """Mark these rows in flight and commit, with the buffered outcomes."""

    async def reserve_async(self, entries: list[Entry]) -> list[str]:
        """:meth:`reserve` from a trio task (a network journal runs it in a thread)."""
        return self.reserve(entries)

    async def lookup_async(self, keys: list[str]) -> dict[str, Record]:
        """:meth:`lookup` from a trio task (a network journal awaits it without a thread)."""
        return self.lookup(keys)

    async def commit_wire_async(self, keys: list[str]) -> None:
        """:meth:`commit_wire` from a trio task (a network journal runs it in a thread)."""
        self.commit_wire(keys)

    #: The next group commit (while :meth:`background` runs).
    _batch: _WireBatch | None = None
    #: Rows asked for and the group commit that carries them; rows committed since.
    _asked: dict[str, _WireBatch]
    _wired: set[str]
    #: Why a group commit failed, the first time one did (the run then stops).
    failure: str | None = None

    #: The store commits fast in the calling thread (:meth:`wire_now`: SQLite's redo
    #: log): :meth:`wired` commits a row at once rather than say "not yet", and
    #: :meth:`background` commits the database on its clock alone.
    inline_commits: bool = False

    def wire_now(self, keys: list[str]) -> None:
        """Commit these rows in flight, with the buffered outcomes, in the calling
        thread (a store with :attr:`inline_commits` does it cheaply)."""
        self.commit_wire(keys)

    def request(self, keys: Sequence[str]) -> None:
        """Queue these rows for the next group commit and wake the committer; never
        waits (the pool asks this as it writes their envelopes, so the commit overlaps
        a round trip). A store with :attr:`inline_commits` needs nothing ahead."""
        batch = self._batch
        if batch is None or self.inline_commits:
            return
        asked, wired = self._asked, self._wired
        for key in keys:
            if key not in asked and key not in wired:
                asked[key] = batch
                batch.keys.append(key)
        batch.wake.set()

    def wired(self, keys: list[str]) -> bool:
        """True if these rows are committed in flight now (asked for with
        :meth:`request`), so their content may be written: the caller writes it, so
        the answer is given once. A store with :attr:`inline_commits` commits them at
        once, with the outcomes settled since. Else :meth:`on_wire` must be awaited.
        :class:`JournalError` if they cannot be."""
        if self._batch is None:
            return False
        if self.inline_commits:
            try:
                self.wire_now(keys)
            except JournalError as exc:
                self.failure = self.failure or str(exc)
                raise
            return True
        wired = self._wired
        if all(key in wired for key in keys):
            wired.difference_update(keys)
            return True
        return False

    async def on_wire(self, keys: list[str]) -> None:
        """Return once these rows are committed in flight (grouped with the others
        asked for meanwhile when :meth:`background` runs); :class:`JournalError` if
        they could not be: then they must not be written."""
        if self._batch is None:  # no group commits: alone
            await self.commit_wire_async(keys)
            return
        if self.wired(keys):
            return
        self.request(keys)
        for key in keys:
            while key not in self._wired:
                batch = self._asked.get(key)
                if batch is None:  # its commit failed: ask once more, or give up
                    if self.failure is not None:
                        raise JournalError(self.failure)
                    self.request([key])
                    continue
                await batch.done.wait()
                if batch.error is not None:
                    raise JournalError(batch.error)
        self._wired.difference_update(keys)

    def _next_group(self) -> _WireBatch:
        """The group to commit now; later requests go to a new one."""
        batch, self._batch = self._batch, _WireBatch()
        assert batch is not None
        return batch

    def _group_failed(self, batch: _WireBatch, exc: JournalError) -> None:
        batch.error = str(exc)
        self.failure = self.failure or batch.error

    def _group_done(self, batch: _WireBatch) -> None:
        if batch.error is None:
            self._wired.update(batch.keys)
        for key in batch.keys:
            del self._asked[key]
        batch.done.set()

    async def background(self) -> None:
        """The group commits (and a store's periodic work), until cancelled.

        A failed commit fails its waiters (their messages are not written) and the
        next ones try again: a full disk or a lost database stops the run through
        its feed (:attr:`failure`), not by cutting off what is on the wire."""
        self._batch = _WireBatch()
        self._asked, self._wired = {}, set()
        period = LOG_COMMIT_SECONDS if self.inline_commits else GROUP_COMMIT_SECONDS
        try:
            while True:
                with trio.move_on_after(period):
                    await self._batch.wake.wait()
                if self.inline_commits:  # what the redo log holds, on the clock
                    try:
                        await self.commit_wire_async([])
                    except JournalError as exc:
                        self.failure = self.failure or str(exc)
                else:
                    batch = self._next_group()
                    try:
                        await self.commit_wire_async(batch.keys)
                    except JournalError as exc:
                        self._group_failed(batch, exc)
                    finally:
                        self._group_done(batch)
                await self.periodic()
        finally:
            batch, self._batch = self._batch, None
            if batch is not None:
                batch.error = "the journal stopped committing"
                batch.done.set()

    async def periodic(self) -> None:
        """A store's own work between group commits (a shared journal's leases)."""
        return None

    #: The campaign has a rate shared by all its workers (:meth:`pace`).
    paced: bool = False

    async def pace(self) -> None:
        """Return when the next message may go at the campaign's rate (``paced``)."""
        return None

    def takeover_wait(self) -> float | None:
        """Seconds until rows held by other workers may be taken over (0: now); ``None``
        when no other worker holds an unsettled row (always, for a private journal)."""
        return None

    def takeover_keys(self) -> set[str]:
        """The keys whose holder's lease has expired (they may be claimed now)."""
        return set()

    def __enter__(self) -> BaseJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
