"""Where the page's messages come from: the running sink, or a folder of ``.eml`` files.

Theory of operation
===================

Both stores answer the same few questions (:class:`Store`): the message ids, newest
first; the bytes, envelope and arrival time of one id; delete one or all; and a
change counter with a way to wait for the next change, which feeds the page's
server-sent events and the API's "wait for n messages".

A **live store** is fed by the sink's ``on_message`` hook and keeps the captured
messages in memory, as the sink itself does (bounded the same way, oldest dropped);
the searched text of a message is made by the first search that reaches it and kept.
A **folder store** keeps no message: each listing is one ``scandir`` sorted by name
(file names written by ``triomail sink --out`` and ``triomail send --dry-run --sink``
sort in arrival order), and a file is read only when a page shows it. A search reads
the header block of each file in turn and stops when a page is full, so memory does
not grow with the folder. Files that come and go behind its back change the folder's
mtime, which :meth:`FolderStore.poll` watches to announce a change.

Summaries (the list's row for one message: headers, size, lint markers) are the
expensive part, one full parse each; a bounded cache keeps the most recent ones.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .lint import Finding, lint
from .mail import Parsed, header_text, headers_only, parse

if TYPE_CHECKING:
    from triomail.testing import CapturedMessage

__all__ = ["Envelope", "FolderStore", "LiveStore", "Loaded", "Store", "Summary"]

#: Summaries kept in memory (a few pages' worth; each is small).
SUMMARY_CACHE = 512
#: Messages a live store keeps, as SMTPSink's default ``max_stored``.
LIVE_LIMIT = 10_000
#: Seconds a folder store waits between looks for new or removed files.
FOLDER_POLL = 1.0
_SEARCHED = ("From", "To", "Cc", "Subject")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session said, as opposed to the headers (absent for files)."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    tls: bool
    authenticated_as: str | None
    peer: str
    helo: str
    transfer: str


@dataclass(frozen=True, slots=True)
class Loaded:
    """One message: its bytes, when it arrived, and its envelope if known."""

    id: str
    data: bytes
    time: float
    envelope: Envelope | None


@dataclass(frozen=True, slots=True)
class Summary:
    """The list's row for one message."""

    id: str
    time: float
    mail_from: str | None
    rcpt_to: tuple[str, ...] | None
    sender: str
    to: str
    subject: str
    size: int
    attachments: int
    problems: tuple[str, ...]
    findings: tuple[Finding, ...]


class Store:
    """The common part: change tracking, summaries and search."""

    def __init__(self, dkim_keys: Path | None = None) -> None:
        self.dkim_keys = dkim_keys
        self.version = 0
        self._changed = trio.Event()
        self._summaries: OrderedDict[str, Summary] = OrderedDict()

    # --- what each store provides ----------------------------------------------------

    def ids(self) -> list[str]:
        """Every message id, newest first."""
        raise NotImplementedError

    def load(self, message_id: str) -> Loaded | None:
        """The message, or None if there is no such id."""
        raise NotImplementedError

    def _remove(self, message_id: str) -> bool:
        raise NotImplementedError

    def _remove_all(self) -> None:
        raise NotImplementedError

    async def poll(self) -> None:
        """Notice changes made behind the store's back (a folder store); run as a task."""

    # --- shared ----------------------------------------------------------------------

    def delete(self, message_id: str) -> bool:
        """Delete one message; False if there was no such id."""
        removed = self._remove(message_id)
        if removed:
            self._summaries.pop(message_id, None)
            self.changed()
        return removed

    def delete_all(self) -> None:
        """Delete every message."""
        self._remove_all()
        self._summaries.clear()
        self.changed()

    def changed(self) -> None:
        """Count a change and wake whoever waits for one."""
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`version` differs from ``seen``; return it."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    async def wait_for(self, count: int) -> list[str]:
        """Wait until at least ``count`` messages are stored; return the ids."""
        while len(ids := self.ids()) < count:
            await self.wait_changed(self.version)
        return ids

    def summary(self, message_id: str) -> Summary | None:
        """The list row for one message (cached)."""
        cached = self._summaries.get(message_id)
        if cached is not None:
            self._summaries.move_to_end(message_id)
            return cached
        loaded = self.load(message_id)
        if loaded is None:
            return None
        summary = summarize(loaded, self.dkim_keys)
        self._summaries[message_id] = summary
        if len(self._summaries) > SUMMARY_CACHE:
            self._summaries.popitem(last=False)
        return summary

    def page(self, query: str, start: int, limit: int) -> tuple[int | None, list[Summary]]:
        """``limit`` summaries from ``start`` among the matches, and the match count.

        Without a query the count is the number of messages. With one, matching stops
        when the page is full (the count is then None: unknown, at least that many).
        """
        ids = self.ids()
        if not query:
            found = (self.summary(i) for i in ids[start : start + limit])
            return len(ids), [row for row in found if row is not None]
        matches = self._matching(ids, query.lower())
        rows: list[Summary] = []
        for number, message_id in enumerate(matches):
            if number >= start + limit:
                return None, rows
            if number >= start and (row := self.summary(message_id)) is not None:
                rows.append(row)
        return start + len(rows), rows

    def _matching(self, ids: list[str], needle: str) -> Iterator[str]:
        """The ids among ``ids`` whose searched text contains ``needle`` (lower case)."""
        raise NotImplementedError


class LiveStore(Store):
    """Messages as the sink hands them over (``on_message``), kept in memory."""

    def __init__(self, dkim_keys: Path | None = None, limit: int = LIVE_LIMIT) -> None:
        super().__init__(dkim_keys)
        self.limit = limit
        self._messages: OrderedDict[str, Loaded] = OrderedDict()
        # Searched text per id, made on the first search that reaches it: the next
        # searches are a substring test each, and the sink's hot path does no parsing.
        self._searchable: dict[str, str] = {}
        self._serial = 0

    def add(self, message: CapturedMessage) -> None:
        """The sink's ``on_message`` hook."""
        self._serial += 1
        message_id = str(self._serial)
        host, port = message.peer
        self._messages[message_id] = Loaded(
            id=message_id,
            data=message.data,
            time=time.time(),
            envelope=Envelope(
                mail_from=message.mail_from,
                rcpt_to=tuple(message.rcpt_to),
                tls=message.tls,
                authenticated_as=message.authenticated_as,
                peer=f"{host}:{port}",
                helo=message.helo,
                transfer=message.transfer,
            ),
        )
        while len(self._messages) > self.limit:
            dropped, _ = self._messages.popitem(last=False)
            self._summaries.pop(dropped, None)
            self._searchable.pop(dropped, None)
        self.changed()

    def ids(self) -> list[str]:
        return list(reversed(self._messages))

    def load(self, message_id: str) -> Loaded | None:
        return self._messages.get(message_id)

    def _remove(self, message_id: str) -> bool:
        self._searchable.pop(message_id, None)
        return self._messages.pop(message_id, None) is not None

    def _remove_all(self) -> None:
        self._messages.clear()
        self._searchable.clear()

    def _matching(self, ids: list[str], needle: str) -> Iterator[str]:
        for message_id in ids:
            text = self._searchable.get(message_id)
            if text is None and (loaded := self.load(message_id)) is not None:
                text = self._searchable[message_id] = _search_text(loaded)
            if text is not None and needle in text:
                yield message_id


class FolderStore(Store):
    """The ``.eml`` files of one folder, read lazily; the id is the file name."""

    def __init__(self, folder: Path, dkim_keys: Path | None = None) -> None:
        super().__init__(dkim_keys)
        self.folder = folder

    def ids(self) -> list[str]:
        with os.scandir(self.folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".eml") and e.is_file()]
        names.sort(reverse=True)
        return names

    async def poll(self) -> None:
        """Count a change when files come or go (e.g. a sink writing ``--out`` here)."""
        # Adding or removing a file changes the folder's own mtime: one stat, not a listing.
        last = self.folder.stat().st_mtime_ns
        while True:
            await trio.sleep(FOLDER_POLL)
            now = self.folder.stat().st_mtime_ns
            if now != last:
                last = now
                self.changed()

    def _path(self, message_id: str) -> Path | None:
        # The id comes from a URL: only a plain file name in the folder is accepted.
        if "/" in message_id or "\\" in message_id or not message_id.endswith(".eml"):
            return None
        if message_id.startswith("."):
            return None
        path = self.folder / message_id
        return path if path.is_file() else None

    def load(self, message_id: str) -> Loaded | None:
        path = self._path(message_id)
        if path is None:
            return None
        try:
            return Loaded(message_id, path.read_bytes(), path.stat().st_mtime, None)
        except OSError:
            return None

    def _matching(self, ids: list[str], needle: str) -> Iterator[str]:
        for message_id in ids:
            path = self._path(message_id)
            if path is not None and needle in _header_search_text(_head(path)):
                yield message_id

    def _remove(self, message_id: str) -> bool:
        path = self._path(message_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True

    def _remove_all(self) -> None:
        for message_id in self.ids():
            self._remove(message_id)


def summarize(loaded: Loaded, dkim_keys: Path | None, parsed: Parsed | None = None) -> Summary:
    """Lint one message into its list row (``parsed``: ``loaded.data`` parsed, if at hand)."""
    parsed = parse(loaded.data) if parsed is None else parsed
    findings = tuple(lint(loaded.data, parsed, dkim_keys))
    envelope = loaded.envelope
    return Summary(
        id=loaded.id,
        time=loaded.time,
        mail_from=None if envelope is None else envelope.mail_from,
        rcpt_to=None if envelope is None else envelope.rcpt_to,
        sender=header_text(parsed.message, "From"),
        to=header_text(parsed.message, "To"),
        subject=header_text(parsed.message, "Subject"),
        size=len(loaded.data),
        attachments=len(parsed.attachments),
        problems=tuple(f.code for f in findings if f.ok is False),
        findings=findings,
    )


def _head(path: Path, limit: int = 16 * 1024) -> bytes:
    """The start of a file, enough for the headers a search looks at."""
    with open(path, "rb") as file:
        return file.read(limit)


def _search_text(loaded: Loaded) -> str:
    text = _header_search_text(loaded.data)
    if loaded.envelope is not None:
        text += " " + " ".join((loaded.envelope.mail_from, *loaded.envelope.rcpt_to)).lower()
    return text


def _header_search_text(data: bytes) -> str:
    headers = headers_only(data)
    return " ".join(header_text(headers, name) for name in _SEARCHED).lower()
