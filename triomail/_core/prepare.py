"""A message checked and encoded once, ready for any connection (sans-IO).

Theory of operation
-------------------
:func:`prepare` does every check that does not depend on the server, before any byte is
written (R13): the envelope paths (RFC 5321 §4.1.2, R14), the canonical form of the
content (R16-R19) and whether the message needs SMTPUTF8 (RFC 6531, R32). What depends
on the server (SIZE, 8BITMIME, SMTPUTF8, REQUIRETLS) is decided later, per server, by
:func:`.plan.plan`.

:func:`prepare_rendered` is the one trusted shortcut: for bytes a renderer already wrote
in canonical form with checked addresses (the bulk mailer's templates), it builds the
value without checking again. Everything else goes through :func:`prepare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Literal, Protocol

from .data import Canonical, canonicalize, new_canonical
from .errors import LocalProtocolError
from .frozen import fast_constructor
from .message import envelope_of, flatten, message_id_of, needs_utf8_headers
from .paths import format_path

__all__ = ["DSN", "PreparedMessage", "Signer", "prepare", "prepare_rendered"]

_NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


class Signer(Protocol):
    """What :func:`prepare` needs of a DKIM signer (``_core.dkim`` has the real ones)."""

    def sign(self, message: bytes) -> bytes:
        """The header field(s) to put in front of ``message`` (canonical bytes)."""
        ...


@dataclass(frozen=True, slots=True)
class DSN:
    """RFC 3461 delivery status notification parameters, sent only if advertised (R33)."""

    notify: Sequence[str] | None = None  # ("NEVER",) or any of SUCCESS, FAILURE, DELAY
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    orcpt: bool = False  # send ORCPT=rfc822;<recipient> for each recipient

    def __post_init__(self) -> None:
        # The caller's mistakes are refused here, before any byte is written (R13, R33).
        if self.notify is not None:
            if isinstance(self.notify, str):
                raise LocalProtocolError("DSN notify must be a sequence, e.g. ('FAILURE',)")
            words = [w.upper() for w in self.notify]
            if not words or not set(words) <= _NOTIFY_WORDS:
                raise LocalProtocolError(
                    f"DSN notify must be NEVER or any of SUCCESS, FAILURE, DELAY: {self.notify!r}"
                )
            if "NEVER" in words and len(words) > 1:  # RFC 3461 §4.1
                raise LocalProtocolError("DSN notify NEVER cannot be combined with others")
        if self.ret is not None and self.ret not in ("FULL", "HDRS"):
            raise LocalProtocolError(f"DSN ret must be 'FULL' or 'HDRS', not {self.ret!r}")
        if self.envid is not None and not (
            self.envid.isascii() and self.envid.isprintable() and 0 < len(self.envid) <= 100
        ):
            # RFC 3461 §4.4: printable US-ASCII, at most 100 characters.
            raise LocalProtocolError(f"DSN envid must be printable ASCII: {self.envid!r}")


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message checked and encoded, ready for any connection (local checks done)."""

    sender: str
    recipients: tuple[str, ...]
    canonical: Canonical
    needs_smtputf8: bool
    message_id: str | None
    # For an EmailMessage, the 7-bit form to use when the server lacks 8BITMIME (R18).
    canonical_7bit: Canonical | None = None
    #: The caller's label, copied onto the :class:`SendResult`.
    tag: object = field(default=None, compare=False)


def prepare(
    message: Message | bytes | str,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    smtputf8: bool = True,
    eight_bit: bool = True,
    tag: object = None,
    dkim: Signer | None = None,
) -> PreparedMessage:
    """Check and encode a message once, without I/O, for any connection or the pool.

    Args:
        message: an :class:`email.message.EmailMessage` (its envelope is read from
            From/Sender and To/Cc/Bcc; Bcc is not sent), or the raw bytes (or text) of
            a message, which then needs ``sender`` and ``recipients``.
        sender: the envelope sender (``MAIL FROM``), e.g. a bounce address; ``""`` is
            the null sender ``<>``.
        recipients: the envelope recipients (``RCPT TO``), a sequence of addresses;
            the message is refused if there is none.
        smtputf8: whether the server offers SMTPUTF8, so that an ``EmailMessage`` with
            non-ASCII addresses is written as it can take them.
        eight_bit: whether the server offers 8BITMIME; otherwise 8-bit parts of an
            ``EmailMessage`` are re-encoded to 7 bits.
        tag: any value of yours, returned on the result (``result.tag``): a row id, say.
        dkim: a :class:`~triomail.DKIMSigner` (or ``DKIMMultiSigner``): its signature
            is computed here, over the final bytes, and put in front of them; the
            prepared message then carries it to any connection and through retries.

    Raises :class:`LocalProtocolError` (a :class:`ValueError`) for what no server could
    take: a malformed address, CR or LF in one, a NUL or a line over 998 octets in the
    data. Nothing is written anywhere.
    """
    message_id = None
    canonical_7bit = None
    if isinstance(recipients, str):
        raise LocalProtocolError("recipients must be a sequence of addresses, not one string")
    if isinstance(message, Message):
        if sender is None or recipients is None:
            envelope = envelope_of(message)
            sender = envelope.sender if sender is None else sender
            recipients = envelope.recipients if recipients is None else recipients
        recipients = tuple(recipients)
        message_id = message_id_of(message)
        # UTF-8 addresses in headers can only be written raw (RFC 6532); whether the
        # server takes that is decided per server by plan() (553 5.6.7, R32).
        utf8 = needs_utf8_headers(message)
        canonical = canonicalize(flatten(message, utf8=utf8, eight_bit=eight_bit or utf8))
        if canonical.eight_bit and not utf8:
            try:
                canonical_7bit = canonicalize(flatten(message, utf8=False, eight_bit=False))
            except (LocalProtocolError, UnicodeError, LookupError):
                canonical_7bit = None  # not expressible in 7 bit: 554 5.6.3 if needed
        header_utf8 = utf8
    else:
        if sender is None or recipients is None:
            raise LocalProtocolError("raw messages need sender= and recipients=")
        canonical = canonicalize(message)
        header_utf8 = False
        message_id = raw_message_id(canonical.data)
    if not recipients:
        raise LocalProtocolError("no recipients")
    if dkim is not None:
        canonical = new_canonical(dkim.sign(canonical.data) + canonical.data, canonical.eight_bit)
        if canonical_7bit is not None:  # other bytes, so a signature of their own
            canonical_7bit = new_canonical(
                dkim.sign(canonical_7bit.data) + canonical_7bit.data, False
            )
    sender_path = format_path(sender, allow_null=True)
    needs_smtputf8 = header_utf8 or sender_path.needs_smtputf8
    addresses = []
    for recipient in recipients:
        path = format_path(recipient)
        addresses.append(path.address)
        needs_smtputf8 = needs_smtputf8 or path.needs_smtputf8
    return _new_prepared(
        sender_path.address,
        tuple(addresses),
        canonical,
        needs_smtputf8,
        message_id,
        canonical_7bit,
        tag,
    )


def _signed(dkim: Signer, canonical: Canonical) -> Canonical:
    """``canonical`` with its DKIM signature field in front (ASCII lines ending in CRLF,
    so the bytes stay canonical)."""
    return new_canonical(dkim.sign(canonical.data) + canonical.data, canonical.eight_bit)


def prepare_rendered(
    data: bytes,
    *,
    eight_bit: bool,
    sender: str,
    recipients: tuple[str, ...],
    needs_smtputf8: bool,
    message_id: str | None,
    tag: object = None,
) -> PreparedMessage:
    """Trust pre-rendered bytes: the one constructor that skips :func:`prepare`'s checks.

    The caller vouches that ``data`` is already canonical (CRLF line endings, a final
    CRLF, no NUL, no line over 998 octets: R16-R19), that ``eight_bit`` says whether it
    holds octets over 127, and that ``sender`` and ``recipients`` passed
    :func:`.paths.format_path` (R14) with ``needs_smtputf8`` their verdict (R32). The
    bulk mailer's renderer produces exactly that; anything else must call
    :func:`prepare`, which costs a scan of the content.
    """
    return _new_prepared(
        sender, recipients, new_canonical(data, eight_bit), needs_smtputf8, message_id, None, tag
    )


_new_prepared = fast_constructor(PreparedMessage)


def raw_message_id(data: bytes) -> str | None:
    """The Message-ID of raw canonical data, read from its header section only."""
    end = data.find(b"\r\n\r\n")
    head = (data[: end + 2] if end >= 0 else data).lower()  # ends in CRLF (canonical)
    if head.startswith(b"message-id:"):
        start = 0
    else:
        start = head.find(b"\r\nmessage-id:") + 2  # a field name starts a line
        if start == 1:
            return None
    value = data[start + 11 : head.find(b"\r\n", start)].strip()
    return value.decode("utf-8", "replace") or None
