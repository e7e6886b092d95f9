"""The render process's records: one row as it crosses the pipe, encoded and decoded here.

Theory of operation
-------------------
The render process (:mod:`.render_process`) sends each row it read as one record in a
:mod:`marshal` frame. marshal writes built-in types only (an exact ``tuple``, not a
``NamedTuple``), so a record is a plain tuple whose first item says what it is. This
module is the one place that knows the positions: the child builds records with the
``encode_*`` functions, the parent checks them with :func:`valid` and turns them back
into the named objects both ends use anyway (:class:`.recipients.Row`,
:class:`.recipients.BadRow`, :class:`.template.rendered.Rendered`) with :func:`decode`.

Layouts (``PROTOCOL`` in :mod:`.render_process` is bumped when one changes):

* ``(BAD, line, error)``: a row the reader refused;
* ``(RENDERED, line, key, fields, data, sender, recipients, message_id, smtputf8,
  eight_bit)``: a message (``eight_bit``: :func:`.template.rendered.canonical_eight_bit` of
  ``data``, computed in the child so that the parent need not scan the bytes);
* ``(REFUSED, line, key, fields, error)``: a row the template refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .recipients import BadRow, Row
from .template.rendered import Rendered, canonical_eight_bit

__all__ = [
    "BAD",
    "FIRST_BATCH",
    "MAX_BATCH",
    "REFUSED",
    "RENDERED",
    "WireRecord",
    "decode",
    "encode_bad",
    "encode_refused",
    "encode_rendered",
    "last_line",
    "valid",
]

#: The kinds of record (the first item).
BAD: Final = 0
RENDERED: Final = 1
REFUSED: Final = 2

#: A record as marshal carries it.
WireRecord = tuple[Any, ...]

#: Rows are handled in batches (the render process's frames, the parent's chunks): the
#: first of FIRST_BATCH rows so that the first messages leave at once, then each twice
#: as large up to MAX_BATCH.
FIRST_BATCH = 16
MAX_BATCH = 256


def encode_bad(row: BadRow) -> WireRecord:
    """A row the reader refused."""
    return (BAD, row.line, row.error)


def encode_rendered(row: Row, message: Rendered) -> WireRecord:
    """A row rendered to a message."""
    data = message.data
    return (
        RENDERED, row.line, row.key, row.fields, data, message.sender, message.recipients,
        message.message_id, message.smtputf8, canonical_eight_bit(data),
    )  # fmt: skip


def encode_refused(row: Row, error: str) -> WireRecord:
    """A row the template refused, and why."""
    return (REFUSED, row.line, row.key, row.fields, error)


def valid(record: object) -> bool:
    """Is ``record`` one of the three layouts, with the right types?"""
    if type(record) is not tuple or not record:
        return False
    kind = record[0]
    if kind == RENDERED:
        if len(record) != 10:
            return False
        _, line, key, fields, data, sender, recipients, message_id, smtputf8, eight_bit = record
        return (
            type(line) is int
            and type(key) is str
            and type(fields) is dict
            and type(data) is bytes
            and type(sender) is str
            and type(recipients) is tuple
            and type(message_id) is str
            and type(smtputf8) is bool
            and (eight_bit is None or type(eight_bit) is bool)
        )
    if kind == BAD:
        return len(record) == 3 and type(record[1]) is int and type(record[2]) is str
    if kind == REFUSED:
        if len(record) != 5:
            return False
        _, line, key, fields, error = record
        return (
            type(line) is int and type(key) is str and type(fields) is dict and type(error) is str
        )
    return False


def last_line(records: Sequence[WireRecord]) -> int:
    """The line of the last record of a batch (records are in file order)."""
    return int(records[-1][1])


def decode(
    records: Sequence[WireRecord], after: int = 0
) -> tuple[list[Row | BadRow], list[Rendered | str | None]]:
    """The rows of checked records, and what the child made of each.

    For each row: its :class:`.template.rendered.Rendered` message, the template's refusal (a
    string), or ``None`` for a row the reader refused. Records of lines up to
    ``after`` (rows the parent read and rendered itself) are left out.
    """
    if after and records and records[0][1] <= after:
        records = [r for r in records if r[1] > after]
    rows: list[Row | BadRow] = []
    made: list[Rendered | str | None] = []
    for record in records:
        kind = record[0]
        if kind == RENDERED:
            _, line, key, fields, data, sender, recipients, message_id, smtputf8, eight_bit = record
            rows.append(Row(line, fields, key))
            made.append(Rendered(data, sender, recipients, message_id, smtputf8, eight_bit))
        elif kind == BAD:
            _, line, error = record
            rows.append(BadRow(line, error))
            made.append(None)
        else:
            _, line, key, fields, error = record
            rows.append(Row(line, fields, key))
            made.append(error)
    return rows, made
