"""Structured header fields: written verbatim, folded only where their grammar allows.

Theory of operation
-------------------
RFC 2047 §5 allows encoded words in unstructured text, comments and phrases only. A
``Message-ID`` (RFC 5322 §3.6.4), ``References``, ``In-Reply-To``, ``Content-ID``
(RFC 2045 §7), ``Return-Path`` and ``Received`` (RFC 5322 §3.6.7), the list fields of
RFC 2369 and RFC 2919 (``List-Unsubscribe`` and its RFC 8058 ``-Post`` companion among
them) and ``DKIM-Signature`` (RFC 6376 §3.5) have no such place: a receiver that finds
``=?utf-8?...?=`` there reads garbage, and one-click unsubscribe silently stops working.
The email package, and an encoder for unstructured text, encode any word longer than a
line, so these fields get their own writer.

:func:`fold_structured` writes the value as given. It folds (CRLF before existing
white space, RFC 5322 §2.2.3) and, in a list, after a comma outside ``<...>`` and quotes
(the CFWS that RFC 2369 §2 and RFC 5322 §3.6.4 allow between items), never inside a URL
or a msg-id. A line stays within 78 characters where a fold point allows it, and a
value whose unbreakable part would pass 998 octets (RFC 5322 §2.1.1) is refused with a
:class:`LocalProtocolError` naming the field: no server would take it whole.
"""

from __future__ import annotations

import re

from .errors import LocalProtocolError

__all__ = ["STRUCTURED_FIELDS", "fold_structured", "is_structured"]

#: Lower-cased names of the fields written verbatim (``list-*`` is matched by prefix).
STRUCTURED_FIELDS = frozenset(
    {"message-id", "in-reply-to", "references", "resent-message-id", "content-id",
     "return-path", "received", "dkim-signature", "arc-seal", "arc-message-signature",
     "arc-authentication-results", "authentication-results"}
)  # fmt: skip
# RFC 5322 §2.1.1: 998 octets plus CRLF (MUST), 78 characters (SHOULD).
_MAX_LINE = 998
_FOLD_AT = 78
_WSP = re.compile(r"[ \t\r\n]+")


def is_structured(name: str) -> bool:
    """Is ``name`` a field whose value is never encoded (see the module header)?"""
    key = name.lower()
    return key in STRUCTURED_FIELDS or key.startswith("list-")


def _tokens(value: str) -> list[tuple[str, str]]:
    """The value cut at its fold points, each part with what joined it to the previous
    one: white space (written as one SP), or nothing after a top-level comma."""
    tokens: list[tuple[str, str]] = []
    for word in _WSP.split(value.strip()):
        depth = 0
        quoted = False
        start = 0
        for i, c in enumerate(word):
            if c == '"':
                quoted = not quoted
            elif not quoted and c == "<":
                depth += 1
            elif not quoted and c == ">":
                depth = max(0, depth - 1)
            elif c == "," and not quoted and depth == 0 and i + 1 < len(word):
                tokens.append((word[start : i + 1], "" if start else " "))
                start = i + 1
        tokens.append((word[start:], "" if start else " "))
    return [t for t in tokens if t[0]]


def fold_structured(name: str, value: str) -> str:
    """``Name: value`` CRLF, the value verbatim, folded only at its fold points.

    Raises :class:`LocalProtocolError` if a part with no fold point in it would make a
    line longer than 998 octets.
    """
    out = [f"{name}:"]
    length = len(name) + 1
    for token, glue in _tokens(value):
        size = len(token.encode("utf-8"))
        if length + 1 + size > _FOLD_AT and length > len(name) + 1:
            out.append("\r\n")
            length = 0
            glue = " "
        elif length == len(name) + 1:
            glue = " "
        if length + len(glue) + size > _MAX_LINE:
            raise LocalProtocolError(
                f"header {name}: {token[:40]!r}... has no place to fold and would make a "
                f"line longer than {_MAX_LINE} octets"
            )
        out.append(glue)
        out.append(token)
        length += len(glue) + size
    out.append("\r\n")
    return "".join(out)
