"""Sans-IO grammar for the capture server: command lines, paths, parameters, AUTH
responses, content checks, replies.

No I/O and no connection state here. Every check returns a :class:`Verdict` (a reply the server
should give) or the parsed value, so the state machine in
:mod:`triomail._sink.commands` only decides what happens next.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "TOO_BIG",
    "Verdict",
    "check_content",
    "decode_sasl",
    "find_unstuffed_dot",
    "format_reply",
    "judge_message",
    "parse_command_line",
    "parse_esmtp_params",
    "parse_mail_arguments",
    "parse_path_argument",
    "split_plain",
    "unstuff",
]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reply: code, enhanced status code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str


def format_reply(code: int, enhanced: str | None, text: str) -> bytes:
    """Render a reply, multi-line when ``text`` has newlines (RFC 5321 §4.2.1)."""
    lines = text.split("\n")
    prefix = f"{enhanced} " if enhanced else ""
    out = [f"{code}-{prefix}{line}\r\n" for line in lines[:-1]]
    out.append(f"{code} {prefix}{lines[-1]}\r\n")
    return "".join(out).encode("utf-8")


# --- command lines (RFC 5321 §2.3.8, §4.1.1) --------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_command_line(line: bytes | None) -> tuple[str, str] | Verdict:
    """Split a command line (CRLF included; None if it was too long) into verb and argument.

    The verb comes back upper-cased; the argument as sent, after one space.
    """
    if line is None:
        return Verdict(500, "5.5.6", "Error: line too long")
    if not line.endswith(b"\r\n"):
        # RFC 5321 §2.3.8; Postfix smtpd_forbid_bare_newline does the same.
        return Verdict(500, "5.5.2", "Error: bare <LF> received")
    body = line[:-2]
    if b"\r" in body:
        return Verdict(500, "5.5.2", "Error: bare <CR> received")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return Verdict(500, "5.5.2", "Error: invalid UTF-8 in command")
    if _CONTROL.search(text):
        return Verdict(500, "5.5.2", "Error: control character in command")
    verb, _, arg = text.partition(" ")
    return verb.upper(), arg


# --- AUTH responses (RFC 4954 §4, RFC 4616) ----------------------------------------


def decode_sasl(text: str | bytes) -> bytes | None:
    """Decode a base64 SASL response (``=`` is the empty one); None if malformed."""
    if text in ("=", b"="):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def split_plain(response: bytes) -> tuple[str, str, str] | None:
    """Split a PLAIN response, ``[authzid] NUL authcid NUL passwd`` in UTF-8 (RFC 4616).

    Returns (authzid, user, password), or None if malformed.
    """
    parts = response.split(b"\0")
    if len(parts) != 3:
        return None
    try:
        authzid, user, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return None
    return authzid, user, password


# --- paths (RFC 5321 §4.1.2; UTF-8 per RFC 6531 §3.3) ----------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_QTEXT = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_UQTEXT = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_UCHAR = r"A-Za-z0-9\u0080-\U0010ffff"
_ULABEL = rf"[{_UCHAR}](?:[{_UCHAR}-]*[{_UCHAR}])?"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"


def _mailbox_re(atext: str, qtext: str, label: str) -> re.Pattern[str]:
    local = rf"(?:{atext}+(?:\.{atext}+)*|{qtext})"
    domain = rf"(?:{label}(?:\.{label})*|{_ADDRESS_LITERAL})"
    # An optional source route (RFC 5321 §4.1.2 A-d-l), which §C says to accept and ignore.
    route = rf"(?:@{domain}(?:,@{domain})*:)?"
    return re.compile(rf"{route}(?P<mailbox>(?P<local>{local})@(?P<domain>{domain}))")


_MAILBOX_ASCII = _mailbox_re(_ATEXT, _QTEXT, _LABEL)
_MAILBOX_UTF8 = _mailbox_re(_UATEXT, _UQTEXT, _ULABEL)


def parse_path_argument(arg: str, keyword: str, *, utf8: bool) -> tuple[str, str] | Verdict:
    """Split ``FROM:<path> params`` (or ``TO:``); return (address, params) or a Verdict.

    ``keyword`` is ``"FROM"`` or ``"TO"``. ``<>`` is only valid for FROM and
    ``<postmaster>`` only for TO (RFC 5321 §4.1.1.2, §4.1.1.3, §4.5.1). The path
    must follow the colon with no space (RFC 5321 §4.1.2), and a non-ASCII path
    needs ``SMTPUTF8`` on MAIL (RFC 6531 §3.4, reply 553 5.6.7).
    """
    bad_syntax = (
        Verdict(501, "5.1.7", "Error: bad sender address syntax")
        if keyword == "FROM"
        else Verdict(501, "5.1.3", "Error: bad recipient address syntax")
    )
    head = keyword + ":"
    if arg[: len(head)].upper() != head:
        verb = "MAIL FROM" if keyword == "FROM" else "RCPT TO"
        return Verdict(501, "5.5.4", f"Syntax: {verb}:<address>")
    rest = arg[len(head) :]
    if not rest.startswith("<"):
        return bad_syntax
    end = rest.find(">")
    if end < 0:
        return bad_syntax
    path, params = rest[1:end], rest[end + 1 :]
    if params and not params.startswith(" "):
        return bad_syntax
    # §4.5.3.1.3: a path is at most 256 octets, punctuation included.
    if len(path.encode("utf-8")) + 2 > 256:
        return bad_syntax
    if not path.isascii() and not utf8:
        return Verdict(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
    if path == "":
        return ("", params.lstrip(" ")) if keyword == "FROM" else bad_syntax
    if keyword == "TO" and path.lower() == "postmaster":
        return (path, params.lstrip(" "))
    match = (_MAILBOX_UTF8 if utf8 else _MAILBOX_ASCII).fullmatch(path)
    if match is None:
        return bad_syntax
    # §4.5.3.1.1 and §4.5.3.1.2: local part at most 64 octets, domain at most 255.
    if len(match["local"].encode("utf-8")) > 64 or len(match["domain"].encode("utf-8")) > 255:
        return bad_syntax
    return (match["mailbox"], params.lstrip(" "))


# --- ESMTP parameters (RFC 5321 §4.1.2 Mail-parameters, RFC 1869) ------------------

_PARAM = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?")
# xtext (RFC 3461 §4): printable ASCII except "+" and "=", or "+" and two upper hex digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_NOTIFY = re.compile(r"NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*", re.I)


def parse_esmtp_params(
    text: str, command: str, extensions: Collection[str], *, max_size: int
) -> tuple[list[str], dict[str, str | None]] | Verdict:
    """Parse and validate MAIL or RCPT parameters against the advertised extensions.

    Returns the raw parameter strings and a dict of upper-cased keyword to value.
    Unknown parameters, or ones whose extension was not advertised, get 555
    (RFC 5321 §4.1.1.11); malformed values 501.
    """
    raw: list[str] = []
    params: dict[str, str | None] = {}
    if not text:
        return raw, params
    for token in text.split(" "):
        match = _PARAM.fullmatch(token)
        if match is None:
            return Verdict(501, "5.5.4", f"Error: bad parameter syntax: {token[:40]}")
        key, value = match["key"].upper(), match["value"]
        if key in params:
            return Verdict(501, "5.5.4", f"Error: duplicate parameter {key}")
        problem = _check_param(command, key, value, extensions, max_size)
        if problem is not None:
            return problem
        raw.append(token)
        params[key] = value
    return raw, params


def _check_param(
    command: str, key: str, value: str | None, extensions: Collection[str], max_size: int
) -> Verdict | None:
    unsupported = Verdict(555, "5.5.4", f"Error: unsupported parameter {key}")
    bad = Verdict(501, "5.5.4", f"Error: bad value for {key}")
    if command == "MAIL":
        if key == "SIZE" and "SIZE" in extensions:  # RFC 1870 §6
            if value is None or not value.isdigit() or len(value) > 20:
                return bad
            if int(value) > max_size:
                return Verdict(552, "5.3.4", "Error: message size exceeds fixed limit")
            return None
        if key == "BODY" and "8BITMIME" in extensions:  # RFC 6152 §2
            return None if value is not None and value.upper() in ("7BIT", "8BITMIME") else bad
        if key == "SMTPUTF8" and "SMTPUTF8" in extensions:  # RFC 6531 §3.4
            return None if value is None else bad
        if key == "RET" and "DSN" in extensions:  # RFC 3461 §4.3
            return None if value is not None and value.upper() in ("FULL", "HDRS") else bad
        if key == "ENVID" and "DSN" in extensions:  # RFC 3461 §4.4
            ok = value is not None and len(value) <= 100 and _XTEXT.fullmatch(value)
            return None if ok else bad
        if key == "AUTH" and "AUTH" in extensions:  # RFC 4954 §5
            return None if value is not None and _XTEXT.fullmatch(value) else bad
        return unsupported
    if key == "NOTIFY" and "DSN" in extensions:  # RFC 3461 §4.1
        return None if value is not None and _NOTIFY.fullmatch(value) else bad
    if key == "ORCPT" and "DSN" in extensions:  # RFC 3461 §4.2: addr-type ";" xtext
        if value is None:
            return bad
        addr_type, semi, addr = value.partition(";")
        ok_type = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type) is not None
        return None if semi and ok_type and _XTEXT.fullmatch(addr) else bad
    return unsupported


def parse_mail_arguments(
    arg: str,
    command: Literal["MAIL", "RCPT"],
    extensions: Collection[str],
    *,
    utf8: bool,
    max_size: int,
) -> tuple[str, list[str], dict[str, str | None]] | Verdict:
    """Parse ``FROM:<path> params`` (MAIL) or ``TO:<path> params`` (RCPT).

    Returns the address, the raw parameters and the parameters by keyword (see
    :func:`parse_path_argument` and :func:`parse_esmtp_params`), or a Verdict.
    """
    path = parse_path_argument(arg, "FROM" if command == "MAIL" else "TO", utf8=utf8)
    if isinstance(path, Verdict):
        return path
    address, text = path
    params = parse_esmtp_params(text, command, extensions, max_size=max_size)
    if isinstance(params, Verdict):
        return params
    return address, *params


# --- message content ---------------------------------------------------------------

# A CR not followed by LF, or an LF not preceded by CR (RFC 5321 §2.3.8).
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def unstuff(wire: bytes) -> bytes:
    """Remove dot-stuffing (RFC 5321 §4.5.2) from DATA content.

    ``wire`` must start at the beginning of a line; the first character of every
    line that starts with "." is deleted, as the RFC tells the server to do.
    """
    return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:]


def find_unstuffed_dot(wire: bytes) -> bool:
    """Whether a line starts with a single "." (a client that forgot to dot-stuff)."""
    return re.search(rb"(?:^|\r\n)\.(?!\.)", wire) is not None


def check_content(
    data: bytes, *, eight_bit_ok: bool, strict: bool, max_line: int = 1000
) -> Verdict | None:
    """Check message content; return a rejection or None.

    Always: bare CR or LF is rejected with 550 5.5.2, as Postfix
    ``smtpd_forbid_bare_newline`` does (SMTP smuggling, CVE-2023-51764). With
    ``strict``: NUL (RFC 5322 §3.5 "text"), lines over ``max_line`` octets
    including CRLF (RFC 5321 §4.5.3.1.6), and 8-bit octets without BODY=8BITMIME or
    SMTPUTF8 (RFC 6152 §3).
    """
    bare = _BARE_NEWLINE.search(data)
    if bare is not None:
        which = "<CR>" if data[bare.start()] == 0x0D else "<LF>"
        return Verdict(550, "5.5.2", f"Error: bare {which} received")
    if not strict:
        return None
    if b"\0" in data:
        return Verdict(550, "5.6.0", "Error: NUL character in message data")
    if _long_line(data, max_line):
        return Verdict(500, "5.5.6", f"Error: message line longer than {max_line} octets")
    if not eight_bit_ok and not data.isascii():
        return Verdict(550, "5.6.0", "Error: 8-bit data without BODY=8BITMIME or SMTPUTF8")
    return None


#: The refusal of a message over the size limit (RFC 1870 §6).
TOO_BIG = Verdict(552, "5.3.4", "Error: message file too big")


def judge_message(
    wire: bytes,
    transfer: Literal["DATA", "BDAT"],
    *,
    oversize: bool,
    max_size: int,
    eight_bit_ok: bool,
    strict: bool,
) -> tuple[bytes, Verdict | None]:
    """Return a complete message as received and the refusal it earns, if any.

    ``wire`` is DATA text up to the final ``<CRLF>.<CRLF>`` (its dot-stuffing is
    removed here) or the concatenated BDAT chunks; ``oversize`` says that DATA text
    over the limit was counted but not kept. With ``strict``, DATA text must also
    be dot-stuffed correctly.
    """
    data = unstuff(wire) if transfer == "DATA" else wire
    if oversize or len(data) > max_size:
        return data, TOO_BIG
    verdict = check_content(data, eight_bit_ok=eight_bit_ok, strict=strict)
    if verdict is None and strict and transfer == "DATA" and find_unstuffed_dot(wire):
        verdict = Verdict(550, "5.5.2", 'Error: line starts with an unstuffed "."')
    return data, verdict


_LONG_LINE_CACHE: dict[int, re.Pattern[bytes]] = {}


def _long_line(data: bytes, max_line: int) -> bool:
    pattern = _LONG_LINE_CACHE.get(max_line)
    if pattern is None:
        # max_line counts the CRLF, so the text of a line may be max_line - 2 octets.
        pattern = _LONG_LINE_CACHE[max_line] = re.compile(rb"[^\r\n]{%d}" % (max_line - 1))
    return pattern.search(data) is not None
