"""The plan of a compiled template: what is constant, what is filled in per row.

Theory of operation
-------------------
:func:`build_plan` decides once per template which header fields are constant
(encoded now) and which take values (encoded per row), which fields give the envelope
(``From`` the sender; ``To``/``Cc``/``Bcc`` the recipients, RFC 5321 §3.3), the body's
MIME structure (text, markdown alternative, attachments, related), and for a markdown
body which values may go straight into the HTML (:func:`is_inert`: plain text that
markdown passes through unchanged). Anything the plan cannot express is a
:class:`PlanError`: the template is then rendered whole per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .addresses import BRACKETED_FIELDS, AddressTemplate, address_template, bracketed_values
from .headers import (
    ADDRESS_FIELDS,
    CANONICAL_NAMES,
    GENERATED,
    RECIPIENT_FIELDS,
    AddressList,
    address_list,
    check_header_value,
    encode_field,
)
from .markdown import markdown_to_html
from .mime import Attachment, attachment_for, new_boundary
from .parse import Field, Piece, format_pieces, join_pieces, parse_content_type
from .rendered import RowError, TemplateError

_INERT_TEXT = re.compile(
    r"[^\s\x00-\x1f\x7f*_`\[\]<>&\\!#|~{}\"=^+-]"
    r"(?:[^\x00-\x1f\x7f*_`\[\]<>&\\!#|~{}\"=^]*[^\s\x00-\x1f\x7f*_`\[\]<>&\\!#|~{}\"=^])?\Z"
)
_INERT_IN_TAG = re.compile(r"[A-Za-z0-9.@:/%?;,-]+\Z")


@dataclass(slots=True)
class _Header:
    """One header field of the plan: encoded once if constant."""

    field: Field
    #: The encoded line, for a constant field that is not an address field.
    encoded: bytes | None = None
    #: The parsed mailboxes, for a constant address field.
    addresses: AddressList | None = None
    #: The value's pieces as a format string (see :func:`format`).
    fmt: str = ""
    #: The mailboxes of an address field that takes values (:mod:`.addresses`).
    template: AddressTemplate | None = None
    #: Values the template puts inside ``<...>`` of a structured field (msg-id, URL).
    bracketed: frozenset[int] = frozenset()


@dataclass(slots=True)
class Plan:
    """A parsed template: what is constant is encoded, what varies is pieces."""

    base: Path
    #: Where an attachment path built from a row's values must stay (mime.confine_attachment).
    root: Path
    headers: list[_Header]
    body: list[Piece]
    subtype: str  # "plain", "html", or "markdown"
    attachments: list[Field]
    constant_attachments: list[Attachment] | None
    html: list[Piece] | None  # markdown converted once with placeholders
    body_fmt: str
    html_fmt: str | None
    html_images: bool  # the compiled HTML has an <img> to link to its attachment
    html_checks: dict[int, tuple[bool, bool]]  # expr -> (inside a tag, at line start)
    boundaries: tuple[str, str]
    has_date: bool
    message_id_field: Field | None
    from_field: Field
    #: ``Return-Path``: the envelope sender (bounce address), never written (RFC 5321 §4.4).
    return_path_field: Field | None = None


class PlanError(Exception):
    pass


def _placeholder(i: int) -> str:
    return f"QZXTRIOMAILPH{i}X"


def build_plan(
    fields: list[Field], body: list[Piece], base: Path, root: Path | None = None
) -> Plan:
    subtype = "plain"
    headers: list[_Header] = []
    attachments: list[Field] = []
    has_date = False
    message_id_field = None
    from_field = None
    return_path_field = None
    for f in fields:
        key = f.key
        if key == "attachment":
            attachments.append(f)
            continue
        if key == "content-type":
            if not f.constant:
                raise PlanError("Content-Type from a value")
            maintype, sub = parse_content_type(join_pieces(f.pieces, []))
            if maintype != "text":
                raise PlanError(f"Content-Type {maintype}/{sub}")
            subtype = sub or "plain"
            continue
        if key in GENERATED:
            if key == "content-transfer-encoding":
                cte = join_pieces(f.pieces, []).strip().lower() if f.constant else "?"
                if cte not in ("7bit", "8bit", ""):
                    raise PlanError(f"Content-Transfer-Encoding {cte}")
            continue
        if key == "date":
            has_date = True
        elif key == "message-id":
            message_id_field = f
        elif key == "from" and from_field is None:
            from_field = f
        elif key == "return-path":
            if return_path_field is not None:
                raise TemplateError("the template has more than one Return-Path header")
            return_path_field = f
        f.name = CANONICAL_NAMES.get(key, f.name)
        header = _Header(f, fmt=format_pieces(f.pieces))
        if f.constant:
            value = join_pieces(f.pieces, [])
            try:
                check_header_value(f.name, value)
                if key in ADDRESS_FIELDS:
                    header.addresses = address_list(value, f.name)
                else:
                    header.encoded = encode_field(f.name, value).encode("ascii")
            except RowError as exc:
                raise TemplateError(str(exc)) from None
        elif key in ADDRESS_FIELDS:
            try:
                header.template = address_template(f.pieces, f.name)
            except RowError as exc:
                raise TemplateError(str(exc)) from None
        elif key in BRACKETED_FIELDS:
            header.bracketed = bracketed_values(f.pieces)
        headers.append(header)
    if from_field is None:
        raise TemplateError("the template has no From header")
    if not any(f.key in RECIPIENT_FIELDS for f in fields):
        raise TemplateError("the template has no To, Cc or Bcc header")
    constant_attachments = None
    if all(a.constant for a in attachments):
        try:
            constant_attachments = [
                attachment_for(base, join_pieces(a.pieces, [])) for a in attachments
            ]
        except RowError as exc:
            raise TemplateError(str(exc)) from None
    html = None
    checks: dict[int, tuple[bool, bool]] = {}
    if subtype == "markdown":
        html, checks = _compile_markdown(body, constant_attachments is None)
    return Plan(
        base=base,
        root=base if root is None else root,
        headers=headers,
        body=body,
        subtype=subtype,
        attachments=attachments,
        constant_attachments=constant_attachments,
        html=html,
        body_fmt=format_pieces(body),
        html_fmt=None if html is None else format_pieces(html),
        html_images=html is not None and "<img" in "".join(map(str, html)).lower(),
        html_checks=checks,
        boundaries=(new_boundary(), new_boundary()),
        has_date=has_date,
        message_id_field=message_id_field,
        from_field=from_field,
        return_path_field=return_path_field,
    )


def _compile_markdown(
    body: list[Piece], row_attachments: bool
) -> tuple[list[Piece] | None, dict[int, tuple[bool, bool]]]:
    """Markdown -> HTML once, with a placeholder per value; None if that is not exact.

    Inline images are linked per message (their Content-IDs are), not here.
    """
    exprs = {p for p in body if isinstance(p, int)}
    source = "".join(p if isinstance(p, str) else _placeholder(p) for p in body)
    if not exprs:
        return [markdown_to_html(source)], {}
    if any(
        _placeholder(i) in join_pieces([p for p in body if isinstance(p, str)], []) for i in exprs
    ):
        return None, {}
    if any("<" + _placeholder(i) in source for i in exprs):
        # An autolink around a value (``<{{url}}>``): markdown would read the placeholder
        # as a raw HTML tag, the value as a link. Such rows go through markdown.
        return None, {}
    html = markdown_to_html(source)
    if row_attachments and "<img" in html.lower():
        return None, {}  # image links may depend on a per-row attachment
    pattern = re.compile("|".join(re.escape(_placeholder(i)) for i in sorted(exprs)))
    pieces: list[Piece] = []
    checks: dict[int, tuple[bool, bool]] = {}
    counts: dict[int, int] = {}
    pos = 0
    for match in pattern.finditer(html):
        index = int(match.group()[len("QZXTRIOMAILPH") : -1])
        pieces.append(html[pos : match.start()])
        pieces.append(index)
        counts[index] = counts.get(index, 0) + 1
        in_tag = html.rfind("<", 0, match.start()) > html.rfind(">", 0, match.start())
        old = checks.get(index, (False, False))
        checks[index] = (old[0] or in_tag, old[1])
        pos = match.end()
    pieces.append(html[pos:])
    # Every occurrence must survive exactly once.
    expected: dict[int, int] = {}
    for p in body:
        if isinstance(p, int):
            expected[p] = expected.get(p, 0) + 1
    if counts != expected:
        return None, {}
    # Values at the start of a markdown line could start a list or a heading.
    line_start = True
    for p in body:
        if isinstance(p, str):
            if p:
                tail = p.rsplit("\n", 1)
                line_start = (len(tail) == 2 or line_start) and tail[-1].strip(" ") == ""
        else:
            if line_start:
                old = checks.get(p, (False, False))
                checks[p] = (old[0], True)
            line_start = False
    return pieces, checks


def is_inert(value: str, in_tag: bool, line_start: bool) -> bool:
    if in_tag:
        return _INERT_IN_TAG.match(value) is not None
    if _INERT_TEXT.match(value) is None or "  " in value:
        return False
    return not line_start or value[0].isalpha()
