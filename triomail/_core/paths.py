"""Envelope paths: RFC 5321 §4.1.2 syntax, size limits and SMTPUTF8 (sans-IO).

Theory of operation
-------------------
:func:`format_path` checks RFC 5321 §4.1.2 path syntax and the §4.5.3.1 size limits
(R14), converts IDN domains to A-labels when the local part is ASCII and reports when
the path needs SMTPUTF8 (R32). Every MAIL and RCPT address passes through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .commands import check_argument
from .errors import LocalProtocolError
from .idna2008 import idna_domain

__all__ = ["MAX_DOMAIN", "MAX_LOCAL_PART", "MAX_PATH", "Path", "format_path"]

# RFC 5321 §4.5.3.1.1-3.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# atext (RFC 5322 §3.2.3) plus UTF8-non-ascii (RFC 6532 §3.1), written as its complement:
# everything but controls, space, DEL and the 13 specials. Same set as listing the
# ranges up to U+10FFFF, but compiled in a fraction of the time (start-up).
_ATEXT_UTF8 = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_DOT_ATOM = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*\Z")
# qtextSMTP (RFC 5321 §4.1.2: %d32-33 / %d35-91 / %d93-126, plus UTF-8), likewise.
_QTEXT_UTF8 = r'[^\x00-\x1f"\\\x7f]'
_QUOTED = re.compile(rf'"(?:{_QTEXT_UTF8}|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")


@dataclass(frozen=True, slots=True)
class Path:
    """A checked envelope address: its wire form and whether it needs SMTPUTF8."""

    address: str
    needs_smtputf8: bool

    @property
    def wire(self) -> str:
        return f"<{self.address}>"


# Paths already checked: bulk mail names the same sender on every message. A Path is
# immutable; the table is emptied when full, so memory stays bounded.
_PATHS: dict[str, Path] = {}
_PATHS_SIZE = 4096


def format_path(address: str, *, allow_null: bool = False) -> Path:
    """Check an envelope address and return its wire form (R14, R32).

    ``allow_null`` permits the null reverse-path ``<>`` (MAIL FROM only, §4.5.5).
    """
    path = _PATHS.get(address)
    if path is None or not (path.address or allow_null):  # a kept <> is for senders only
        path = _format_path(address, allow_null)  # raises for a bad one: never kept
        if len(_PATHS) >= _PATHS_SIZE:
            _PATHS.clear()
        _PATHS[address] = path
    return path


def _format_path(address: str, allow_null: bool) -> Path:
    check_argument(address, "address")
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address == "":
        if allow_null:
            return Path("", False)
        raise LocalProtocolError("the null path <> is only allowed as the sender")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise LocalProtocolError(f"not a mailbox (local-part@domain): {address!r}")
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        raise LocalProtocolError(f"invalid local part in {address!r}")
    local_ascii = local.isascii()
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise LocalProtocolError(f"local part longer than {MAX_LOCAL_PART} octets: {address!r}")
    domain = _check_domain(domain, address, ascii_only=local_ascii)
    wire = f"{local}@{domain}"
    if len(wire.encode("utf-8")) + 2 > MAX_PATH:
        raise LocalProtocolError(f"path longer than {MAX_PATH} octets: {address!r}")
    return Path(wire, not wire.isascii())


# UTS #46 deviation characters: IDNA 2003 (Python's "idna" codec) maps them away
# (straße -> strasse), IDNA 2008 keeps them, so the A-label would name another domain.
def _check_domain(domain: str, address: str, *, ascii_only: bool) -> str:
    """Check a domain (R14) and return its wire form: A-labels if ``ascii_only`` (R32)."""
    if _ADDRESS_LITERAL.match(domain):
        return domain
    wire = domain
    if not domain.isascii():
        domain = idna_domain(domain, address)  # IDNA 2008, UTS #46 (RFC 5891)
        if ascii_only:
            # R32: an ASCII local part travels without SMTPUTF8, the domain as A-labels.
            wire = domain
        # Otherwise the U-labels go on the wire (SMTPUTF8), but the A-label form is still
        # checked below, so a UTF-8 local part never switches the domain checks off.
    if len(domain) > MAX_DOMAIN or len(wire.encode("utf-8")) > MAX_DOMAIN:
        raise LocalProtocolError(f"domain longer than {MAX_DOMAIN} octets: {address!r}")
    if not all(_LABEL.match(label) for label in domain.split(".")):
        raise LocalProtocolError(f"invalid domain in {address!r}")
    return wire
