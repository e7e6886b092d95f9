"""The send journal: where every message's state is kept (see :mod:`.base`).

:func:`open_journal` picks the store from ``--journal``: a ``postgresql://`` URL opens
the shared PostgreSQL journal (:mod:`.postgres`, imported only then: psycopg is an
optional extra), anything else the SQLite file (:mod:`.sqlite`).
"""

from __future__ import annotations

import os

from ..settings import is_url
from .base import (
    FINAL_STATES,
    STATES,
    BaseJournal,
    Entry,
    JournalError,
    Record,
    Settled,
    Snapshot,
    State,
)
from .sqlite import Journal

__all__ = [
    "FINAL_STATES",
    "STATES",
    "BaseJournal",
    "Entry",
    "Journal",
    "JournalError",
    "Record",
    "Settled",
    "Snapshot",
    "State",
    "open_journal",
]


def open_journal(
    target: str | os.PathLike[str] | None,
    *,
    resume: bool,
    source: str = "",
    content: str = "",
    lease: float | None = None,
    rate: float | None = None,
) -> tuple[BaseJournal, dict[str, int]]:
    """Open the journal at ``target`` (a path, a ``postgresql://`` URL, or ``None`` for
    memory); return it and its counts by state. ``lease``: a shared journal's lease;
    ``rate``: its campaign's messages per second, for all its workers."""
    if is_url(target):
        from .postgres import PostgresJournal

        assert isinstance(target, str)
        return PostgresJournal.open(
            target, resume=resume, source=source, content=content, lease=lease, rate=rate
        )
    return Journal.open(target, resume=resume, source=source, content=content)
