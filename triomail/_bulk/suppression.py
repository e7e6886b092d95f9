"""Suppression: addresses never to mail again, and the list that the next campaign reads.

Theory of operation
-------------------
``--exclude FILE`` names addresses that must not be mailed: people who unsubscribed or
complained, and hard bounces. The file is one address a line (``#`` comments and blank
lines allowed), or a CSV file with an ``email`` column, as exported by most tools. An
address is compared with its domain lower-cased (RFC 5321 §2.4: the local part is the
receiving host's business, but a domain is case-insensitive, RFC 1035 §2.3.3), so
``Ann@Example.COM`` matches ``Ann@example.com``, not ``ann@example.com``.

The planner (:mod:`.planner`) leaves excluded addresses out of each message's envelope;
a row with no recipient left is recorded ``suppressed`` in the journal, the report and
the summary, and is not sent.

``--suppress-to FILE`` appends every recipient that a server refused permanently with
an address-level enhanced status code (RFC 3463 §3.2: ``5.1.x``, bad destination
mailbox or address; §3.3: ``5.2.1``, mailbox disabled), one a line, so that the next
campaign's ``--exclude`` skips them. Policy refusals (``5.7.x``) are not the address's
fault and are not added.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import IO

from .settings import CannotRun

__all__ = ["SuppressionFile", "address_level", "load_exclusions", "normalize"]


def normalize(address: str) -> str:
    """The form addresses are compared in: the domain lower-cased."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address.strip()


def load_exclusions(path: Path) -> frozenset[str]:
    """The addresses of an ``--exclude`` file; :class:`CannotRun` if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CannotRun(f"--exclude {path}: {getattr(exc, 'strerror', None) or exc}") from None
    first = text.partition("\n")[0]
    if "," in first or ";" in first or "\t" in first:
        dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        column = next((c for c in reader.fieldnames or () if c.strip().lower() == "email"), None)
        if column is None:
            raise CannotRun(f"--exclude {path}: a CSV file needs an 'email' column")
        addresses = (row.get(column) or "" for row in reader)
    else:
        addresses = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return frozenset(normalize(a) for a in addresses if a.strip())


def address_level(enhanced: str | None) -> bool:
    """Is this enhanced status code the address's fault (5.1.x, 5.2.1)?"""
    return enhanced is not None and (enhanced.startswith("5.1.") or enhanced == "5.2.1")


class SuppressionFile:
    """``--suppress-to``: recipients refused for their address, appended as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self.added = 0

    def add(self, address: str) -> None:
        if self._file is None:
            try:
                self._file = self.path.open("a", encoding="utf-8")
            except OSError as exc:
                raise CannotRun(f"--suppress-to {self.path}: {exc.strerror}") from None
        self._file.write(address + "\n")
        self.added += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
