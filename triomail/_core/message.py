"""From an :class:`email.message.EmailMessage` to an envelope and wire bytes.

The sender comes from Sender, else From; the recipients from To, Cc and Bcc. When the
message carries Resent-* fields (RFC 5322 §3.6.6) the newest resent block decides
instead, as smtplib's ``send_message`` does. Bcc and Resent-Bcc are stripped from the
data. The serialisation policy is chosen per server: SMTPUTF8 (raw UTF-8 headers) only
when something needs it and the server offers it, 8-bit bodies only with 8BITMIME,
otherwise the email package re-encodes to 7 bit (R18, R32).
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from dataclasses import dataclass
from email import policy as _policy
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import Address, AddressHeader, Group
from email.message import EmailMessage, Message
from email.utils import getaddresses

from .errors import LocalProtocolError
from .idna2008 import idna_domain
from .structured import fold_structured, is_structured

__all__ = ["Envelope", "envelope_of", "flatten"]


class _Policy(_policy.EmailPolicy):
    """The SMTP policy, but structured fields (Message-ID, List-*...) are never encoded.

    The email package writes any word longer than a line as RFC 2047 encoded words, even
    in fields whose grammar has none (:mod:`.structured`).
    """

    def fold(self, name: str, value: str) -> str:
        if not is_structured(name):
            folded: str = super().fold(name, value)
            return folded
        return self._verbatim(name, value).replace("\r\n", self.linesep)

    def fold_binary(self, name: str, value: str) -> bytes:
        if not is_structured(name):
            return super().fold_binary(name, value)
        return self.fold(name, value).encode("utf-8" if self.utf8 else "ascii")

    def _verbatim(self, name: str, value: str) -> str:
        text = str(value)
        if not (text.isascii() or self.utf8):
            raise LocalProtocolError(
                f"header {name}: non-ASCII text cannot be written in this field without "
                f"SMTPUTF8 (it takes no encoded words): {text[:60]!r}"
            )
        return fold_structured(name, text)


_POLICY_8BIT = _Policy(linesep="\r\n")  # as email.policy.SMTP
POLICY_7BIT = _POLICY_8BIT.clone(cte_type="7bit")
_POLICY_UTF8 = _POLICY_8BIT.clone(utf8=True)  # as email.policy.SMTPUTF8


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


_ADDRESS_HEADERS = (
    "From",
    "Sender",
    "To",
    "Cc",
    "Reply-To",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
)


def needs_utf8_headers(msg: Message) -> bool:
    """True if an address header carries a non-ASCII local part (needs RFC 6532)."""
    return any(not addr.rpartition("@")[0].isascii() for addr in _addresses(msg, *_ADDRESS_HEADERS))


def _ascii_address_header(name: str, value: AddressHeader) -> AddressHeader:
    """An address header without UTF-8, for a server without SMTPUTF8 (R32).

    IDN domains become A-labels. A UTF-8 local part cannot be written at all (RFC 2047
    §5 forbids encoded-words in an addr-spec), so it is refused.
    """
    if all(a.username.isascii() and a.domain.isascii() for a in value.addresses):
        return value
    items: list[Address | Group] = []
    for group in value.groups:
        addresses = []
        for a in group.addresses:
            if not a.username.isascii():
                raise LocalProtocolError(
                    f"{name}: {a.addr_spec!r} has a UTF-8 local part, which needs SMTPUTF8"
                )
            domain = a.domain if a.domain.isascii() else idna_domain(a.domain, a.addr_spec)
            addresses.append(Address(a.display_name, a.username, domain))
        if group.display_name is None:
            items.extend(addresses)
        else:
            items.append(Group(group.display_name, addresses))
    header: AddressHeader = POLICY_7BIT.header_factory(name, items)
    return header


def _ascii_header(name: str, value: object) -> object:
    """``value`` in a form the 7-bit and 8-bit policies can write as ASCII headers."""
    if isinstance(value, Header):  # compat32: the EmailPolicy folder cannot take it
        value = str(value)
    if isinstance(value, str):
        if value.isascii():
            return value
        # compat32 and parsed messages keep raw str values; parse them so they are
        # RFC 2047 encoded. Parsed 8-bit headers hold UTF-8 as surrogate escapes.
        unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
        with contextlib.suppress(UnicodeDecodeError):  # if not UTF-8: unknown-8bit
            unfolded = unfolded.encode("utf-8", "surrogateescape").decode("utf-8")
        value = POLICY_7BIT.header_factory(name, unfolded)
    if isinstance(value, AddressHeader):
        return _ascii_address_header(name, value)
    return value


def _without_utf8_headers(msg: Message) -> Message:
    """A copy of ``msg`` whose top-level headers need no SMTPUTF8, or ``msg`` itself."""
    items = list(msg.raw_items())
    fixed = [(name, _ascii_header(name, value)) for name, value in items]
    if all(new is old for (_, new), (_, old) in zip(fixed, items, strict=True)):
        return msg
    msg = copy.copy(msg)
    for name in {name.lower() for name, _ in fixed}:
        del msg[name]  # rebinds the copy's header list; the caller's is untouched
    for name, value in fixed:
        msg.set_raw(name, value)  # type: ignore[arg-type]
    return msg


def flatten(msg: Message, *, utf8: bool, eight_bit: bool) -> bytes:
    """Serialise without Bcc/Resent-Bcc, with CRLF line endings and the chosen policy.

    Without ``utf8`` the headers are ASCII: RFC 2047 for text, A-labels for IDN domains;
    an address with a UTF-8 local part raises :class:`LocalProtocolError` (R32).
    """
    _check_headers(msg)
    if "Bcc" in msg or "Resent-Bcc" in msg:
        msg = copy.copy(msg)
        del msg["Bcc"]
        del msg["Resent-Bcc"]
    if not utf8:
        msg = _without_utf8_headers(msg)
    policy = _POLICY_UTF8 if utf8 else (_POLICY_8BIT if eight_bit else POLICY_7BIT)
    buffer = io.BytesIO()
    try:
        BytesGenerator(buffer, policy=policy).flatten(msg, linesep="\r\n")
    except UnicodeEncodeError as exc:
        # Raw non-ASCII the policy cannot re-encode (a compat32 MIME part's headers, a
        # parsed 8-bit body without charset under 7 bit): a caller error, not a crash.
        what = "SMTPUTF8" if eight_bit else "8BITMIME or SMTPUTF8"
        raise LocalProtocolError(f"message cannot be written without {what}: {exc}") from None
    return buffer.getvalue()


def message_id_of(msg: Message) -> str | None:
    value = msg.get("Message-ID")
    return None if value is None else str(value).strip()


def is_email_message(obj: object) -> bool:
    return isinstance(obj, EmailMessage | Message)
