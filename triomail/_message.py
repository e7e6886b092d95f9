"""From an :class:`email.message.EmailMessage` to an envelope and wire bytes.

The sender comes from Sender, else From; the recipients from To, Cc and Bcc. When the
message carries Resent-* fields (RFC 5322 §3.6.6) the newest resent block decides
instead, as smtplib's ``send_message`` does. Bcc and Resent-Bcc are stripped from the
data. The serialisation policy is chosen per server: SMTPUTF8 (raw UTF-8 headers) only
when something needs it and the server offers it, 8-bit bodies only with 8BITMIME,
otherwise the email package re-encodes to 7 bit (R18, R32).
"""

from __future__ import annotations

import copy
import io
import re
from dataclasses import dataclass
from email import policy as _policy
from email.generator import BytesGenerator
from email.headerregistry import AddressHeader
from email.message import EmailMessage, Message
from email.utils import getaddresses

from ._errors import LocalProtocolError

__all__ = ["Envelope", "envelope_of", "flatten"]

_POLICY_7BIT = _policy.SMTP.clone(cte_type="7bit")
_POLICY_8BIT = _policy.SMTP
_POLICY_UTF8 = _policy.SMTPUTF8


@dataclass(frozen=True, slots=True)
class Envelope:
    """The reverse-path and forward-paths of one transaction (RFC 5321 §2.3.1)."""

    sender: str
    recipients: tuple[str, ...]


def _addresses(msg: Message, *names: str) -> list[str]:
    values: list[str] = []
    for name in names:
        for value in msg.get_all(name, []):
            if isinstance(value, AddressHeader):
                values.extend(a.addr_spec for a in value.addresses if a.addr_spec != "<>")
            else:
                values.extend(addr for _, addr in getaddresses([str(value)]) if addr)
    return values


def envelope_of(msg: Message) -> Envelope:
    """Derive the envelope from the message's headers."""
    resent = [k for k in msg if k.lower().startswith("resent-")]
    prefix = "Resent-" if resent else ""
    if resent and len(msg.get_all("Resent-Date", [])) > 1:
        # Several resent blocks: the newest is on top (§3.6.6); only use it.
        raise LocalProtocolError("several Resent- blocks: give sender and recipients explicitly")
    senders = _addresses(msg, prefix + "Sender") or _addresses(msg, prefix + "From")
    if len(senders) != 1:
        raise LocalProtocolError(
            f"cannot take the sender from {prefix}Sender/{prefix}From: found {len(senders)}"
        )
    recipients = _addresses(msg, prefix + "To", prefix + "Cc", prefix + "Bcc")
    if not recipients:
        raise LocalProtocolError(f"no recipients in {prefix}To/{prefix}Cc/{prefix}Bcc")
    return Envelope(senders[0], tuple(dict.fromkeys(recipients)))


# RFC 5322 §3.6.8: field-name = 1*ftext, printable US-ASCII except ":".
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")


def _check_headers(msg: Message | str) -> None:
    """Refuse header names and values that would inject a header line (R15)."""
    if not isinstance(msg, Message):
        return
    for name, value in msg.items():
        if not _FIELD_NAME.match(name):
            raise LocalProtocolError(f"invalid header name {name[:60]!r}")
        text = str(value)
        # A CR or LF is legal only as folding: CRLF followed by white space.
        stripped = text.replace("\r\n ", " ").replace("\r\n\t", " ")
        stripped = stripped.replace("\n ", " ").replace("\n\t", " ")
        if "\r" in stripped or "\n" in stripped:
            raise LocalProtocolError(f"header {name} contains a bare CR or LF: {text[:60]!r}")
    if msg.is_multipart():
        payload = msg.get_payload()
        if isinstance(payload, list):
            for part in payload:
                _check_headers(part)


def needs_utf8_headers(msg: Message) -> bool:
    """True if an address header carries a non-ASCII local part (needs RFC 6532)."""
    return any(
        not addr.partition("@")[0].isascii()
        for addr in _addresses(msg, "From", "Sender", "To", "Cc", "Reply-To")
    )


def flatten(msg: Message, *, utf8: bool, eight_bit: bool) -> bytes:
    """Serialise without Bcc/Resent-Bcc, with CRLF line endings and the chosen policy."""
    _check_headers(msg)
    if "Bcc" in msg or "Resent-Bcc" in msg:
        msg = copy.copy(msg)
        del msg["Bcc"]
        del msg["Resent-Bcc"]
    policy = _POLICY_UTF8 if utf8 else (_POLICY_8BIT if eight_bit else _POLICY_7BIT)
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=policy).flatten(msg, linesep="\r\n")  # type: ignore[arg-type]
    return buffer.getvalue()


def message_id_of(msg: Message) -> str | None:
    value = msg.get("Message-ID")
    return None if value is None else str(value).strip()


def is_email_message(obj: object) -> bool:
    return isinstance(obj, EmailMessage | Message)
