"""Per row: the plan filled in with the values, or the whole message through email.

:func:`render_plan` joins constant bytes and per-row encoded fields into canonical CRLF
text (RFC 5322 §2.1; R16), adds ``Date`` (cached per second), ``Message-ID`` and
``MIME-Version`` where the template has none, and returns the envelope with it.
:func:`render_with_email` takes a template that writes its own MIME body through the
:mod:`email` package, as mailmerge does.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
import io
import time
from collections.abc import Sequence
from email.generator import BytesGenerator
from pathlib import Path

from ..._core.errors import LocalProtocolError
from ..._core.message import POLICY_7BIT
from ..._core.paths import format_path
from .addresses import check_bracketed
from .headers import (
    MAX_LINE,
    RECIPIENT_FIELDS,
    AddressList,
    check_header_value,
    encode_address_field,
    encode_field,
)
from .markdown import link_inline_images, markdown_to_html
from .mime import attachment_for, content_ids, text_part
from .parse import join_pieces
from .plan import Plan, is_inert
from .rendered import Rendered, RowError

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


def bounce_address(value: str) -> str:
    """The envelope sender a ``Return-Path`` field asks for (``<>``: the null sender)."""
    value = value.strip()
    check_header_value("Return-Path", value)
    try:
        return format_path(value, allow_null=True).address
    except LocalProtocolError as exc:
        raise RowError(f"Return-Path: invalid bounce address {value!r}: {exc}") from None


def render_plan(plan: Plan, values: Sequence[str], message_id: str) -> Rendered:
    utf8 = False
    lines: list[bytes | tuple[str, AddressList]] = []
    envelope: list[str] = []
    sender = ""
    bounce = None
    mid = message_id
    for header in plan.headers:
        f = header.field
        if f is plan.return_path_field:
            # The envelope sender, never part of the message (RFC 5321 §4.4).
            bounce = bounce_address(header.fmt.format(*values))
            continue
        if header.encoded is not None:
            lines.append(header.encoded)
            if f is plan.message_id_field:
                mid = header.fmt.format(*values)
            continue
        addresses = header.addresses
        if addresses is None:
            value = header.fmt.format(*values).strip()
            check_header_value(f.name, value)
            if header.template is None:
                if header.bracketed:
                    check_bracketed(f.name, header.bracketed, values)
                if f is plan.message_id_field:
                    mid = value
                lines.append(encode_field(f.name, value).encode("ascii"))
                continue
            addresses = header.template.fill(values)
        utf8 = utf8 or addresses.utf8
        key = f.key
        if key in RECIPIENT_FIELDS:
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
        attachments = [
            attachment_for(
                plan.base, join_pieces(a.pieces, values), None if a.constant else plan.root
            )
            for a in plan.attachments
        ]
    cids = content_ids(mid, len(attachments)) if attachments else []
    outer, inner = plan.boundaries
    if plan.subtype == "markdown":
        html: str | None = None
        images = plan.html_images
        if plan.html_fmt is not None and all(
            is_inert(values[i], *check) for i, check in plan.html_checks.items()
        ):
            html = plan.html_fmt.format(*values)
        if html is None:
            html = markdown_to_html(text)
            images = True  # link_inline_images looks for <img> itself
        if images:
            html = link_inline_images(html, plan.base, attachments, cids)
        t_head, t_body = text_part("plain", text, plan.boundaries)
        h_head, h_body = text_part("html", html, plan.boundaries)
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
            text = link_inline_images(text, plan.base, attachments, cids)
        head, body = text_part(plan.subtype, text, plan.boundaries)
        if not attachments:
            out.append(head)
            out.append(b"\r\n")
            out.append(body)
            if not body.endswith(b"\r\n"):
                out.append(b"\r\n")
            return _rendered(out, sender, bounce, envelope, mid, utf8)
        out.append(f'Content-Type: multipart/related; boundary="{outer}"\r\n\r\n'.encode("ascii"))
        out.append(f"--{outer}\r\n".encode("ascii"))
        out.extend((head, b"\r\n", body, b"\r\n"))
    for attachment, cid in zip(attachments, cids, strict=True):
        out.append(f"--{outer}\r\n".encode("ascii"))
        out.extend(attachment.part(cid))
    out.append(f"--{outer}--\r\n".encode("ascii"))
    return _rendered(out, sender, bounce, envelope, mid, utf8)


def _rendered(
    out: list[bytes], sender: str, bounce: str | None, envelope: list[str], mid: str, utf8: bool
) -> Rendered:
    """The message; its envelope sender is the bounce address if there is one, else From."""
    if not sender:
        raise RowError("no sender address in From")
    if bounce is not None:
        sender = bounce
        utf8 = utf8 or not sender.partition("@")[0].isascii()
    return Rendered(b"".join(out), sender, tuple(dict.fromkeys(envelope)), mid, utf8)


# ------------------------------------------------------------------ email fallback


def render_with_email(raw: str, base: Path, message_id: str) -> Rendered:
    """Templates that write their own MIME structure: mailmerge's steps, email package."""
    msg = email.message_from_string(raw)
    for name, value in msg.items():
        check_header_value(name, str(value))
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
        author = format_path(senders[0][1]).address
    except LocalProtocolError as exc:
        raise RowError(f"invalid From address: {exc}") from None
    bounce = msg.get("Return-Path")
    sender = author if bounce is None else bounce_address(str(bounce))
    del msg["Bcc"]
    del msg["Return-Path"]
    specs = msg.get_all("Attachment", [])
    del msg["Attachment"]
    mid = str(msg["Message-ID"]).strip() if "Message-ID" in msg else message_id
    if specs:
        if not msg.is_multipart():
            raise RowError("ATTACHMENT needs a multipart template or a plain body")
        for spec, cid in zip(specs, content_ids(mid, len(specs)), strict=True):
            att = attachment_for(base, str(spec))
            msg.attach(email.message_from_bytes(b"".join(att.part(cid))))
    if "Date" not in msg:
        msg["Date"] = email.utils.formatdate()
    if "Message-ID" not in msg:
        msg["Message-ID"] = message_id
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=POLICY_7BIT).flatten(msg, linesep="\r\n")
    data = buffer.getvalue()
    if any(len(line) > MAX_LINE for line in data.split(b"\r\n")):
        raise RowError("a line of the message is longer than 998 octets")
    utf8 = not all(r.partition("@")[0].isascii() for r in [author, sender, *recipients])
    return Rendered(data, sender, tuple(dict.fromkeys(recipients)), mid, utf8)
