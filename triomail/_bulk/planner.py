"""Per row of the recipients file, what to do: send it, skip it, or report it (sans-IO).

Theory of operation
-------------------
Rows are planned a chunk at a time (:func:`chunks`): :func:`plan_chunk` asks the
journal once what it knows of the chunk's rows (``Policy.lookup``), then decides each
row in file order from that alone, and changes nothing:

* a row the reader refused, or whose message the template or the render process
  refused, is *bad*: reported, counted, never sent;
* a row whose content key appears twice in the chunk, or was already claimed in this
  run (the journal says so), is a duplicate of the first: bad too (the key is a digest
  of the row's fields, so the same person would get the same message twice);
* with ``--resume``, a row the journal knows as accepted or permanently refused was
  settled *earlier* and is not sent again (refused: unless ``--retry-refused``); one
  refused locally (``refused``: no server saw it) is checked again against the server
  and the message as they are now; one whose outcome is unknown (in flight
  when a run was cut off) is resent with its Message-ID, or, with
  ``--at-most-once``, skipped and recorded as unknown;
* ``--limit``: once the chunk's budget of messages to send is planned, the rest of the
  chunk is not looked at (the caller stops reading);
* ``--exclude``: addresses in the suppression list leave the envelope; a row with no
  recipient left is *suppressed*: recorded, not sent (:mod:`.suppression`);
* every other row is sent: with the message the render process made of it when there
  is one and its Message-ID is the one the journal expects (the default for a new
  row), else rendered here with the journal's Message-ID.

The caller (:mod:`.feed`, or a dry run) applies the plan: reports the notes in order
(:mod:`.outcomes`) and hands the messages to send to the pool.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .journal import Record
from .recipients import BadRow, Row
from .suppression import normalize
from .template.rendered import Rendered, RowError

__all__ = [
    "AtMostOnce", "ChunkPlan", "Policy", "Suppressed", "chunk_keys", "chunks", "plan_chunk",
]  # fmt: skip


def chunks(rows: Iterable[Row | BadRow], size: int) -> Iterator[list[Row | BadRow]]:
    """The rows in lists of ``size`` (the last one shorter)."""
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass(frozen=True, slots=True)
class Policy:
    """What the planner needs to know about this run."""

    #: This run's number in the journal (a row claimed by it again is a duplicate).
    run: int
    #: --at-most-once: skip the rows whose outcome is unknown instead of resending them.
    at_most_once: bool
    #: The Message-ID of a row the journal does not know, from its key.
    message_id: Callable[[str], str]
    #: The template's ``render(fields, message_id=...)``; raises :class:`RowError`.
    render: Callable[..., Rendered]
    #: What the journal knows of these keys (``Journal.lookup``), asked once per chunk.
    lookup: Callable[[list[str]], Mapping[str, Record]]
    #: --retry-refused: send again the messages a server refused for good.
    retry_refused: bool = False
    #: ``--exclude``: addresses never mailed, as :func:`.suppression.normalize` writes them.
    excluded: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AtMostOnce:
    """A row skipped by --at-most-once: an earlier attempt may have delivered it."""

    row: Row
    record: Record


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A row whose every recipient is excluded (``--exclude``): recorded, not sent."""

    row: Row
    message_id: str
    recipients: tuple[str, ...]


@dataclass(slots=True)
class ChunkPlan:
    """The decisions for one chunk."""

    #: The messages to send, in file order, with what the journal knew of each.
    send: list[tuple[Row, Rendered, Record | None]] = field(default_factory=list)
    #: In file order: rows not sent and reported (bad rows, duplicates, --at-most-once,
    #: --exclude).
    notes: list[BadRow | AtMostOnce | Suppressed] = field(default_factory=list)
    #: Rows settled in an earlier run (accepted or permanently refused): not sent.
    earlier: int = 0
    #: ... of which permanently refused.
    earlier_refused: int = 0


def chunk_keys(chunk: Sequence[Row | BadRow]) -> list[str]:
    """The keys of a chunk's rows that the journal may know."""
    return [r.key for r in chunk if not isinstance(r, BadRow)]


def plan_chunk(
    policy: Policy,
    chunk: Sequence[Row | BadRow],
    budget: int | None = None,
    made: Sequence[Rendered | str | None] | None = None,
    known: Mapping[str, Record] | None = None,
) -> ChunkPlan:
    """Decide every row of ``chunk``.

    ``budget``: messages to send at most (``None``: no limit). ``made``: per row, what
    the render process made of it (its message with the default Message-ID, or why
    the template refused it). ``known``: what the journal knows of the chunk's rows
    (:func:`chunk_keys`), if the caller asked already; else ``policy.lookup``.
    """
    if known is None:
        known = policy.lookup(chunk_keys(chunk))
    plan = ChunkPlan()
    send = plan.send
    notes = plan.notes
    seen: dict[str, int] = {}
    for index, item in enumerate(chunk):
        if isinstance(item, BadRow):
            notes.append(item)
            continue
        if budget is not None and len(send) >= budget:
            break
        key = item.key
        record = known.get(key)
        if key in seen or (record is not None and record.run == policy.run):
            first = seen.get(key) or (record.line if record else 0)
            notes.append(BadRow(item.line, f"duplicate of line {first} (same content), not sent"))
            continue
        seen[key] = item.line
        if record is not None:
            state = record.state
            if state == "accepted" or (state == "permanent" and not policy.retry_refused):
                plan.earlier += 1
                if state == "permanent":
                    plan.earlier_refused += 1
                continue
            if state in ("in-flight", "unknown") and policy.at_most_once:
                notes.append(AtMostOnce(item, record))
                continue
        done = made[index] if made is not None else None
        if done is not None and (record is None or record.message_id == policy.message_id(key)):
            if isinstance(done, str):
                notes.append(BadRow(item.line, done))
                continue
            rendered = done
        else:
            message_id = record.message_id if record is not None else policy.message_id(key)
            try:
                rendered = policy.render(item.fields, message_id=message_id)
            except RowError as exc:
                notes.append(BadRow(item.line, str(exc)))
                continue
        if policy.excluded:
            kept = _not_excluded(rendered.recipients, policy.excluded)
            if not kept:
                notes.append(Suppressed(item, rendered.message_id, rendered.recipients))
                continue
            if len(kept) < len(rendered.recipients):
                rendered = dataclasses.replace(rendered, recipients=kept)
        send.append((item, rendered, record))
    return plan


def _not_excluded(recipients: tuple[str, ...], excluded: frozenset[str]) -> tuple[str, ...]:
    """The recipients not in ``excluded`` (compared with the domain lower-cased)."""
    return tuple(a for a in recipients if normalize(a) not in excluded)
