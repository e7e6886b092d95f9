"""Address fields that take values: the template gives the structure, a value is data.

Theory of operation
-------------------
An address field (RFC 5322 §3.4: ``To``, ``Cc``, ``Bcc``, ``From``, ``Reply-To``...) is
a list of mailboxes, each an optional display name and an address. Which mailboxes a
message has, and so its recipients (RFC 5321 §3.3: the envelope is taken from these
fields), must be decided by the template's author, never by a row. So the field is
parsed *before* the values go in: the template's own text (commas, quotes, angle
brackets) gives the mailboxes, and each value lands in one slot of one mailbox:

* in the display name (``{{name}} <{{email}}>``): any text, written back as a quoted
  phrase or RFC 2047 encoded words (:func:`.headers.mailbox_tokens`), so
  ``attacker@evil.com, Bob`` or ``Smith, John`` is a name and nothing else;
* in the address (``<{{email}}>``, ``{{user}}@example.com``): the result must be one
  RFC 5321 path (R14);
* as a whole mailbox (``To: {{email}}``): the value is one mailbox, ``address`` or
  ``name <address>``, never a list; an empty value gives no mailbox (an optional
  ``Cc``).

The compiled path knows the pieces (:mod:`.parse`); the per-row path (templates with
statements) renders through Jinja2, whose ``finalize`` hook (:func:`escape_value`) wraps
every value in :data:`VALUE_START`/:data:`VALUE_END` marks so :func:`split_marked` finds
the same pieces again. A NUL from a value is escaped first, so no value can forge a mark.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .headers import AddressList, mailbox_tokens
from .parse import Piece, format_pieces
from .rendered import RowError

VALUE_START = "\x00("
VALUE_END = "\x00)"
_MARK = re.compile(r"\x00[()]")
CONTROL_IN_VALUE = re.compile(r"[\r\n\x00]")
_ESCAPES = {"\r": "\x00r", "\n": "\x00n", "\x00": "\x00z"}
_UNESCAPES = {"\x00r": "\r", "\x00n": "\n", "\x00z": "\x00", VALUE_START: "", VALUE_END: ""}
_ESCAPED = re.compile(r"\x00[rnz()]")


def value_text(value: object) -> str:
    """A row's value as text: JSON ``null`` (None) is empty, as an empty CSV field."""
    if isinstance(value, str):
        return value
    return "" if value is None else str(value)


def escape_value(value: object) -> str:
    """Jinja2 ``finalize``: mark where a value starts and ends, escape its CR, LF, NUL."""
    text = value_text(value)
    if CONTROL_IN_VALUE.search(text) is not None:
        text = CONTROL_IN_VALUE.sub(lambda m: _ESCAPES[m.group()], text)
    return f"{VALUE_START}{text}{VALUE_END}"


def unescape(text: str) -> str:
    """A rendered text as written: marks dropped, escaped characters restored."""
    if "\x00" not in text:
        return text
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group()], text)


def strip_marks(text: str) -> str:
    """Drop the value marks but keep CR/LF escaped (a header check still sees them)."""
    return _MARK.sub("", text) if "\x00" in text else text


def split_marked(text: str) -> tuple[list[Piece], list[str]]:
    """Marked text as pieces and values (a value rendered inside a value is data too)."""
    pieces: list[Piece] = []
    values: list[str] = []
    depth = 0
    pos = 0
    start = 0
    for mark in _MARK.finditer(text):
        if mark.group() == VALUE_START:
            if depth == 0:
                if mark.start() > pos:
                    pieces.append(text[pos : mark.start()])
                start = mark.end()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                values.append(strip_marks(text[start : mark.start()]))
                pieces.append(len(values) - 1)
                pos = mark.end()
    if depth:
        raise RowError("a value mark is not closed")  # cannot happen through Jinja2
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces, values


@dataclass(frozen=True, slots=True)
class _Mailbox:
    """One mailbox's display name and address as :meth:`str.format` strings of values."""

    display: str
    #: The address; ``None`` if the whole mailbox is the value ``whole``.
    addr: str | None
    whole: int = -1


@dataclass(frozen=True, slots=True)
class AddressTemplate:
    """An address field's mailboxes, parsed once; :meth:`fill` puts one row's values in."""

    name: str
    mailboxes: tuple[_Mailbox, ...]

    def fill(self, values: Sequence[str]) -> AddressList:
        pairs: list[tuple[str, str]] = []
        for box in self.mailboxes:
            if box.addr is None:
                value = values[box.whole].strip()
                if value:
                    pairs.append(_one_mailbox(value))
                continue
            pairs.append((box.display.format(*values).strip(), box.addr.format(*values)))
        return mailbox_tokens(pairs, self.name, one_per_value=True)


def _one_mailbox(value: str) -> tuple[str, str]:
    """A whole value as one mailbox: ``address`` or ``name <address>``."""
    if not value.endswith(">") or "<" not in value:
        return "", value
    display, _, addr = value[:-1].rpartition("<")
    display = display.strip()
    if len(display) >= 2 and display[0] == display[-1] == '"':
        display = re.sub(r"\\(.)", r"\1", display[1:-1])
    return display, addr.strip()


def _trim(pieces: list[Piece]) -> tuple[Piece, ...]:
    """Merge adjacent literals and strip white space at both ends."""
    merged: list[Piece] = []
    for p in pieces:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += p
        else:
            merged.append(p)
    if merged and isinstance(merged[0], str):
        merged[0] = merged[0].lstrip()
    if merged and isinstance(merged[-1], str):
        merged[-1] = merged[-1].rstrip()
    return tuple(p for p in merged if p != "")


class _Parser:
    """RFC 5322 §3.4 mailbox-list over pieces; a value is one opaque token."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.boxes: list[_Mailbox] = []
        self.display: list[Piece] = []
        self.addr: list[Piece] | None = None
        self.after = False  # after the closing ">"
        self.quoted = False

    def fail(self, why: str) -> RowError:
        return RowError(f"{self.name}: {why}")

    def finish(self) -> None:
        display = _trim(self.display)
        if self.addr is not None:
            self.boxes.append(_Mailbox(format_pieces(display), format_pieces(_trim(self.addr))))
        elif len(display) == 1 and isinstance(display[0], int) and not self.quoted:
            self.boxes.append(_Mailbox("", None, display[0]))
        elif display:
            if self.quoted:
                raise self.fail("a quoted local part cannot be combined with values")
            self.boxes.append(_Mailbox("", format_pieces(display)))
        self.display, self.addr, self.after, self.quoted = [], None, False, False

    def parse(self, pieces: Sequence[Piece]) -> AddressTemplate:
        state = "top"
        depth = 0
        for piece in pieces:
            if isinstance(piece, int):
                if state == "angle" and self.addr is not None:
                    self.addr.append(piece)
                elif state == "quote" or (state == "top" and not self.after):
                    self.display.append(piece)
                elif state == "top":
                    raise self.fail("a value after the closing '>' of an address")
                continue
            chars = iter(piece)
            for c in chars:
                if state == "quote":
                    if c == "\\":
                        self.display.append(next(chars, ""))
                    elif c == '"':
                        state = "top"
                    else:
                        self.display.append(c)
                elif state == "comment":  # RFC 5322 §3.2.2: a comment is white space
                    if c == "\\":
                        next(chars, "")
                    depth += {"(": 1, ")": -1}.get(c, 0)
                    state = "comment" if depth else "top"
                elif state == "angle":
                    if c == ">":
                        state, self.after = "top", True
                    elif c in '<"(,':
                        raise self.fail(f"{c!r} inside <...>")
                    elif self.addr is not None:
                        self.addr.append(c)
                elif c == ",":
                    self.finish()
                elif c == "(":
                    state, depth = "comment", 1
                elif c.isspace():
                    if not self.after:
                        self.display.append(c)
                elif self.after or c in ":;>":
                    raise self.fail(f"{c!r} where a mailbox was expected (groups take no values)")
                elif c == '"':
                    state, self.quoted = "quote", True
                elif c == "<":
                    state, self.addr = "angle", []
                else:
                    self.display.append(c)
        if state != "top":
            raise self.fail(f"unclosed {state} in the address list")
        self.finish()
        return AddressTemplate(self.name, tuple(self.boxes))


def address_template(pieces: Sequence[Piece], name: str) -> AddressTemplate:
    """Parse an address field whose pieces hold values; :class:`RowError` if malformed."""
    return _Parser(name).parse(pieces)


#: Structured fields whose values sit in ``<...>`` (RFC 5322 §3.6.4 msg-id; RFC 2369
#: List-* URLs; RFC 2919 List-Id): a value there is part of one identifier or URL.
BRACKETED_FIELDS = frozenset(
    {"message-id", "in-reply-to", "references", "resent-message-id", "list-id",
     "list-unsubscribe", "list-help", "list-subscribe", "list-post", "list-owner",
     "list-archive"}
)  # fmt: skip
_BRACKET_BREAK = re.compile(r"[<>,\s\"]")


def bracketed_values(pieces: Sequence[Piece]) -> frozenset[int]:
    """The values that the template puts inside ``<...>``."""
    inside = False
    found = set()
    for piece in pieces:
        if isinstance(piece, int):
            if inside:
                found.add(piece)
            continue
        for c in piece:
            if c in "<>":
                inside = c == "<"
    return frozenset(found)


def check_bracketed(name: str, indexes: frozenset[int], values: Sequence[str]) -> None:
    """A value inside ``<...>`` may not close it or start another (no second URL or id)."""
    for i in indexes:
        bad = _BRACKET_BREAK.search(values[i])
        if bad is not None:
            raise RowError(
                f"{name}: a value inside <...> holds {bad.group()!r}: {values[i][:60]!r}"
            )
