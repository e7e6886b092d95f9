"""Mailmerge-compatible message templates, compiled once and rendered to bytes per row.

Theory of operation
-------------------
A template is a Jinja2 file holding an RFC 5322 message: header lines, a blank line,
a body (the mailmerge format). ``Content-Type: text/markdown`` turns the body into a
text/plain + text/html ``multipart/alternative``; ``ATTACHMENT:`` pseudo-headers attach
files; everything is wrapped the way mailmerge wraps it (``multipart/related`` at the
top when there is more than one part), so the same template and database give the
same messages.

Building an :class:`email.message.EmailMessage` per row costs about a millisecond, so
:func:`compile_template` does the expensive work once:

* The Jinja2 token stream is cut into *literal* pieces and *expression* pieces
  (``{{ ... }}``). One small Jinja2 template that renders only the expressions, joined
  by a separator, is compiled; per row it is rendered once and split, and the message
  is the literals interleaved with the values (:class:`_Values`). The first row is
  checked against a full Jinja2 render, so any difference falls back to rendering
  the whole template per row.
* The header section is parsed once into fields; a field without expressions is
  encoded once (RFC 2047, folding). Per row only fields with values are encoded. A
  value holding CR, LF or another control character is refused for that row: no
  header injection through a field (R15).
* A markdown body is converted to HTML once with a placeholder for each expression;
  per row the values are put into the HTML directly when they are plain text that
  markdown would pass through unchanged (letters, digits, a few punctuation marks);
  otherwise that row's body goes through markdown like mailmerge does.
* Attachments are read and base64-encoded once per file (an LRU cache, so templated
  paths work too). MIME boundaries and part headers are constant bytes.
* Body parts are 7bit when they are ASCII with short lines and quoted-printable
  otherwise, so no line on the wire exceeds 998 octets (R19) and no 8-bit octet
  needs 8BITMIME (R18). Headers are RFC 2047-encoded; raw UTF-8 (RFC 6532) is used
  for address fields only when an address has a non-ASCII local part (SMTPUTF8).

Templates with ``{% %}`` statements, or whose header names come from expressions, are
rendered whole per row by Jinja2 and parsed per row (the same code, slower). Templates
that write their own ``multipart/*`` body are handled through the :mod:`email`
package, as mailmerge does.
"""

from __future__ import annotations

import binascii
import email
import email.errors
import email.policy
import email.utils
import functools
import hashlib
import io
import mimetypes
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from pathlib import Path
from typing import Any, Final

import jinja2
import jinja2.exceptions

from .._core.errors import LocalProtocolError
from .._core.paths import format_path

__all__ = ["CompiledTemplate", "Rendered", "RowError", "TemplateError", "compile_template"]

# RFC 5321 §4.5.3.1.6 / RFC 5322 §2.1.1: 998 octets plus CRLF.
_MAX_LINE = 998
# RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters.
_FOLD_AT = 78
# The UTF-8 payload of one "=?utf-8?b?...?=" word: 45 bytes -> 60 base64 characters,
# 72 characters with the delimiters (RFC 2047 §2: at most 75).
_EW_BYTES = 45
_SEP = "\x00"

_CANONICAL_NAMES = {
    name.lower(): name
    for name in (
        "To", "Cc", "Bcc", "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID",
        "In-Reply-To", "References", "Comments", "Keywords", "List-Unsubscribe",
        "List-Unsubscribe-Post", "List-Id", "Return-Path", "Organization", "Precedence",
        "Auto-Submitted", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
        "Resent-To", "Resent-Cc", "Resent-Bcc", "Resent-From", "Resent-Sender",
        "Resent-Date", "Resent-Message-ID", "Disposition-Notification-To", "X-Mailer",
    )
}  # fmt: skip
_ADDRESS_FIELDS = frozenset(
    {"to", "cc", "bcc", "from", "sender", "reply-to", "resent-to", "resent-cc",
     "resent-bcc", "resent-from", "resent-sender", "disposition-notification-to"}
)  # fmt: skip
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
# Headers the renderer writes itself; a template's own copy is dropped.
_GENERATED = frozenset({"mime-version", "content-transfer-encoding"})
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")
# Any C0 control but TAB, and DEL: never inside a header value (R15).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENCODED_WORD_LIKE = re.compile(r"=\?")
# Plain text that markdown passes through unchanged, in text and inside tags.
_INERT_TEXT = re.compile(
    r"[^\s\x00-\x1f\x7f*_`\[\]<>&\\!#|~{}\"=^+-]"
    r"(?:[^\x00-\x1f\x7f*_`\[\]<>&\\!#|~{}\"=^]*[^\s\x00-\x1f\x7f*_`\[\]<>&\\!#|~{}\"=^])?\Z"
)
_INERT_IN_TAG = re.compile(r"[A-Za-z0-9.@:/%?;,-]+\Z")
_SIMPLE_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[A-Za-z0-9.-]+\Z")
_NAME_ADDR = re.compile(r"([^\"<>()\[\]\\,;:@]*?)\s*<([^\s<>()\[\]\\,;:\"@]+@[A-Za-z0-9.-]+)>\Z")
_SPECIALS = re.compile(r"[()<>\[\]:;@\\,.\"]")


class TemplateError(Exception):
    """The template cannot be used at all (syntax, missing attachment, bad header)."""


class RowError(Exception):
    """This row cannot become a message; the batch goes on without it."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """One message ready for the wire: canonical CRLF bytes and its envelope."""

    data: bytes
    sender: str
    recipients: tuple[str, ...]
    message_id: str
    #: True if an address has a non-ASCII local part (RFC 6531, raw UTF-8 headers).
    smtputf8: bool
    #: :func:`canonical_eight_bit` of ``data`` if it was computed already (the render
    #: process does); ``None``: not computed.
    eight_bit: bool | None = None


def canonical_eight_bit(data: bytes) -> bool | None:
    """For canonical CRLF text without NUL: whether it has 8-bit octets; else ``None``.

    The renderer writes such text; ``None`` sends the message through the full check.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf or b"\x00" in data:
        return None
    return not data.isascii()


# ----------------------------------------------------------------- header encoding


def _encoded_words(text: str, first: int = _EW_BYTES) -> list[str]:
    """``text`` as RFC 2047 "B" encoded words, split on character boundaries.

    ``first`` is the UTF-8 budget of the first word (shorter after a long field name).
    """
    data = text.encode("utf-8")
    words = []
    start = 0
    budget = first
    while start < len(data):
        end = min(start + budget, len(data))
        budget = _EW_BYTES
        # Never split a UTF-8 sequence: back off continuation bytes (10xxxxxx).
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        chunk = binascii.b2a_base64(data[start:end], newline=False).decode("ascii")
        words.append(f"=?utf-8?b?{chunk}?=")
        start = end
    return words


def _needs_encoding(word: str) -> bool:
    return not word.isascii() or "=?" in word or len(word) > _FOLD_AT - 2


def _unstructured_tokens(value: str) -> list[str]:
    """Words of an unstructured value, non-ASCII runs as encoded words (RFC 2047 §5.1)."""
    words = value.split(" ")
    tokens: list[str] = []
    run: list[str] = []
    for word in words:
        if _needs_encoding(word) or (word == "" and run):
            run.append(word)
            continue
        if run:
            tokens.extend(_encoded_words(" ".join(run)))
            run = []
        tokens.append(word)
    if run:
        tokens.extend(_encoded_words(" ".join(run)))
    return tokens


def _fold(name: str, tokens: Sequence[str], separator: str = " ") -> str:
    """Join tokens after ``Name: ``, folding before a token when a line would pass 78."""
    out = [name, ":"]
    length = len(name) + 1
    first = True
    for token in tokens:
        piece_len = len(token) + 1
        if not first and token and length + piece_len > _FOLD_AT:
            out.append("\r\n ")
            length = 1
            out.append(token)
            length += len(token)
        else:
            out.append(" " if first or separator == " " else separator)
            out.append(token)
            length += piece_len
        first = False
    out.append("\r\n")
    return "".join(out)


def encode_unstructured(name: str, value: str) -> str:
    """``Name: value\\r\\n`` with RFC 2047 words for non-ASCII text, folded at 78.

    A non-ASCII value is encoded whole (as mailmerge and the email package do): one
    pass, and its white space survives exactly. ASCII values are folded at spaces.
    """
    if value.isascii():
        if len(name) + len(value) + 2 <= _FOLD_AT and "=?" not in value:
            return f"{name}: {value}\r\n"
        return _fold(name, _unstructured_tokens(value))
    # "Name: =?utf-8?b?" + base64 + "?=" within 78: 4 base64 characters per 3 bytes.
    first = max(3, (_FOLD_AT - len(name) - 2 - 12) // 4 * 3)
    return f"{name}: " + "\r\n ".join(_encoded_words(value, first)) + "\r\n"


def _quote_phrase(name: str) -> str:
    if _SPECIALS.search(name) is None:
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True, slots=True)
class _AddressList:
    tokens: tuple[str, ...]  # "name <addr>" (encoded), one per mailbox
    addresses: tuple[str, ...]  # checked addr-specs
    utf8: bool  # an address needs SMTPUTF8


def _parse_addresses(value: str, what: str) -> list[tuple[str, str]]:
    value = value.strip()
    if not value:
        return []
    match = _SIMPLE_ADDRESS.match(value)
    if match is not None:
        return [("", value)]
    match = _NAME_ADDR.match(value)
    if match is not None:
        return [(match.group(1).strip(), match.group(2))]
    # The strict RFC 5322 parser: anything it had to guess at is refused, not sent
    # to a half-parsed address.
    try:
        header = email.policy.default.header_factory(what, value)
    except (email.errors.HeaderParseError, IndexError, ValueError) as exc:
        raise RowError(f"{what}: cannot parse the addresses in {value!r} ({exc})") from None
    invalid = [d for d in header.defects if isinstance(d, email.errors.InvalidHeaderDefect)]
    addresses = getattr(header, "addresses", ())
    if invalid or not (addresses or getattr(header, "groups", ())):
        reason = f" ({invalid[0]})" if invalid else ""
        raise RowError(f"{what}: cannot parse the addresses in {value!r}{reason}")
    return [(a.display_name, a.addr_spec) for a in addresses]


def _address_list(value: str, what: str) -> _AddressList:
    """Parse, check (RFC 5321 paths, R14) and encode an address field."""
    pairs = _parse_addresses(value, what)
    if not pairs and value.strip():
        # An empty group such as "undisclosed-recipients:;" (the recipients are in Bcc).
        if not value.isascii():
            raise RowError(f"{what}: a group name must be ASCII: {value!r}")
        return _AddressList((value.strip(),), (), False)
    addresses = []
    utf8 = False
    for _, addr in pairs:
        try:
            path = format_path(addr)
        except LocalProtocolError as exc:
            raise RowError(f"{what}: invalid address {addr!r}: {exc}") from None
        addresses.append(path.address)
        utf8 = utf8 or not path.address.partition("@")[0].isascii()
    tokens = []
    for (display, _), addr in zip(pairs, addresses, strict=True):
        if not display:
            tokens.append(addr)
            continue
        if display.isascii() or utf8:
            phrase = _quote_phrase(display)
        else:
            phrase = " ".join(_encoded_words(display))
        tokens.append(f"{phrase} <{addr}>")
    return _AddressList(tuple(tokens), tuple(addresses), utf8)


def encode_address_field(name: str, addresses: _AddressList) -> str:
    line = f"{name}: {', '.join(addresses.tokens)}\r\n"
    if len(line) <= _FOLD_AT + 2:
        return line
    # Fold between mailboxes; within one, before an encoded word.
    tokens: list[str] = []
    for i, mailbox in enumerate(addresses.tokens):
        parts = mailbox.split(" ")
        if i < len(addresses.tokens) - 1:
            parts[-1] += ","
        tokens.extend(parts)
    return _fold(name, tokens)


_CONTROL_IN_VALUE = re.compile(r"[\r\n\x00]")
_ESCAPES = {"\r": "\x00r", "\n": "\x00n", "\x00": "\x00z"}


def _escape_value(value: object) -> object:
    """Jinja2 ``finalize``: mark CR, LF and NUL coming from a value (see render_text)."""
    text = value if isinstance(value, str) else str(value)
    if _CONTROL_IN_VALUE.search(text) is None:
        return text
    return _CONTROL_IN_VALUE.sub(lambda m: _ESCAPES[m.group()], text)


def _unescape(text: str) -> str:
    if "\x00" not in text:
        return text
    return text.replace("\x00r", "\r").replace("\x00n", "\n").replace("\x00z", "\x00")


def _check_header_value(name: str, value: str) -> None:
    bad = _HEADER_CONTROL.search(value)
    if bad is not None:
        escaped_break = bad.group() == "\x00" and value[bad.end() : bad.end() + 1] in ("r", "n")
        what = (
            "a line break"
            if bad.group() in "\r\n" or escaped_break
            else f"control character {bad.group()!r}"
        )
        raise RowError(
            f"header {name}: a field value contains {what} (header injection refused): "
            f"{value[:60]!r}"
        )


# ----------------------------------------------------------------------- attachments


@dataclass(frozen=True, slots=True)
class _Attachment:
    path: Path
    part: bytes  # headers (without Content-ID) + blank line + base64 body + CRLF
    content_id: str


def _rfc2231(param: str, value: str) -> str:
    if value.isascii() and '"' not in value and "\\" not in value:
        return f'{param}="{value}"'
    return f"{param}*=utf-8''{urllib.parse.quote(value, safe='')}"


def _base64_lines(data: bytes) -> bytes:
    encoded = binascii.b2a_base64(data, newline=False)
    return b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


@functools.lru_cache(maxsize=64)
def _load_attachment(path: Path, stamp: tuple[int, int]) -> _Attachment:
    """Read and encode a file once; ``stamp`` (mtime, size) invalidates a changed file."""
    data = path.read_bytes()
    basename = path.name
    ctype, encoding = mimetypes.guess_type(basename)
    if ctype is None or encoding is not None:
        ctype = "application/octet-stream"
    digest = hashlib.sha256(data).hexdigest()[:16]
    content_id = f"{digest}.{secrets.token_hex(4)}@triomail.invalid"
    head = (
        f"Content-Type: {ctype}; {_rfc2231('name', basename)}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment; {_rfc2231('filename', basename)}\r\n"
        f"Content-ID: <{content_id}>\r\n\r\n"
    )
    return _Attachment(path, head.encode("ascii") + _base64_lines(data), content_id)


def _resolve_attachment(base: Path, spec: str) -> Path:
    spec = spec.strip()
    if not spec:
        raise RowError("empty ATTACHMENT header")
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base / path
    path = path.resolve()
    if not path.is_file():
        raise RowError(f"attachment not found: {path}")
    return path


def attachment_for(base: Path, spec: str) -> _Attachment:
    path = _resolve_attachment(base, spec)
    st = path.stat()
    return _load_attachment(path, (st.st_mtime_ns, st.st_size))


# ---------------------------------------------------------------------- text parts


def _text_part(subtype: str, text: str, boundaries: Sequence[str]) -> tuple[bytes, bytes]:
    """Part headers and CRLF body for a text part: 7bit if possible, else QP (R18, R19)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        long_line = len(text) > _MAX_LINE and max(map(len, text.split("\n"))) > _MAX_LINE
        clash = any(b in text for b in boundaries)
        if not long_line and not clash:
            return _PART_HEADERS[subtype, "us-ascii", "7bit"], text.replace("\n", "\r\n").encode(
                "ascii"
            )
        charset = "us-ascii"
    else:
        charset = "utf-8"
    body = binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
    return _PART_HEADERS[subtype, charset, "quoted-printable"], body


class _PartHeaders(dict[tuple[str, str, str], bytes]):
    def __missing__(self, key: tuple[str, str, str]) -> bytes:
        subtype, charset, cte = key
        value = (
            f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n"
        ).encode("ascii")
        self[key] = value
        return value


_PART_HEADERS: Final = _PartHeaders()


def _boundary() -> str:
    return f"==============={secrets.token_hex(10)}=="


# ---------------------------------------------------------------------- markdown

_MARKDOWN: Any = None


def _markdown_to_html(text: str) -> str:
    """What mailmerge does: python-markdown with nl2br, wrapped in html/body."""
    global _MARKDOWN
    if _MARKDOWN is None:
        import markdown  # type: ignore[import-untyped]
        from markdown.extensions.nl2br import Nl2BrExtension  # type: ignore[import-untyped]

        # The extension object, not its name: a name makes markdown scan the installed
        # packages' entry points (~20 ms of start-up).
        _MARKDOWN = markdown.Markdown(extensions=[Nl2BrExtension()])
    _MARKDOWN.reset()
    html: str = _MARKDOWN.convert(text)
    return f"<html><body>{html}</body></html>"


_IMG_SRC = re.compile(r"""(<img\b[^>]*?\bsrc=)(["'])([^"']*)\2""", re.I)


def _link_inline_images(html: str, base: Path, attachments: Sequence[_Attachment]) -> str:
    """Point <img src="file"> at the attachment of that file (mailmerge's cid: links)."""
    if not attachments or "<img" not in html.lower():
        return html
    by_path = {str(a.path): a.content_id for a in attachments}

    def replace(match: re.Match[str]) -> str:
        src = match.group(3)
        if ":" in src.split("/")[0]:
            return match.group(0)
        path = Path(src).expanduser()
        resolved = str((path if path.is_absolute() else base / path).resolve())
        cid = by_path.get(resolved)
        if cid is None:
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}cid:{cid}{match.group(2)}"

    return _IMG_SRC.sub(replace, html)


# ---------------------------------------------------------------------- structure

# A piece of template text: a literal, or the index of an expression's value.
Piece = str | int


def _format(pieces: Sequence[Piece]) -> str:
    """The pieces as a :meth:`str.format` string: one C call per message to join them."""
    return "".join(
        p.replace("{", "{{").replace("}", "}}") if isinstance(p, str) else f"{{{p}}}"
        for p in pieces
    )


def _join(pieces: Sequence[Piece], values: Sequence[str]) -> str:
    return "".join(p if isinstance(p, str) else values[p] for p in pieces)


@dataclass(slots=True)
class _Field:
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


def _parse(pieces: Sequence[Piece]) -> tuple[list[_Field], list[Piece]] | None:
    """Split header fields from the body; None if the structure depends on values.

    Header fields end at the first empty line. Continuation lines (starting with white
    space) are unfolded. A field name must be literal text.
    """
    # Find the first literal "\n\n" (or a header section ending the template).
    head: list[Piece] = []
    body: list[Piece] = []
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
    fields: list[_Field] = []
    for line in _split_lines(head):
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
        if not colon:
            return None
        name = name.strip()
        if not _FIELD_NAME.match(name):
            return None
        value: list[Piece] = [rest.lstrip(" \t"), *line[1:]] if rest.strip() else list(line[1:])
        fields.append(_Field(name, value))
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


def _parse_content_type(value: str) -> tuple[str, str]:
    ctype = value.split(";", 1)[0].strip().lower()
    maintype, _, subtype = ctype.partition("/")
    return maintype, subtype


# ------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class _Header:
    """One header field of the plan: encoded once if constant."""

    field: _Field
    #: The encoded line, for a constant field that is not an address field.
    encoded: bytes | None = None
    #: The parsed mailboxes, for a constant address field.
    addresses: _AddressList | None = None
    #: The value's pieces as a format string (see :func:`_format`).
    fmt: str = ""


@dataclass(slots=True)
class _Plan:
    """A parsed template: what is constant is encoded, what varies is pieces."""

    base: Path
    headers: list[_Header]
    body: list[Piece]
    subtype: str  # "plain", "html", or "markdown"
    attachments: list[_Field]
    constant_attachments: list[_Attachment] | None
    html: list[Piece] | None  # markdown converted once with placeholders
    body_fmt: str
    html_fmt: str | None
    html_checks: dict[int, tuple[bool, bool]]  # expr -> (inside a tag, at line start)
    boundaries: tuple[str, str]
    has_date: bool
    message_id_field: _Field | None
    from_field: _Field


class _PlanError(Exception):
    pass


def _placeholder(i: int) -> str:
    return f"QZXTRIOMAILPH{i}X"


def _build_plan(fields: list[_Field], body: list[Piece], base: Path) -> _Plan:
    subtype = "plain"
    headers: list[_Header] = []
    attachments: list[_Field] = []
    has_date = False
    message_id_field = None
    from_field = None
    for f in fields:
        key = f.key
        if key == "attachment":
            attachments.append(f)
            continue
        if key == "content-type":
            if not f.constant:
                raise _PlanError("Content-Type from a value")
            maintype, sub = _parse_content_type(_join(f.pieces, []))
            if maintype != "text":
                raise _PlanError(f"Content-Type {maintype}/{sub}")
            subtype = sub or "plain"
            continue
        if key in _GENERATED:
            if key == "content-transfer-encoding":
                cte = _join(f.pieces, []).strip().lower() if f.constant else "?"
                if cte not in ("7bit", "8bit", ""):
                    raise _PlanError(f"Content-Transfer-Encoding {cte}")
            continue
        if key == "date":
            has_date = True
        elif key == "message-id":
            message_id_field = f
        elif key == "from" and from_field is None:
            from_field = f
        f.name = _CANONICAL_NAMES.get(key, f.name)
        header = _Header(f, fmt=_format(f.pieces))
        if f.constant:
            value = _join(f.pieces, [])
            try:
                _check_header_value(f.name, value)
                if key in _ADDRESS_FIELDS:
                    header.addresses = _address_list(value, f.name)
                else:
                    header.encoded = encode_unstructured(f.name, value).encode("ascii")
            except RowError as exc:
                raise TemplateError(str(exc)) from None
        headers.append(header)
    if from_field is None:
        raise TemplateError("the template has no From header")
    if not any(f.key in _RECIPIENT_FIELDS for f in fields):
        raise TemplateError("the template has no To, Cc or Bcc header")
    constant_attachments = None
    if all(a.constant for a in attachments):
        try:
            constant_attachments = [attachment_for(base, _join(a.pieces, [])) for a in attachments]
        except RowError as exc:
            raise TemplateError(str(exc)) from None
    html = None
    checks: dict[int, tuple[bool, bool]] = {}
    if subtype == "markdown":
        html, checks = _compile_markdown(body, base, constant_attachments)
    return _Plan(
        base=base,
        headers=headers,
        body=body,
        subtype=subtype,
        attachments=attachments,
        constant_attachments=constant_attachments,
        html=html,
        body_fmt=_format(body),
        html_fmt=None if html is None else _format(html),
        html_checks=checks,
        boundaries=(_boundary(), _boundary()),
        has_date=has_date,
        message_id_field=message_id_field,
        from_field=from_field,
    )


def _compile_markdown(
    body: list[Piece], base: Path, attachments: list[_Attachment] | None
) -> tuple[list[Piece] | None, dict[int, tuple[bool, bool]]]:
    """Markdown -> HTML once, with a placeholder per value; None if that is not exact."""
    exprs = {p for p in body if isinstance(p, int)}
    source = "".join(p if isinstance(p, str) else _placeholder(p) for p in body)
    if not exprs:
        html = _markdown_to_html(source)
        if attachments:
            html = _link_inline_images(html, base, attachments)
        return [html], {}
    if any(_placeholder(i) in _join([p for p in body if isinstance(p, str)], []) for i in exprs):
        return None, {}
    html = _markdown_to_html(source)
    if attachments is not None:
        html = _link_inline_images(html, base, attachments)
    elif "<img" in html.lower():
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


def _inert(value: str, in_tag: bool, line_start: bool) -> bool:
    if in_tag:
        return _INERT_IN_TAG.match(value) is not None
    if _INERT_TEXT.match(value) is None or "  " in value:
        return False
    return not line_start or value[0].isalpha()


# ---------------------------------------------------------------------- rendering


class _DateCache:
    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = f"Date: {email.utils.formatdate(now)}\r\n".encode("ascii")
        return self._value


_DATE = _DateCache()


def _render_plan(plan: _Plan, values: Sequence[str], message_id: str) -> Rendered:
    utf8 = False
    lines: list[bytes | tuple[str, _AddressList]] = []
    envelope: list[str] = []
    sender = ""
    mid = message_id
    for header in plan.headers:
        f = header.field
        if header.encoded is not None:
            lines.append(header.encoded)
            if f is plan.message_id_field:
                mid = header.fmt.format(*values)
            continue
        addresses = header.addresses
        if addresses is None:
            value = header.fmt.format(*values).strip()
            _check_header_value(f.name, value)
            if f.key not in _ADDRESS_FIELDS:
                if f is plan.message_id_field:
                    mid = value
                lines.append(encode_unstructured(f.name, value).encode("ascii"))
                continue
            addresses = _address_list(value, f.name)
        utf8 = utf8 or addresses.utf8
        key = f.key
        if key in _RECIPIENT_FIELDS:
            envelope.extend(addresses.addresses)
        if f is plan.from_field:
            if len(addresses.addresses) != 1:
                count = len(addresses.addresses)
                raise RowError(f"From must hold exactly one address, not {count}")
            sender = addresses.addresses[0]
        if key != "bcc":
            lines.append((f.name, addresses))
    if not envelope:
        raise RowError("no recipient address (To, Cc and Bcc are empty)")
    charset = "utf-8" if utf8 else "ascii"
    out: list[bytes] = [
        line if isinstance(line, bytes) else encode_address_field(*line).encode(charset)
        for line in lines
    ]
    if not plan.has_date:
        out.append(_DATE.header())
    if plan.message_id_field is None:
        out.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
    out.append(b"MIME-Version: 1.0\r\n")

    # ---- body
    text = plan.body_fmt.format(*values)
    attachments = plan.constant_attachments
    if attachments is None:
        attachments = [attachment_for(plan.base, _join(a.pieces, values)) for a in plan.attachments]
    outer, inner = plan.boundaries
    if plan.subtype == "markdown":
        html: str | None = None
        if plan.html_fmt is not None and all(
            _inert(values[i], *check) for i, check in plan.html_checks.items()
        ):
            html = plan.html_fmt.format(*values)
        if html is None:
            html = _link_inline_images(_markdown_to_html(text), plan.base, attachments)
        t_head, t_body = _text_part("plain", text, plan.boundaries)
        h_head, h_body = _text_part("html", html, plan.boundaries)
        alt = [
            f'Content-Type: multipart/alternative; boundary="{inner}"\r\n\r\n'
            f"--{inner}\r\n".encode("ascii"),
            t_head, b"\r\n", t_body, f"\r\n--{inner}\r\n".encode("ascii"),
            h_head, b"\r\n", h_body, f"\r\n--{inner}--\r\n".encode("ascii"),
        ]  # fmt: skip
        out.append(f'Content-Type: multipart/related; boundary="{outer}"\r\n\r\n'.encode("ascii"))
        out.append(f"--{outer}\r\n".encode("ascii"))
        out.extend(alt)
    else:
        if plan.subtype == "html" and attachments:
            text = _link_inline_images(text, plan.base, attachments)
        head, body = _text_part(plan.subtype, text, plan.boundaries)
        if not attachments:
            out.append(head)
            out.append(b"\r\n")
            out.append(body)
            if not body.endswith(b"\r\n"):
                out.append(b"\r\n")
            return _rendered(out, sender, envelope, mid, utf8)
        out.append(f'Content-Type: multipart/related; boundary="{outer}"\r\n\r\n'.encode("ascii"))
        out.append(f"--{outer}\r\n".encode("ascii"))
        out.extend((head, b"\r\n", body, b"\r\n"))
    for attachment in attachments:
        out.append(f"--{outer}\r\n".encode("ascii"))
        out.append(attachment.part)
    out.append(f"--{outer}--\r\n".encode("ascii"))
    return _rendered(out, sender, envelope, mid, utf8)


def _rendered(out: list[bytes], sender: str, envelope: list[str], mid: str, utf8: bool) -> Rendered:
    if not sender:
        raise RowError("no sender address in From")
    return Rendered(b"".join(out), sender, tuple(dict.fromkeys(envelope)), mid, utf8)


# ------------------------------------------------------------------ email fallback


def _render_with_email(raw: str, base: Path, message_id: str) -> Rendered:
    """Templates that write their own MIME structure: mailmerge's steps, email package."""
    msg = email.message_from_string(raw)
    for name, value in msg.items():
        _check_header_value(name, str(value))
    charset = "us-ascii" if raw.isascii() else "utf-8"
    for part in msg.walk():
        if part.get_content_maintype() != "multipart":
            part.set_charset(charset)
    pairs = email.utils.getaddresses(
        msg.get_all("To", []) + msg.get_all("Cc", []) + msg.get_all("Bcc", [])
    )
    recipients = []
    for _, addr in pairs:
        try:
            recipients.append(format_path(addr).address)
        except LocalProtocolError as exc:
            raise RowError(f"invalid recipient address {addr!r}: {exc}") from None
    if not recipients:
        raise RowError("no recipient address (To, Cc and Bcc are empty)")
    senders = email.utils.getaddresses(msg.get_all("From", []))
    if len(senders) != 1:
        raise RowError("From must hold exactly one address")
    try:
        sender = format_path(senders[0][1]).address
    except LocalProtocolError as exc:
        raise RowError(f"invalid From address: {exc}") from None
    del msg["Bcc"]
    specs = msg.get_all("Attachment", [])
    del msg["Attachment"]
    if specs:
        if not msg.is_multipart():
            raise RowError("ATTACHMENT needs a multipart template or a plain body")
        for spec in specs:
            att = attachment_for(base, str(spec))
            part = email.message_from_bytes(att.part)
            msg.attach(part)
    if "Date" not in msg:
        msg["Date"] = email.utils.formatdate()
    mid = str(msg["Message-ID"]).strip() if "Message-ID" in msg else message_id
    if "Message-ID" not in msg:
        msg["Message-ID"] = message_id
    buffer = io.BytesIO()
    policy = email.policy.SMTP.clone(cte_type="7bit")
    BytesGenerator(buffer, policy=policy).flatten(msg, linesep="\r\n")  # type: ignore[arg-type]
    data = buffer.getvalue()
    if any(len(line) > _MAX_LINE for line in data.split(b"\r\n")):
        raise RowError("a line of the message is longer than 998 octets")
    utf8 = not all(r.partition("@")[0].isascii() for r in [sender, *recipients])
    return Rendered(data, sender, tuple(dict.fromkeys(recipients)), mid, utf8)


# ------------------------------------------------------------------------- compile


_JINJA_NAMES = frozenset(
    {"true", "false", "none", "True", "False", "None", "loop", "self", "varargs", "kwargs"}
)


@dataclass(slots=True)
class _Values:
    """The values of a template's expressions for one row.

    Plain names (``{{ email }}``, by far the most common) are looked up directly; any
    other expression is rendered by one small Jinja2 template that joins the values
    with NUL. A row that lacks a name goes through Jinja2 too (for its error message).
    """

    template: jinja2.Template
    count: int
    names: tuple[str, ...] | None

    def render(self, row: Mapping[str, Any]) -> list[str] | None:
        if not self.count:
            return []
        names = self.names
        if names is not None:
            try:
                return [str(row[name]) for name in names]
            except KeyError:
                pass
        values = self.template.render(row).split(_SEP)
        return values if len(values) == self.count else None

    @classmethod
    def compile(cls, env: jinja2.Environment, exprs: Sequence[str]) -> _Values:
        source = _SEP.join("{{" + e + "}}" for e in exprs)
        stripped = [e.strip() for e in exprs]
        plain = all(e.isidentifier() and e not in _JINJA_NAMES for e in stripped)
        return cls(env.from_string(source), len(exprs), tuple(stripped) if plain else None)


@dataclass(slots=True)
class CompiledTemplate:
    """A template compiled once; :meth:`render` turns one row into message bytes."""

    path: Path
    source: str
    #: Hash of the template text and its constant attachments (the journal's content hash).
    digest: str
    _full: jinja2.Template
    _values: _Values | None
    _pieces: list[Piece]
    _plan: _Plan | None
    _checked: bool = False
    mode: str = "compiled"

    def sender_domain(self) -> str | None:
        """The domain of a constant From address (for Message-IDs), if there is one."""
        if self._plan is None:
            return None
        for header in self._plan.headers:
            if header.field is self._plan.from_field and header.addresses is not None:
                addresses = header.addresses.addresses
                if addresses:
                    return addresses[0].rpartition("@")[2]
        return None

    def render(self, row: Mapping[str, Any], *, message_id: str) -> Rendered:
        """Render one row; raises :class:`RowError` for a row that cannot be sent."""
        try:
            return self._render(row, message_id)
        except jinja2.exceptions.UndefinedError as exc:
            raise RowError(f"template: {exc.message}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise RowError(f"template: {exc}") from None
        except LocalProtocolError as exc:
            raise RowError(str(exc)) from None
        except UnicodeEncodeError as exc:
            raise RowError(f"cannot encode: {exc}") from None

    def _render(self, row: Mapping[str, Any], message_id: str) -> Rendered:
        if self._plan is not None and self._values is not None:
            values = self._values.render(row)
            if values is not None:
                if not self._checked:
                    self._self_check(row, values)
                if self._plan is not None:
                    return _render_plan(self._plan, values, message_id)
        raw = self._full.render(row)
        return self.render_text(raw, message_id)

    def render_text(self, raw: str, message_id: str) -> Rendered:
        """Render a fully expanded template text (the slow path).

        Values came through :func:`_escape_value`, so a line break from a field is
        still marked: in a header it is refused (R15), in the body it is restored.
        """
        parsed = _parse([raw])
        if parsed is None:
            raise RowError("the rendered template is not header fields, a blank line, a body")
        fields, body = parsed
        for f in fields:
            _check_header_value(f.name, _join(f.pieces, []))
        body = [_unescape(p) if isinstance(p, str) else p for p in body]
        try:
            plan = _build_plan(fields, body, self.path.parent)
        except _PlanError:
            head, sep, rest = raw.partition("\n\n")
            return _render_with_email(head + sep + _unescape(rest), self.path.parent, message_id)
        except TemplateError as exc:
            raise RowError(str(exc)) from None
        return _render_plan(plan, [], message_id)

    def _self_check(self, row: Mapping[str, Any], values: list[str]) -> None:
        """The interleaved pieces must equal Jinja2's own rendering, once."""
        if any(_CONTROL_IN_VALUE.search(v) for v in values):
            return  # such values render escaped; check with a later row
        self._checked = True
        expected = self._full.render(row)
        if _join(self._pieces, values) != expected:
            self._plan = None
            self.mode = "per-row"


def _tokens(env: jinja2.Environment, source: str) -> tuple[list[Piece], list[str]] | None:
    """Literal and expression pieces, or None if the template has statements."""
    pieces: list[Piece] = []
    exprs: list[str] = []
    current: list[str] | None = None
    for _, kind, value in env.lex(source):
        if current is not None:
            if kind == "variable_end":
                exprs.append("".join(current))
                pieces.append(len(exprs) - 1)
                current = None
            else:
                current.append(value)
            continue
        if kind == "data":
            if pieces and isinstance(pieces[-1], str):
                pieces[-1] += value
            else:
                pieces.append(value)
        elif kind == "variable_begin":
            current = []
        elif kind in ("comment_begin", "comment", "comment_end", "whitespace"):
            continue
        else:
            return None
    return pieces, exprs


def compile_template(path: str | os.PathLike[str]) -> CompiledTemplate:
    """Read and compile a template file; raises :class:`TemplateError`."""
    path = Path(path)
    try:
        source = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TemplateError(f"cannot read template {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(f"template {path} is not UTF-8: {exc}") from None
    source = source.replace("\r\n", "\n")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_escape_value,
    )
    try:
        full = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"{path}:{exc.lineno}: {exc.message}") from None
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    tokens = _tokens(env, source)
    values = None
    plan = None
    pieces: list[Piece] = []
    mode = "per-row"
    if tokens is not None:
        pieces, exprs = tokens
        parsed = _parse(pieces)
        if parsed is not None:
            fields, body = parsed
            try:
                plan = _build_plan(fields, body, path.parent.resolve())
                values = _Values.compile(env, exprs)
                mode = "compiled"
            except _PlanError:
                plan = None
    if plan is not None and plan.constant_attachments:
        for att in plan.constant_attachments:
            digest = hashlib.sha256((digest + att.content_id[:16]).encode()).hexdigest()
    return CompiledTemplate(
        path=path.resolve(),
        source=source,
        digest=digest[:32],
        _full=full,
        _values=values,
        _pieces=pieces,
        _plan=plan,
        mode=mode,
    )
