"""What the page shows of one message: parsed once per request from the raw bytes.

Captured mail is untrusted input, so nothing here trusts it: a part whose charset
Python does not know is decoded with replacement characters instead of failing the
page, a header that does not parse is shown as its raw text, and nothing is turned
into HTML here (the page escapes every value; the HTML part is only ever served to
a sandboxed frame, see :mod:`.app`).

The "body" parts are the ones a mail client would show: the first ``text/html`` and
the first ``text/plain`` that are not attachments (``EmailMessage.get_body``, RFC
2046 §5.1.4 ``multipart/alternative`` order). Every other leaf part is listed as an
attachment under its index in ``walk()`` order, which is stable for given bytes.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from email.message import EmailMessage, MIMEPart
from email.parser import BytesHeaderParser, BytesParser

__all__ = ["Attachment", "Parsed", "header_text", "headers_only", "parse", "part_bytes"]

_PARSER = BytesParser(EmailMessage, policy=email.policy.default)
_HEADER_PARSER = BytesHeaderParser(EmailMessage, policy=email.policy.default)


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

    message: EmailMessage
    html: str | None
    text: str | None
    attachments: tuple[Attachment, ...]


def parse(data: bytes) -> Parsed:
    """Split ``data`` into body parts and attachments."""
    message = _PARSER.parsebytes(data)
    html_part = message.get_body(preferencelist=("html",))
    text_part = message.get_body(preferencelist=("plain",))
    attachments = []
    for index, part in enumerate(message.walk()):
        if part.is_multipart() or part is html_part or part is text_part:
            continue
        payload = part.get_payload(decode=True)
        attachments.append(
            Attachment(
                index=index,
                filename=part.get_filename() or f"part-{index}",
                content_type=part.get_content_type(),
                size=len(payload) if isinstance(payload, bytes) else 0,
            )
        )
    return Parsed(
        message=message,
        html=_text(html_part),
        text=_text(text_part),
        attachments=tuple(attachments),
    )


def part_bytes(data: bytes, index: int) -> tuple[bytes, str] | None:
    """The decoded content and filename of leaf part ``index``, or None."""
    for number, part in enumerate(_PARSER.parsebytes(data).walk()):
        if number == index and not part.is_multipart():
            payload = part.get_payload(decode=True)
            content = payload if isinstance(payload, bytes) else b""
            return content, part.get_filename() or f"part-{index}"
    return None


def headers_only(data: bytes) -> EmailMessage:
    """The top-level header block of ``data``, without parsing the body."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return _HEADER_PARSER.parsebytes(data if end < 0 else data[: end + 2])


def header_text(message: EmailMessage, name: str) -> str:
    """Header ``name`` decoded (all occurrences joined), ``""`` if absent or broken."""
    try:
        values = message.get_all(name) or []
        return ", ".join(str(value) for value in values)
    except (ValueError, TypeError, IndexError, LookupError):
        # A malformed header the policy's parser chokes on: show it as it came.
        return ", ".join(value for key, value in message.raw_items() if key.lower() == name.lower())


def _text(part: MIMEPart | None) -> str | None:
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError):
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else None
