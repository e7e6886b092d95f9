"""Header fields: RFC 2047 encoded words, folding, address lists, refused values.

Theory of operation
-------------------
Structured fields (``Message-ID``, ``List-*``...) take no encoded words and are written
verbatim (:func:`encode_field`). Unstructured fields (``Subject``...) are encoded word
by word: runs of words that need it become ``=?utf-8?b?...?=`` encoded words
(RFC 2047 §2, §5) of at most 75 characters, and lines are folded at whitespace near 78
characters (RFC 5322 §2.1.1, §2.2.3). Address fields are parsed into (display name,
address) pairs; a display name is quoted or encoded as a phrase, the address is
checked as an SMTP path (RFC 5321 §4.1.2); an address with a non-ASCII local part is
written as raw UTF-8 (RFC 6532) and makes the message need SMTPUTF8 (RFC 6531).

A field value holding CR, LF or another C0 control (TAB excepted) is refused for the
row (:class:`.rendered.RowError`): no header injection through a field (R15). Jinja2
hands values through :func:`.addresses.escape_value`, which marks such characters so
that they are found again after the template has put them in place. Where a value sits
inside an address field is decided by the template, not the value (:mod:`.addresses`).
"""

from __future__ import annotations

import binascii
import email
import email.errors
import email.policy
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..._core.errors import LocalProtocolError
from ..._core.paths import format_path
from ..._core.structured import fold_structured, is_structured
from .rendered import RowError

# RFC 5321 §4.5.3.1.6 / RFC 5322 §2.1.1: 998 octets plus CRLF.
MAX_LINE = 998
# RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters.
_FOLD_AT = 78
# The UTF-8 payload of one "=?utf-8?b?...?=" word: 45 bytes -> 60 base64 characters,
# 72 characters with the delimiters (RFC 2047 §2: at most 75).
_EW_BYTES = 45
CANONICAL_NAMES = {
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
ADDRESS_FIELDS = frozenset(
    {"to", "cc", "bcc", "from", "sender", "reply-to", "resent-to", "resent-cc",
     "resent-bcc", "resent-from", "resent-sender", "disposition-notification-to"}
)  # fmt: skip
RECIPIENT_FIELDS = ("to", "cc", "bcc")
# Headers the renderer writes itself; a template's own copy is dropped.
GENERATED = frozenset({"mime-version", "content-transfer-encoding"})
FIELD_NAME = re.compile(r"[!-9;-~]+\Z")
# Any C0 control but TAB, and DEL: never inside a header value (R15).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENCODED_WORD_LIKE = re.compile(r"=\?")
# Plain text that markdown passes through unchanged, in text and inside tags.
_SIMPLE_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[A-Za-z0-9.-]+\Z")
_NAME_ADDR = re.compile(r"([^\"<>()\[\]\\,;:@]*?)\s*<([^\s<>()\[\]\\,;:\"@]+@[A-Za-z0-9.-]+)>\Z")
_SPECIALS = re.compile(r"[()<>\[\]:;@\\,.\"]")
_LIST_LIKE = re.compile(r"[,;\s]")


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


def encode_field(name: str, value: str) -> str:
    """``Name: value\\r\\n`` for any field but an address field.

    Structured fields (``Message-ID``, ``List-Unsubscribe``...) are written verbatim,
    folded only where their grammar allows (:mod:`triomail._core.structured`); the rest
    is unstructured text (:func:`encode_unstructured`).
    """
    if not is_structured(name):
        return encode_unstructured(name, value)
    if not value.isascii():
        raise RowError(
            f"header {name}: non-ASCII text cannot be written in this field (it takes no "
            f"encoded words; percent-encode a URL): {value[:60]!r}"
        )
    try:
        return fold_structured(name, value)
    except LocalProtocolError as exc:
        raise RowError(str(exc)) from None


def _quote_phrase(name: str) -> str:
    if _SPECIALS.search(name) is None:
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True, slots=True)
class AddressList:
    tokens: tuple[str, ...]  # "name <addr>" (encoded), one per mailbox
    addresses: tuple[str, ...]  # checked addr-specs
    utf8: bool  # an address needs SMTPUTF8


def _parse_addresses(value: str, what: str) -> list[tuple[str, str]]:
    value = value.strip()
    if not value:
        return []
    if "=?" not in value:  # else the email package decodes the encoded words
        if _SIMPLE_ADDRESS.match(value) is not None:
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


def address_list(value: str, what: str) -> AddressList:
    """Parse, check (RFC 5321 paths, R14) and encode an address field of the template."""
    pairs = _parse_addresses(value, what)
    if not pairs and value.strip():
        # An empty group such as "undisclosed-recipients:;" (the recipients are in Bcc).
        if not value.isascii():
            raise RowError(f"{what}: a group name must be ASCII: {value!r}")
        return AddressList((value.strip(),), (), False)
    return mailbox_tokens(pairs, what)


def mailbox_tokens(
    pairs: Sequence[tuple[str, str]], what: str, *, one_per_value: bool = False
) -> AddressList:
    """Check each (display name, address) and write it as ``phrase <address>``.

    The display name is only ever a phrase: quoted, or RFC 2047 encoded words when it
    is not ASCII (or looks like one), so whatever it holds it names, never addresses.
    ``one_per_value``: the addresses came from values, say so when one is a list.
    """
    addresses = []
    utf8 = False
    for _, addr in pairs:
        try:
            path = format_path(addr)
        except LocalProtocolError as exc:
            hint = ""
            if one_per_value and _LIST_LIKE.search(addr):
                hint = " (a value fills one address: give each recipient its own column)"
            raise RowError(f"{what}: invalid address {addr!r}: {exc}{hint}") from None
        addresses.append(path.address)
        utf8 = utf8 or not path.address.partition("@")[0].isascii()
    tokens = []
    for (display, _), addr in zip(pairs, addresses, strict=True):
        if not display:
            tokens.append(addr)
            continue
        if (display.isascii() or utf8) and "=?" not in display:
            phrase = _quote_phrase(display)
        else:
            phrase = " ".join(_encoded_words(display))
        tokens.append(f"{phrase} <{addr}>")
    return AddressList(tuple(tokens), tuple(addresses), utf8)


def encode_address_field(name: str, addresses: AddressList) -> str:
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
    folded = _fold(name, tokens)
    if any(len(line.encode("utf-8")) > MAX_LINE for line in folded.split("\r\n")):
        # A quoted phrase folds only at its spaces (RFC 5322 §3.2.4): refused here, in
        # --dry-run too, rather than by the server (§2.1.1, R19).
        raise RowError(f"{name}: a display name has a word too long for a 998-octet line")
    return folded


def check_header_value(name: str, value: str) -> None:
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
