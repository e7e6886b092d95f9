"""Command lines: the only way a command reaches the wire (sans-IO).

Theory of operation
-------------------
:func:`encode_command` refuses CR, LF, NUL, every other C0 control and DEL in every
argument before producing a byte (R13: the CRLF-injection class of bpo-43124 and
GHSA-v3q9-hj7j-63hq). :func:`xtext` and :func:`utf8_addr_xtext` encode DSN parameter
values (RFC 3461 §4, RFC 6533 §3) so that they are safe on a command line too.
"""

from __future__ import annotations

import re

from .errors import LocalProtocolError

__all__ = ["check_argument", "encode_command", "utf8_addr_xtext", "xtext"]

_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN_BYTES = re.compile(rb"[\x00-\x1f\x7f]")


def check_argument(value: str | bytes, what: str) -> None:
    """Raise :class:`LocalProtocolError` if ``value`` holds a control character (R13)."""
    bad = _FORBIDDEN.search(value) if isinstance(value, str) else _FORBIDDEN_BYTES.search(value)
    if bad is not None:
        raise LocalProtocolError(
            f"{what} contains a forbidden control character {bad.group()!r}: {value!r}"
        )


def encode_command(verb: str, *args: str) -> bytes:
    """Encode one command line; an argument with a control character is refused (R13).

    Arguments are UTF-8 encoded: they are ASCII except SMTPUTF8 paths (RFC 6531 §3.3).
    """
    line = " ".join((verb, *args))
    # Control characters are not printable: the (slower) search runs only for a line
    # that also has some other unprintable character, such as U+00A0.
    if not line.isprintable() and _FORBIDDEN.search(line) is not None:
        for arg in args:
            check_argument(arg, verb)  # names the argument
        check_argument(line, "command")
    return (line + "\r\n").encode("utf-8")


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: ``+XX`` for ``+``, ``=`` and octets outside 33-126 (R33)."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def utf8_addr_xtext(value: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: ``\\x{HEX}`` for non-ASCII, ``+``, ``=``, ``\\``
    and characters outside 33-126 (R33)."""
    return "".join(
        ch if 0x21 <= ord(ch) <= 0x7E and ch not in "+=\\" else f"\\x{{{ord(ch):X}}}"
        for ch in value
    )
