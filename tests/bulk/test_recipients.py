"""Streaming recipients files: CSV dialects, BOM, JSON Lines, bad rows with line numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from triomail._bulk.recipients import BadRow, RecipientsError, RecipientsReader, Row, estimate_rows


def read(path: Path) -> list[Row | BadRow]:
    return list(RecipientsReader.open(path))


def good(items: list[Row | BadRow]) -> list[Row]:
    return [r for r in items if isinstance(r, Row)]


def bad(items: list[Row | BadRow]) -> list[BadRow]:
    return [r for r in items if isinstance(r, BadRow)]


@pytest.mark.parametrize(
    ("text", "dialect"),
    [
        ('email,name\na@example.com,Ann\nb@example.com,"Bob, Jr"\n', "comma"),
        ('email;name\na@example.com;Ann\nb@example.com;"Bob; Jr"\n', "semicolon"),
        ("email\tname\na@example.com\tAnn\nb@example.com\tBob\n", "tab"),
    ],
)
def test_csv_dialects_are_sniffed(tmp_path: Path, text: str, dialect: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(text, encoding="utf-8")
    reader = RecipientsReader.open(path)
    rows = good(list(reader))
    assert reader.dialect == dialect
    assert [r.fields["email"] for r in rows] == ["a@example.com", "b@example.com"]
    assert rows[0].fields["name"] == "Ann"
    assert rows[1].line == 3


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_utf8_with_or_without_bom(tmp_path: Path, bom: bytes) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(bom + "email,name\r\nz@example.org,Zoë\r\n".encode())
    [row] = read(path)
    assert isinstance(row, Row)
    assert row.fields == {"email": "z@example.org", "name": "Zoë"}


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(
        b"email,name\n"
        b"a@example.com,Ann\n"  # 2
        b"b@example.com\n"  # 3: too few fields
        b"c@example.com,\xff\xfe bad\n"  # 4: not UTF-8
        b"d@example.com,Dee,extra\n"  # 5: too many fields
        b"\n"  # 6: blank, ignored
        b'e@example.com,"Multi\nline"\n'  # 7-8: a quoted newline is fine
        b"f@example.com,Fay\n"  # 9
    )
    items = read(path)
    assert [(r.line, r.fields["email"]) for r in good(items)] == [
        (2, "a@example.com"),
        (7, "e@example.com"),
        (9, "f@example.com"),
    ]
    assert good(items)[1].fields["name"] == "Multi\nline"
    errors = {b.line: b.error for b in bad(items)}
    assert set(errors) == {3, 4, 5}
    assert "expected 2 fields, found 1" in errors[3]
    assert "not UTF-8" in errors[4]
    assert "found 3" in errors[5]


def test_malformed_quoting_skips_that_record(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text('email,name\na@example.com,"Ann"x\nb@example.com,Bob\n')
    items = read(path)
    assert [r.fields["email"] for r in good(items)] == ["b@example.com"]
    [err] = bad(items)
    assert err.line == 2
    assert "malformed CSV" in err.error


def test_keys_ignore_column_order_and_differ_by_content(tmp_path: Path) -> None:
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text("email,name\nx@example.com,X\nx@example.com,Y\n")
    b.write_text("name,email\nX,x@example.com\n")
    ka = [r.key for r in good(read(a))]
    kb = [r.key for r in good(read(b))]
    assert ka[0] == kb[0]
    assert ka[0] != ka[1]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"email": "a@example.com", "n": 1}\n'
        b"\n"
        b'{"email": "b@example.com", "tags": ["x"]}\n'
        b"{not json}\n"
        b"[1, 2]\n"
        b'{"email": "\xff"}\n'
        b'{"n": 1, "email": "a@example.com"}\n'
    )
    items = read(path)
    rows = good(items)
    assert [(r.line, r.fields["email"]) for r in rows] == [
        (1, "a@example.com"),
        (3, "b@example.com"),
        (7, "a@example.com"),
    ]
    assert rows[0].key == rows[2].key  # same object, keys in another order
    errors = {b.line: b.error for b in bad(items)}
    assert "malformed JSON" in errors[4]
    assert "expected a JSON object" in errors[5]
    assert "not UTF-8" in errors[6]


def test_jsonl_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "people.txt"
    path.write_text('{"email": "a@example.com"}\n')
    assert RecipientsReader.open(path).format == "jsonl"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RecipientsError, match="cannot read"):
        RecipientsReader.open(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("  \n")
    with pytest.raises(RecipientsError, match="empty"):
        RecipientsReader.open(empty)


def test_header_warnings(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("email ,name\na@example.com,Ann\n")
    reader = RecipientsReader.open(path)
    list(reader)
    assert any("white space" in w for w in reader.warnings)


def test_streaming_does_not_load_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("email,name\n")
        for i in range(20000):
            f.write(f"u{i}@example.com,User {i}\n")
    it = iter(RecipientsReader.open(path))
    first = next(it)
    assert isinstance(first, Row) and first.fields["email"] == "u0@example.com"
    assert estimate_rows(path) == 20000
    assert sum(1 for _ in it) == 19999
