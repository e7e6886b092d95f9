"""The render process's record codec: what the child encodes, the parent decodes."""

from __future__ import annotations

import marshal

import pytest

from triomail._bulk.recipients import BadRow, Row
from triomail._bulk.records import (
    decode,
    encode_bad,
    encode_refused,
    encode_rendered,
    last_line,
    valid,
)
from triomail._bulk.template.rendered import Rendered, canonical_eight_bit

ROW = Row(2, {"email": "a@example.com", "name": "Zoë"}, "k2")
MESSAGE = Rendered(
    "Subject: é\r\n\r\nhi\r\n".encode(), "me@example.com", ("a@example.com",), "<k2@x>", True
)


def across_the_pipe(records: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """As the frames carry them."""
    body = marshal.loads(marshal.dumps(("rows", records)))[1]
    assert isinstance(body, list)
    return body


def test_round_trip() -> None:
    records = across_the_pipe(
        [
            encode_rendered(ROW, MESSAGE),
            encode_bad(BadRow(3, "expected 3 fields")),
            encode_refused(Row(4, {"email": "x"}, "k4"), "no address"),
        ]
    )
    assert all(valid(r) for r in records)
    assert last_line(records) == 4
    rows, made = decode(records)
    assert rows == [ROW, BadRow(3, "expected 3 fields"), Row(4, {"email": "x"}, "k4")]
    # The child computed eight_bit, so that the parent need not scan the bytes.
    expected = Rendered(
        MESSAGE.data,
        MESSAGE.sender,
        MESSAGE.recipients,
        MESSAGE.message_id,
        MESSAGE.smtputf8,
        canonical_eight_bit(MESSAGE.data),
    )
    assert made == [expected, None, "no address"]
    assert expected.eight_bit is True


def test_decode_leaves_out_the_rows_read_here() -> None:
    records = [encode_bad(BadRow(line, "bad")) for line in (2, 3, 4)]
    rows, made = decode(records, after=3)
    assert rows == [BadRow(4, "bad")] and made == [None]


@pytest.mark.parametrize(
    "record",
    [
        (),
        [0, 2, "a list"],
        (0, "2", "bad"),
        (0, 2, "bad", "extra"),
        (1, 2, "k", {}, b"data", "s", ("r",), "<m>", False),  # one field short
        (1, 2, "k", {}, "str, not bytes", "s", ("r",), "<m>", False, None),
        (1, 2, "k", {}, b"data", "s", ["a list"], "<m>", False, None),
        (1, 2, "k", {}, b"data", "s", ("r",), "<m>", False, 0),
        (2, 2, "k", {}, None),
        (3, 2),
    ],
)
def test_invalid_records(record: object) -> None:
    assert not valid(record)
