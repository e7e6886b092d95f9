"""Lint: what a receiving mail system or a mail client would hold against a message.

Each check returns one :class:`Finding`; ``ok`` is True (fine), False (a problem the
list marks) or None (cannot tell, or only informative). The checks:

- ``unsubscribe``: ``List-Unsubscribe`` (RFC 2369) carries an ``https`` URI and
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` is present, which is what
  RFC 8058 §3.1 requires for one-click unsubscription (and what the large mailbox
  providers ask of bulk senders); a DKIM signature, if there is one, must cover both
  headers (§4). An unsigned message passes: the relay that sends it may sign it.
- ``encoded-word``: RFC 2047 §5 allows encoded words only in unstructured text
  (Subject, Comments, phrases); a structured header that carries one (Message-ID,
  References, In-Reply-To, List-*, Content-ID) is read literally by a conforming
  receiver, so the "decoded" value never existed.
- ``long-line``: RFC 5322 §2.1.1 limits lines to 998 octets before the CRLF.
- ``text-part``: an HTML message without a ``text/plain`` alternative is shown
  blank by text-only clients and scores as spam with some filters.
- ``dkim``: every DKIM-Signature (RFC 6376) verified with ``dkimpy`` against public
  keys from a folder instead of DNS (see :class:`KeyFolder`), or reported as
  unverifiable when no key for its selector and domain is there.
- ``size``: the message size, a problem above :data:`CLIP_SIZE` (Gmail shows only
  the start of larger messages, behind a "view entire message" link).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from .mail import Parsed

__all__ = ["CLIP_SIZE", "Finding", "KeyFolder", "lint"]

#: Size from which Gmail clips a message (documented in docs/web.md).
CLIP_SIZE = 102 * 1024
#: RFC 5322 §2.1.1: at most this many octets per line, CRLF excluded.
MAX_LINE = 998

_ONE_CLICK = "List-Unsubscribe=One-Click"
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_STRUCTURED = ("message-id", "references", "in-reply-to", "content-id")
_URI = re.compile(r"<([^>]*)>")
_COVERED = {"list-unsubscribe", "list-unsubscribe-post"}


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict: a short code, True/False/None, and a sentence."""

    code: str
    ok: bool | None
    text: str


class KeyFolder:
    """DKIM public keys from a folder, served to dkimpy in place of DNS TXT lookups.

    A key for selector ``s1`` of domain ``example.com`` is the file
    ``s1._domainkey.example.com.txt`` (the DNS name plus ``.txt``) holding either the
    TXT record (``v=DKIM1; k=rsa; p=MIIB...``) or the public key in PEM form.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.missing: list[str] = []

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        """The TXT record for ``name`` (the signature of dkimpy's ``dnsfunc``)."""
        domain = name.decode("ascii", "replace").rstrip(".").lower()
        path = self.folder / f"{domain}.txt"
        if "/" in domain or domain.startswith(".") or not path.is_file():
            self.missing.append(domain)
            return None
        text = path.read_text(encoding="ascii", errors="replace").strip()
        if text.startswith("-----BEGIN"):
            body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
            text = f"v=DKIM1; k=rsa; p={body}"
        return text.encode("ascii", "replace")


def lint(data: bytes, parsed: Parsed, keys: Path | None) -> list[Finding]:
    """Every check on one message; ``parsed`` is ``data`` parsed."""
    message = parsed.message
    return [
        _unsubscribe(message),
        _encoded_words(message),
        _long_lines(data),
        _text_part(parsed),
        _dkim(data, message, keys),
        _size(data),
    ]


def _unsubscribe(message: Message) -> Finding:
    raw = _raw(message, "list-unsubscribe")
    if not raw:
        return Finding("unsubscribe", False, "no List-Unsubscribe header (RFC 2369, RFC 8058)")
    uris = _URI.findall(" ".join(raw))
    if not uris:
        return Finding("unsubscribe", False, "List-Unsubscribe has no <URI> (RFC 2369 §2)")
    if not any(uri.lower().startswith("https://") for uri in uris):
        return Finding("unsubscribe", False, "List-Unsubscribe has no https URI (RFC 8058 §3.1)")
    post = [value.strip() for value in _raw(message, "list-unsubscribe-post")]
    if post != [_ONE_CLICK]:
        found = "missing" if not post else repr("; ".join(post))
        return Finding(
            "unsubscribe",
            False,
            f"List-Unsubscribe-Post must be {_ONE_CLICK!r} (RFC 8058 §3.1), is {found}",
        )
    signatures = _raw(message, "dkim-signature")
    if not signatures:
        return Finding(
            "unsubscribe", True, "one-click unsubscribe (RFC 8058); not DKIM-signed here"
        )
    if not any(_signed_headers(signature) >= _COVERED for signature in signatures):
        return Finding(
            "unsubscribe",
            False,
            "no DKIM signature covers List-Unsubscribe and List-Unsubscribe-Post (RFC 8058 §4)",
        )
    return Finding("unsubscribe", True, "one-click unsubscribe, DKIM-covered (RFC 8058)")


def _signed_headers(signature: str) -> set[str]:
    """The header names in a DKIM-Signature's ``h=`` tag (RFC 6376 §3.5), lower case."""
    for tag in signature.split(";"):
        name, _, value = tag.partition("=")
        if name.strip() == "h":
            return {field.strip().lower() for field in value.split(":")}
    return set()


def _encoded_words(message: Message) -> Finding:
    bad = sorted(
        {
            name
            for part in message.walk()
            for name, value in part.raw_items()
            if (name.lower() in _STRUCTURED or name.lower().startswith("list-"))
            and _ENCODED_WORD.search(value)
        }
    )
    if bad:
        return Finding(
            "encoded-word", False, f"encoded words in structured headers (RFC 2047 §5): {bad}"
        )
    return Finding("encoded-word", True, "no encoded words in structured headers")


def _long_lines(data: bytes) -> Finding:
    long = [n for n, line in enumerate(data.split(b"\n"), 1) if len(line.rstrip(b"\r")) > MAX_LINE]
    if long:
        return Finding(
            "long-line",
            False,
            f"{len(long)} line(s) over {MAX_LINE} octets (RFC 5322 §2.1.1), first: line {long[0]}",
        )
    return Finding("long-line", True, f"no line over {MAX_LINE} octets")


def _text_part(parsed: Parsed) -> Finding:
    if parsed.text is not None:
        return Finding("text-part", True, "has a text/plain part")
    if parsed.html is not None:
        return Finding("text-part", False, "HTML without a text/plain alternative")
    return Finding("text-part", False, "no text/plain part")


def _dkim(data: bytes, message: Message, keys: Path | None) -> Finding:
    count = len(message.get_all("DKIM-Signature") or [])
    if count == 0:
        return Finding("dkim", None, "not signed")
    if keys is None:
        return Finding("dkim", None, "signed; unverifiable (no --dkim-keys folder)")
    import dkim  # type: ignore[import-untyped]

    folder = KeyFolder(keys)
    verifier = dkim.DKIM(data)
    results = []
    for index in range(count):
        try:
            results.append(bool(verifier.verify(idx=index, dnsfunc=folder)))
        except dkim.DKIMException:
            results.append(False)
    if folder.missing:
        return Finding("dkim", None, f"unverifiable: no key file for {sorted(set(folder.missing))}")
    if all(results):
        return Finding("dkim", True, f"{count} signature(s) verified")
    return Finding("dkim", False, f"{results.count(False)} of {count} signature(s) do not verify")


def _size(data: bytes) -> Finding:
    size = len(data)
    if size > CLIP_SIZE:
        return Finding("size", False, f"{size:,} octets: Gmail clips messages over {CLIP_SIZE:,}")
    return Finding("size", None, f"{size:,} octets")


def _raw(message: Message, name: str) -> list[str]:
    return [value for key, value in message.raw_items() if key.lower() == name]
