"""The pool's input: rows read, planned, reserved in the journal, then handed over.

Theory of operation
-------------------
:meth:`Feed.messages` is an async generator that the pool consumes lazily. It takes
rows a chunk at a time, from the recipients file or from the render process
(:mod:`.render_process`, records decoded by :mod:`.records`), has the planner decide
each row (:mod:`.planner`), records what is not sent (:mod:`.outcomes`), reserves the
chunk's messages in one committed journal transaction, and only then yields them one
by one. The pool marks each in flight just before writing it (``on_wire``, see
:mod:`.journal.base`): a message on the wire is never unknown to the journal, and a
reserved one never written is not in doubt. Chunks are small at first so the first
messages leave at once.

With ``--render auto`` the render process starts while the first rows are read and
rendered here; once its first batch is there it is told to skip the rows read here so
far, and rows are read here a few at a time until one of its batches goes beyond them
(its batches of rows read here are dropped), or for at most ``CATCH_UP_CHUNKS``
chunks (then its rows are taken, and waited for if need be): a slow template,
rendered here as fast as there, would never let it catch up.

A shared journal (:mod:`.journal.postgres`) may refuse part of a reservation: those rows
belong to another worker and are left out here. Once the file is done, rows that other
workers held past their lease (they died or stalled) are taken over: the file is read
again for just those keys (:meth:`Feed._takeover_chunks`), until no other worker
holds an unsettled row.

A first signal sets :attr:`Feed.stopping`: no more rows are read. Messages reserved
and not yet handed to the pool are given back (:meth:`Feed.close`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing

import trio

from .._core.errors import LocalProtocolError
from .._core.prepare import PreparedMessage, prepare, prepare_rendered
from .journal import BaseJournal, JournalError, Record
from .outcomes import Outcomes, Tag
from .planner import ChunkPlan, Policy, chunk_keys, chunks, plan_chunk
from .recipients import BadRow, RecipientsReader, Row, estimate_rows
from .records import FIRST_BATCH, MAX_BATCH, WireRecord, decode, last_line
from .render_process import NOT_READY, RenderProcess, RenderProcessError
from .template.rendered import Rendered, canonical_eight_bit

__all__ = ["CATCH_UP_CHUNKS", "Feed", "prepared_message"]

_log = logging.getLogger("triomail.send")

#: --render auto: chunks rendered here while the render process catches up.
CATCH_UP_CHUNKS = 4
#: Shortest and longest wait between two looks for rows to take over (seconds): the
#: other workers usually finish their rows long before their leases could expire.
TAKEOVER_POLL = (0.05, 1.0)


def prepared_message(rendered: Rendered, recipients: tuple[str, ...], tag: Tag) -> PreparedMessage:
    """The message as the pool takes it, without :func:`prepare`'s checks when possible.

    The renderer writes canonical CRLF text with short lines and checks the addresses,
    so a message that :func:`canonical_eight_bit` finds canonical goes through the
    core's one trusted constructor, :func:`prepare_rendered`; anything else goes
    through :func:`prepare`.
    """
    data = rendered.data
    eight_bit = rendered.eight_bit
    if eight_bit is None:
        eight_bit = canonical_eight_bit(data)
    if eight_bit is None:
        return prepare(data, sender=rendered.sender, recipients=recipients, tag=tag)
    return prepare_rendered(
        data,
        eight_bit=eight_bit,
        sender=rendered.sender,
        recipients=recipients,
        needs_smtputf8=rendered.smtputf8,
        message_id=rendered.message_id,
        tag=tag,
    )


def _message(row: Row, rendered: Rendered, record: Record | None) -> PreparedMessage:
    """A planned row's message, to the recipients without a final outcome yet."""
    if record is None:
        tag = Tag(row.key, row.line, rendered.message_id, ())
        return prepared_message(rendered, rendered.recipients, tag)
    done = record.done
    tag = Tag(row.key, row.line, rendered.message_id, done, previous=record.state)
    recipients = tuple(r for r in rendered.recipients if r not in done)
    return prepared_message(rendered, recipients, tag)


class Feed:
    """Rows in, prepared messages out (:meth:`messages`), each reserved in the journal."""

    def __init__(
        self,
        reader: RecipientsReader,
        journal: BaseJournal,
        policy: Policy,
        outcomes: Outcomes,
        *,
        content: str,
        limit: int | None,
        renderer: RenderProcess | None = None,
        catch_up: bool = False,
        reread: Callable[[], Iterable[Row | BadRow]] | None = None,
    ) -> None:
        self.reader = reader
        self.journal = journal
        self.policy = policy
        self.outcomes = outcomes
        #: The template's digest, recorded with each reserved message.
        self.content = content
        self.limit = limit
        #: The render process, if rows are rendered in one (--render).
        self.renderer = renderer
        #: --render auto: read and render the first rows here while it starts.
        self.catch_up = catch_up
        #: Set by the first signal: read no more rows.
        self.stopping = False
        #: Messages handed to the pool so far, and the line of the last one.
        self.handed = 0
        self.last_line = 0
        #: Set when --limit stopped the reading (rows may follow, not sent).
        self.limited = False
        #: Claimed in the journal, not handed to the pool yet (released by :meth:`close`).
        self.unhanded: deque[str] = deque()
        #: Why the rows stopped before the end of the file (the render process failed,
        #: or the journal could not reserve any more), if they did.
        self.render_error: str | None = None
        #: The recipients file read again (shared journal: rows to take over).
        self.reread = reread
        #: Rows another worker of a shared journal reserved first (not ours to send).
        self.elsewhere = 0

    async def messages(self) -> AsyncIterator[PreparedMessage]:
        """The pool's input: rows planned, reserved in the journal, then yielded."""
        outcomes = self.outcomes
        progress = outcomes.progress
        outstanding = outcomes.outstanding
        unhanded = self.unhanded
        report = outcomes.report is not None
        journal = self.journal
        paced = journal.paced
        async with aclosing(self._chunks()) as planned:
            async for plan in planned:
                outcomes.planned(plan)
                sendable = []
                for row, rendered, record in plan.send:
                    try:
                        message = _message(row, rendered, record)
                    except LocalProtocolError as exc:
                        outcomes.bad_row(row.line, str(exc))
                        continue
                    if message.recipients:
                        sendable.append(message)
                    else:  # every recipient had a final outcome in an earlier run
                        progress.earlier += 1
                tags: list[Tag] = [m.tag for m in sendable]  # type: ignore[misc]
                if tags:
                    try:
                        won = await self.journal.reserve_async(
                            [(t.key, t.line, self.content, t.message_id) for t in tags]
                        )
                    except JournalError as exc:
                        # Claim no more (a full disk): what is on the wire finishes.
                        self.render_error = str(exc)
                        return
                    if len(won) < len(tags):  # another worker has the others
                        self.elsewhere += len(tags) - len(won)
                        mine = set(won)
                        sendable = [m for m in sendable if m.tag.key in mine]  # type: ignore[attr-defined]
                        tags = [t for t in tags if t.key in mine]
                unhanded.extend(t.key for t in tags)
                for index, message in enumerate(sendable):
                    if self.stopping:
                        return
                    tag = tags[index]
                    if report:
                        tag.started = time.time()
                    outstanding[tag.key] = tag
                    unhanded.popleft()
                    self.handed += 1
                    self.last_line = tag.line
                    progress.started += 1
                    if paced:  # --campaign-rate
                        await journal.pace()
                    yield message
                await trio.lowlevel.checkpoint()

    async def _chunks(self) -> AsyncGenerator[ChunkPlan]:
        """The plans of the file's chunks, then of the rows taken over from others."""
        async with aclosing(self._file_chunks()) as planned:
            async for plan in planned:
                yield plan
        if self.journal.shared and self.reread is not None:
            async with aclosing(self._takeover_chunks()) as planned:
                async for plan in planned:
                    yield plan

    async def _takeover_chunks(self) -> AsyncGenerator[ChunkPlan]:
        """Rows other workers held past their lease, read again from the file."""
        assert self.reread is not None
        journal = self.journal
        while not self.stopping:
            wait = await trio.to_thread.run_sync(journal.takeover_wait)
            if wait is None:
                return
            await trio.sleep(min(max(wait, TAKEOVER_POLL[0]), TAKEOVER_POLL[1]))
            keys = await trio.to_thread.run_sync(journal.takeover_keys)
            if not keys:
                continue
            rows = (r for r in self.reread() if not isinstance(r, BadRow) and r.key in keys)
            for chunk in chunks(rows, MAX_BATCH):
                if self.stopping:
                    return
                budget = None if self.limit is None else self.limit - self.handed
                if budget is not None and budget <= 0:
                    return
                yield await self._plan(chunk, budget)

    async def _plan(
        self,
        chunk: list[Row | BadRow],
        budget: int | None,
        made: list[Rendered | str | None] | None = None,
    ) -> ChunkPlan:
        """:func:`plan_chunk`, with what the journal knows of the rows asked from trio
        (a journal over the network does not stop the event loop for it)."""
        known = await self.journal.lookup_async(chunk_keys(chunk))
        return plan_chunk(self.policy, chunk, budget, made, known)

    async def _file_chunks(self) -> AsyncGenerator[ChunkPlan]:
        """The plans of chunks of rows, read here or by the render process."""
        renderer = self.renderer
        rows = chunks(self.reader, MAX_BATCH)
        pending: list[Row | BadRow] = []
        size = FIRST_BATCH
        # Reading the render process's batches (no longer rows of our own)? With
        # --render process, from the first row; with auto, once its first batch is ready.
        switched = renderer is not None and not self.catch_up
        last = 0  # the last line read here
        # Chunks read here since the render process was told to skip the rows read
        # here (None: not yet); after a few, its rows are taken even if it is behind.
        skipped: int | None = None
        while not self.stopping:
            budget = None if self.limit is None else self.limit - self.handed
            if budget is not None and budget <= 0:
                self.limited = True
                return
            if renderer is not None:
                records: list[WireRecord] | None = None
                try:
                    if switched:
                        records = await renderer.receive()
                    else:
                        polled = renderer.poll()
                        if skipped is None and polled is not NOT_READY:
                            # It has started: let it jump to the rows not read here yet.
                            renderer.skip_through(last)
                            skipped = 0
                        while (
                            isinstance(polled, list)
                            and last_line(polled) <= last
                            and (skipped or 0) < CATCH_UP_CHUNKS
                        ):
                            # Rows already read and rendered here: keep rendering here
                            # while it catches up (no waiting), for a few chunks.
                            polled = renderer.poll()
                        if skipped is not None:
                            skipped += 1
                        if polled is None or isinstance(polled, list):
                            _log.debug("render process: taking its rows after line %d", last)
                            switched = True
                            pending = []
                            records = polled
                except RenderProcessError as exc:
                    self.render_error = str(exc)
                    return
                if switched:
                    if records is None:
                        return
                    chunk, made = decode(records, last)
                    if chunk:
                        yield await self._plan(chunk, budget, made)
                    continue
            if not pending:
                pending = next(rows, [])
                if not pending:
                    return
            # Small chunks while the render process catches up: it is asked after each.
            step = size if skipped is None else FIRST_BATCH
            chunk, pending = pending[:step], pending[step:]
            last = chunk[-1].line
            yield await self._plan(chunk, budget)
            size = min(MAX_BATCH, size * 2)

    def rows_left(self) -> int:
        """About how many rows follow the last one handed out (counted by lines)."""
        lines = estimate_rows(self.reader.path) + (self.reader.format == "csv")
        return max(0, lines - self.last_line)

    def close(self) -> None:
        """Stop reading the render process; reserved messages never handed go back."""
        if self.renderer is not None:
            self.renderer.close_pipe()
        if self.unhanded:
            self.journal.unreserve(list(self.unhanded))
            self.unhanded.clear()
