"""What the page shows of one message: parsed per request from the raw bytes.

Captured mail is untrusted input, so nothing here trusts it: a part whose charset
Python does not know is decoded with replacement characters instead of failing the
page, a header that does not decode is shown as its raw text, and nothing is turned
into HTML here (the page escapes every value; the HTML part is only ever served to
a sandboxed frame, see :mod:`.app`).

The structure is parsed with the ``compat32`` policy, which keeps header values as
the strings that came in: ``email.policy.default`` would build and re-parse a header
object on every access (``Content-Type`` alone is read dozens of times while walking
a message), several times slower for a list page. Only the headers shown are decoded
(RFC 2047), one by one, with the default policy's header classes.

The "body" parts are the ones a mail client would show: the first ``text/html`` and
the first ``text/plain`` leaf that is not an attachment (``Content-Disposition:
attachment``, RFC 2183), in order, so in a ``multipart/alternative`` (RFC 2046
§5.1.4) both alternatives. Every other leaf part is listed as an attachment under its
index in ``walk()`` order, which is stable for given bytes. Images the HTML refers to
by ``cid:`` are put into it as ``data:`` URLs (:func:`html_with_inline_images`), the one
kind of image the sandboxed frame loads without asking.
"""

from __future__ import annotations

import base64
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from urllib.parse import unquote

__all__ = [
    "Attachment",
    "Parsed",
    "decoded",
    "header_text",
    "headers_only",
    "html_with_inline_images",
    "parse",
    "part_bytes",
]

_PARSER = BytesParser(policy=email.policy.compat32)
_HEADER_PARSER = BytesParser(policy=email.policy.compat32)
_DECODER = email.policy.default
#: A ``cid:`` URL in HTML: up to the quote, space, bracket or parenthesis that ends it.
_CID = re.compile(r"cid:([^\"'\s<>()]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A leaf part that is not a body: index in ``walk()`` order, name, type, size."""

    index: int
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Parsed:
    """The parts of a message the page needs."""

    message: Message
    html: str | None
    text: str | None
    attachments: tuple[Attachment, ...]


def parse(data: bytes) -> Parsed:
    """Split ``data`` into body parts and attachments."""
    message = _PARSER.parsebytes(data)
    bodies: dict[str, Message] = {}
    attachments = []
    for index, part in enumerate(message.walk()):
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        subtype = kind.removeprefix("text/")
        if subtype in ("html", "plain") and subtype not in bodies and not _is_attachment(part):
            bodies[subtype] = part
            continue
        payload = part.get_payload(decode=True)
        attachments.append(
            Attachment(
                index=index,
                filename=_filename(part, index),
                content_type=kind,
                size=len(payload) if isinstance(payload, bytes) else 0,
            )
        )
    return Parsed(
        message=message,
        html=_text(bodies.get("html")),
        text=_text(bodies.get("plain")),
        attachments=tuple(attachments),
    )


def html_with_inline_images(parsed: Parsed) -> str:
    """The HTML part with ``cid:`` references (RFC 2392) replaced by ``data:`` URLs.

    A mail client shows ``<img src="cid:logo@x">`` from the part whose ``Content-ID``
    is ``<logo@x>``; the sandboxed frame may load ``data:`` images and nothing else,
    so the image travels inside the HTML. Only ``image/*`` parts are inlined.
    """
    if not parsed.html or "cid:" not in parsed.html.lower():
        return parsed.html or ""
    images: dict[str, str] = {}
    for part in parsed.message.walk():
        content_id = str(part.get("Content-ID", "")).strip().strip("<>")
        payload = part.get_payload(decode=True) if content_id else None
        if isinstance(payload, bytes) and part.get_content_maintype() == "image":
            encoded = base64.b64encode(payload).decode("ascii")
            images[content_id] = f"data:{part.get_content_type()};base64,{encoded}"

    def replace(match: re.Match[str]) -> str:
        return images.get(unquote(match.group(1)), match.group(0))

    return _CID.sub(replace, parsed.html)


def part_bytes(data: bytes, index: int) -> tuple[bytes, str] | None:
    """The decoded content and filename of leaf part ``index``, or None."""
    for number, part in enumerate(_PARSER.parsebytes(data).walk()):
        if number == index and not part.is_multipart():
            payload = part.get_payload(decode=True)
            return (payload if isinstance(payload, bytes) else b""), _filename(part, index)
    return None


def headers_only(data: bytes) -> Message:
    """The top-level header block of ``data``, without parsing the body."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return _HEADER_PARSER.parsebytes(data if end < 0 else data[: end + 2], headersonly=True)


def decoded(name: str, value: str) -> str:
    """One header value as a reader sees it: encoded words decoded, folding undone."""
    if value.isascii() and "=?" not in value:
        # Nothing to decode (the common case, and the cost of a search).
        return value.replace("\r\n", "").replace("\n", "").strip()
    header = _header(name, value)
    return value if header is None else str(header)


def _header(name: str, value: str) -> object | None:
    """The default policy's header object for a raw value, or None if it will not parse."""
    if not value.isascii():
        # Raw 8-bit text (RFC 6532) arrives as surrogate escapes; UTF-8 is the only
        # charset 8-bit headers may use.
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    try:
        header: object = _DECODER.header_factory(name, value.replace("\r\n", "").replace("\n", ""))
    except (ValueError, TypeError, IndexError, LookupError, AttributeError):
        return None
    return header


def header_text(message: Message, name: str) -> str:
    """Header ``name`` decoded (all occurrences joined), ``""`` if absent."""
    wanted = name.lower()
    return ", ".join(decoded(name, v) for key, v in message.raw_items() if key.lower() == wanted)


def _is_attachment(part: Message) -> bool:
    return str(part.get("Content-Disposition", "")).strip().lower().startswith("attachment")


def _filename(part: Message, index: int) -> str:
    """The part's file name (RFC 2183 ``filename``, else ``name``; RFC 2231 decoded)."""
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        for key, value in part.raw_items():
            params = getattr(_header(key, value), "params", {}) if key.lower() == header else {}
            if params.get(param):
                return str(params[param])
    return f"part-{index}"


def _text(part: Message | None) -> str | None:
    if part is None:
        return None
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return None
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("utf-8", "replace")
