"""Streaming the recipients file: CSV (sniffed dialect) or JSON Lines, one row at a time.

The file is never loaded whole. A row that cannot be used -- undecodable bytes,
malformed CSV quoting or JSON, the wrong number of fields -- comes out as a
:class:`BadRow` with its line number, and reading goes on with the next row.

Each good :class:`Row` carries a ``key``: a hash of its field names and values (order
of columns does not matter). The journal identifies messages by it, so ``--resume``
still recognises rows after lines were inserted, removed or reordered; a row whose
content changed is a new message.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["BadRow", "RecipientsError", "RecipientsReader", "Row", "check_utf8", "estimate_rows"]

Format = Literal["csv", "jsonl"]

_SNIFF_BYTES = 64 * 1024
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_BOM = codecs.BOM_UTF8


class RecipientsError(Exception):
    """The file cannot be read at all (missing, empty, no header row)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One usable row: its first line number, its fields and its identity key."""

    line: int
    fields: dict[str, Any]
    key: str


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that was skipped, and why."""

    line: int
    error: str


class _StrictExcel(csv.excel):
    strict = True


def _digest(material: str) -> str:
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:24]


def detect_format(path: Path, head: bytes) -> Format:
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return "jsonl"
    stripped = head.removeprefix(_BOM).lstrip()
    return "jsonl" if stripped.startswith(b"{") else "csv"


def estimate_rows(path: str | os.PathLike[str]) -> int:
    """A quick row count (newlines, minus the CSV header), for progress and ETA."""
    path = Path(path)
    count = 0
    last = b"\n"
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
        chunk = head
        while chunk:
            count += chunk.count(b"\n")
            last = chunk[-1:]
            chunk = f.read(1 << 20)
    if last != b"\n":
        count += 1
    if detect_format(path, head) == "csv":
        count -= 1
    return max(count, 0)


@dataclass
class RecipientsReader:
    """Iterate over the rows of a recipients file; see :meth:`__iter__`."""

    path: Path
    format: Format = "csv"
    fieldnames: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dialect: str = ""
    #: The file's encoding: ``None`` is UTF-8 (a BOM is skipped), checked whole at open.
    encoding: str | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], encoding: str | None = None) -> RecipientsReader:
        """Open and check the file; :class:`RecipientsError` if it cannot be used at all.

        ``encoding``: the file's (``--encoding``); by default UTF-8, which the command
        checks first for the whole file (:func:`check_utf8`).
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                head = f.read(_SNIFF_BYTES)
        except OSError as exc:
            raise RecipientsError(f"cannot read {path}: {exc.strerror}") from None
        if not head.strip():
            raise RecipientsError(f"{path} is empty")
        reader = cls(path, detect_format(path, head), encoding=encoding)
        if reader.format == "csv":
            # Read the header row now: a file that cannot be used at all is an error
            # before anything is sent, and its warnings can be shown first.
            rows = reader._csv()
            try:
                next(rows, None)
            finally:
                rows.close()
        return reader

    def __iter__(self) -> Iterator[Row | BadRow]:
        if self.format == "jsonl":
            return self._jsonl()
        return self._csv()

    # ------------------------------------------------------------------------ CSV

    def _sniff(self, sample: str) -> type[csv.Dialect]:
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
        except csv.Error:
            self.dialect = "excel"
            return _StrictExcel
        dialect.strict = True
        # The sniffer says "no doubled quotes" when the sample has none; RFC 4180 CSV
        # always doubles them, and only then does strict mode catch stray quotes.
        dialect.doublequote = True
        self.dialect = {",": "comma", ";": "semicolon", "\t": "tab"}.get(
            dialect.delimiter, repr(dialect.delimiter)
        )
        return dialect

    def _csv(self) -> Generator[Row | BadRow]:
        with self.path.open("rb") as raw:
            encoding = self.encoding or "utf-8-sig"
            sample = raw.read(_SNIFF_BYTES).decode(encoding, errors="ignore")
            raw.seek(0)
            text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
            # Cut the sample at its last complete line so the sniffer sees whole rows.
            if len(sample) >= _SNIFF_BYTES // 2 and "\n" in sample:
                sample = sample[: sample.rindex("\n") + 1]
            reader = csv.reader(text, dialect=self._sniff(sample))
            try:
                header = next(reader)
            except StopIteration:
                raise RecipientsError(f"{self.path}: no header row") from None
            except csv.Error as exc:
                raise RecipientsError(f"{self.path}:1: malformed header row: {exc}") from None
            if any(_has_surrogates(name) for name in header):
                raise RecipientsError(f"{self.path}:1: the header row is not UTF-8")
            self.fieldnames = header
            warnings = []
            spaced = [name for name in header if name != name.strip()]
            if spaced:
                listed = ", ".join(repr(n) for n in spaced)
                warnings.append(f"header contains white space around names: {listed}")
            if len(set(header)) != len(header):
                warnings.append("header repeats a column name; the last one wins")
            self.warnings = warnings
            order = sorted(range(len(header)), key=lambda i: header[i])
            prefix = "\x1e".join(header[i] for i in order) + "\x1d"
            width = len(header)
            last = reader.line_num
            while True:
                start = last + 1
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    end = reader.line_num
                    lines = f"{start}" if end <= start else f"{start}-{end}"
                    last = end
                    yield BadRow(start, f"lines {lines}: malformed CSV: {exc}")
                    continue
                last = reader.line_num
                if not values:
                    continue
                if len(values) != width:
                    if len(values) == 1 and not values[0].strip():
                        continue
                    yield BadRow(start, f"expected {width} fields, found {len(values)}")
                    continue
                material = prefix + "\x1f".join([values[i] for i in order])
                try:
                    key = _digest(material)
                except UnicodeEncodeError:
                    yield BadRow(start, "undecodable bytes (the file is not UTF-8)")
                    continue
                yield Row(start, dict(zip(header, values, strict=True)), key)

    # ----------------------------------------------------------------- JSON Lines

    def _jsonl(self) -> Iterator[Row | BadRow]:
        decoder = json.JSONDecoder()
        encoding = self.encoding or "utf-8"
        with self.path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if number == 1:
                    line = line.removeprefix(_BOM)
                if not line.strip():
                    continue
                try:
                    text = line.decode(encoding)
                except UnicodeDecodeError:
                    yield BadRow(number, "undecodable bytes (the file is not UTF-8)")
                    continue
                try:
                    obj = decoder.decode(text)
                except json.JSONDecodeError as exc:
                    yield BadRow(number, f"malformed JSON: {exc.msg} (column {exc.colno})")
                    continue
                if not isinstance(obj, dict):
                    yield BadRow(number, f"expected a JSON object, found {type(obj).__name__}")
                    continue
                material = json.dumps(obj, sort_keys=True, ensure_ascii=False)
                try:
                    key = _digest(material)
                except UnicodeEncodeError:
                    yield BadRow(number, "a string holds an unpaired surrogate escape")
                    continue
                yield Row(number, obj, key)


def check_utf8(path: str | os.PathLike[str]) -> None:
    """The file's encoding, decided once: all of it UTF-8, or :class:`RecipientsError`.

    Row by row, a Windows-1252 file would be sent by halves (its ASCII rows only); so
    the command decodes the whole file first, and a bad byte names its line and the
    ``--encoding`` option that reads the file as what it is.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        with Path(path).open("rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    line += chunk.count(b"\n", 0, exc.start)
                    what = "the header row is" if line == 1 else "the file is"
                    raise RecipientsError(
                        f"{path}:{line}: {what} not UTF-8 (byte 0x{chunk[exc.start]:02x}); "
                        "give the file's encoding with --encoding, e.g. --encoding cp1252"
                    ) from None
                line += chunk.count(b"\n")
    except OSError as exc:
        raise RecipientsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise RecipientsError(
            f"{path}: the file is not UTF-8 (it ends inside a character)"
        ) from None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
