"""The template cut into pieces: literal text and expressions, the header fields.

A *piece* is a literal string or the index of an expression's value; a header field
is its name and its pieces (RFC 5322 §2.2: unfolded here, long lines allowed in the
template). A template that cannot be cut this way (statements, names from
expressions) is rendered whole per row instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .headers import FIELD_NAME

# A piece of template text: a literal, or the index of an expression's value.
Piece = str | int


def format_pieces(pieces: Sequence[Piece]) -> str:
    """The pieces as a :meth:`str.format` string: one C call per message to join them."""
    return "".join(
        p.replace("{", "{{").replace("}", "}}") if isinstance(p, str) else f"{{{p}}}"
        for p in pieces
    )


def join_pieces(pieces: Sequence[Piece], values: Sequence[str]) -> str:
    return "".join(p if isinstance(p, str) else values[p] for p in pieces)


@dataclass(slots=True)
class Field:
    name: str  # as written in the template
    pieces: list[Piece]

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def constant(self) -> bool:
        return all(isinstance(p, str) for p in self.pieces)


def _split_lines(pieces: Sequence[Piece]) -> list[list[Piece]]:
    lines: list[list[Piece]] = [[]]
    for piece in pieces:
        if isinstance(piece, int):
            lines[-1].append(piece)
            continue
        parts = piece.split("\n")
        for i, part in enumerate(parts):
            if i:
                lines.append([])
            if part:
                lines[-1].append(part)
    return lines


def _body_from(lines: list[list[Piece]], body: list[Piece], blank_line: bool) -> list[Piece]:
    """Header section lines that are body after all, followed by the body proper."""
    out: list[Piece] = []
    for i, line in enumerate(lines):
        if i:
            out.append("\n")
        out.extend(line)
    if blank_line:
        out.append("\n\n")
    return [*out, *body]


def parse_pieces(pieces: Sequence[Piece]) -> tuple[list[Field], list[Piece]] | None:
    """Split header fields from the body; None if the structure depends on values.

    Header fields end at the first empty line, or (as in the email package) at the
    first line that is not a field. Continuation lines (starting with white space) are
    unfolded. A field name must be literal text.
    """
    # Find the first literal "\n\n" (or a header section ending the template).
    head: list[Piece] = []
    body: list[Piece] = []
    separated = True
    for index, piece in enumerate(pieces):
        if isinstance(piece, str) and "\n\n" in piece:
            before, _, after = piece.partition("\n\n")
            head = [*pieces[:index], before] if before else list(pieces[:index])
            body = [after, *pieces[index + 1 :]] if after else list(pieces[index + 1 :])
            break
        if isinstance(piece, str) and index == 0 and piece.startswith("\n"):
            body = [piece[1:], *pieces[1:]]
            break
    else:
        head = list(pieces)
        separated = False
    fields: list[Field] = []
    lines = _split_lines(head)
    for index, line in enumerate(lines):
        if not line:
            continue
        first = line[0]
        if not isinstance(first, str):
            return None  # a field name from a value
        if first[0] in " \t":
            if not fields:
                return None
            fields[-1].pieces.extend([" ", first.lstrip(" \t"), *line[1:]])
            continue
        name, colon, rest = first.partition(":")
        name = name.strip()
        if not colon or not FIELD_NAME.match(name):
            if not fields:
                return None
            # No blank line before the body: like the email package (and so mailmerge),
            # the first line that is not a header field starts the body.
            body = _body_from(lines[index:], body, blank_line=separated)
            break
        value: list[Piece] = [rest.lstrip(" \t"), *line[1:]] if rest.strip() else list(line[1:])
        fields.append(Field(name, value))
    for f in fields:
        # Strip the value's ends, merging literals (values are stripped per row).
        merged: list[Piece] = []
        for p in f.pieces:
            if isinstance(p, str) and merged and isinstance(merged[-1], str):
                merged[-1] += p
            elif p != "":
                merged.append(p)
        if merged and isinstance(merged[0], str):
            merged[0] = merged[0].lstrip()
        if merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1].rstrip()
        f.pieces = [p for p in merged if p != ""]
    return fields, body


def parse_content_type(value: str) -> tuple[str, str]:
    ctype = value.split(";", 1)[0].strip().lower()
    maintype, _, subtype = ctype.partition("/")
    return maintype, subtype
