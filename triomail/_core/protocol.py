"""Commands, paths, capabilities and DATA: the bytes the client writes (sans-IO).

Theory of operation
-------------------
Nothing reaches the wire without passing one of the functions here, so each rule lives
in one place:

* :func:`encode_command` refuses CR, LF, NUL, every other C0 control and DEL in every
  argument before producing a byte (R13: the CRLF-injection class of bpo-43124 and
  GHSA-v3q9-hj7j-63hq).
* :func:`format_path` checks RFC 5321 §4.1.2 path syntax and the §4.5.3.1 size limits
  (R14), converts IDN domains to A-labels when the local part is ASCII and reports when
  the path needs SMTPUTF8 (R32).
* :func:`canonicalize` turns any message (``str`` or ``bytes``) into canonical form:
  CR and LF only as CRLF pairs, a final CRLF (R16, the SMTP smuggling defence), no NUL
  (R17), no 8-bit octets unless allowed (R18), no line over 998 octets plus CRLF (R19).
  :func:`dot_stuff` then adds the DATA transparency dots (§4.5.2) and the terminator,
  so ``\\r\\n.\\r\\n`` can appear exactly once, at the end. BDAT (RFC 3030) takes the
  canonical bytes as they are (R20).
* :class:`Capabilities` is what one EHLO reply advertised. It is replaced, never
  merged, after STARTTLS (R7).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import LocalProtocolError
from .frozen import fast_constructor
from .reply import Reply

__all__ = [
    "Capabilities",
    "canonicalize",
    "dot_stuff",
    "encode_command",
    "format_path",
    "xtext",
]

_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN_BYTES = re.compile(rb"[\x00-\x1f\x7f]")

# RFC 5321 §4.5.3.1.1-3.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
# RFC 5321 §4.5.3.1.6: 1000 octets including CRLF.
MAX_DATA_LINE = 998


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


# ---------------------------------------------------------------------------- paths

# atext (RFC 5322 §3.2.3) plus UTF8-non-ascii (RFC 6532 §3.1), written as its complement:
# everything but controls, space, DEL and the 13 specials. Same set as listing the
# ranges up to U+10FFFF, but compiled in a fraction of the time (start-up).
_ATEXT_UTF8 = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_DOT_ATOM = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*\Z")
# qtextSMTP (RFC 5321 §4.1.2: %d32-33 / %d35-91 / %d93-126, plus UTF-8), likewise.
_QTEXT_UTF8 = r'[^\x00-\x1f"\\\x7f]'
_QUOTED = re.compile(rf'"(?:{_QTEXT_UTF8}|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]\Z")


@dataclass(frozen=True, slots=True)
class Path:
    """A checked envelope address: its wire form and whether it needs SMTPUTF8."""

    address: str
    needs_smtputf8: bool

    @property
    def wire(self) -> str:
        return f"<{self.address}>"


# Paths already checked: bulk mail names the same sender on every message. A Path is
# immutable; the table is emptied when full, so memory stays bounded.
_PATHS: dict[str, Path] = {}
_PATHS_SIZE = 4096


def format_path(address: str, *, allow_null: bool = False) -> Path:
    """Check an envelope address and return its wire form (R14, R32).

    ``allow_null`` permits the null reverse-path ``<>`` (MAIL FROM only, §4.5.5).
    """
    path = _PATHS.get(address)
    if path is None or not (path.address or allow_null):  # a kept <> is for senders only
        path = _format_path(address, allow_null)  # raises for a bad one: never kept
        if len(_PATHS) >= _PATHS_SIZE:
            _PATHS.clear()
        _PATHS[address] = path
    return path


def _format_path(address: str, allow_null: bool) -> Path:
    check_argument(address, "address")
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address == "":
        if allow_null:
            return Path("", False)
        raise LocalProtocolError("the null path <> is only allowed as the sender")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise LocalProtocolError(f"not a mailbox (local-part@domain): {address!r}")
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        raise LocalProtocolError(f"invalid local part in {address!r}")
    local_ascii = local.isascii()
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise LocalProtocolError(f"local part longer than {MAX_LOCAL_PART} octets: {address!r}")
    domain = _check_domain(domain, address, ascii_only=local_ascii)
    wire = f"{local}@{domain}"
    if len(wire.encode("utf-8")) + 2 > MAX_PATH:
        raise LocalProtocolError(f"path longer than {MAX_PATH} octets: {address!r}")
    return Path(wire, not wire.isascii())


# UTS #46 deviation characters: IDNA 2003 (Python's "idna" codec) maps them away
# (straße -> strasse), IDNA 2008 keeps them, so the A-label would name another domain.
_IDNA_DEVIATIONS = re.compile("[\u00df\u03c2\u200c\u200d]")


def idna_domain(domain: str, address: str, *, strict: bool = True) -> str:
    """The A-label form of a non-ASCII domain; raises :class:`LocalProtocolError`.

    ``strict`` refuses the IDNA deviation characters, which the A-label would map to
    another domain; pass ``False`` only to check a domain that travels as U-labels.
    """
    if strict and _IDNA_DEVIATIONS.search(domain):
        raise LocalProtocolError(
            f"domain in {address!r} has a character IDNA 2003 and 2008 map differently"
        )
    if any(label.startswith("-") or label.endswith("-") for label in domain.split(".")):
        raise LocalProtocolError(f"invalid domain in {address!r}")  # RFC 5891 §4.2.3.1
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise LocalProtocolError(f"invalid domain in {address!r}: {exc}") from None


def _check_domain(domain: str, address: str, *, ascii_only: bool) -> str:
    """Check a domain (R14) and return its wire form: A-labels if ``ascii_only`` (R32)."""
    if _ADDRESS_LITERAL.match(domain):
        return domain
    wire = domain
    if not domain.isascii():
        domain = idna_domain(domain, address, strict=ascii_only)
        if ascii_only:
            # R32: an ASCII local part travels without SMTPUTF8, the domain as A-labels.
            wire = domain
        # Otherwise the U-labels go on the wire (SMTPUTF8), but the A-label form is still
        # checked below, so a UTF-8 local part never switches the domain checks off.
    if len(domain) > MAX_DOMAIN or len(wire.encode("utf-8")) > MAX_DOMAIN:
        raise LocalProtocolError(f"domain longer than {MAX_DOMAIN} octets: {address!r}")
    if not all(_LABEL.match(label) for label in domain.split(".")):
        raise LocalProtocolError(f"invalid domain in {address!r}")
    return wire


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


# ---------------------------------------------------------------------- capabilities


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The service extensions one EHLO reply advertised (RFC 5321 §4.1.1.1)."""

    extensions: dict[str, str] = field(default_factory=dict)
    auth_mechanisms: frozenset[str] = frozenset()
    esmtp: bool = True

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        """Parse an EHLO reply; the first line is the server's greeting name."""
        extensions: dict[str, str] = {}
        mechanisms: set[str] = set()
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            keyword = keyword.upper()
            if keyword.startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                mechanisms.update(m.upper() for m in keyword[5:].split() + params.split())
                extensions.setdefault("AUTH", "")
                continue
            if not keyword:
                continue
            extensions[keyword] = params.strip()
            if keyword == "AUTH":
                mechanisms.update(m.upper() for m in params.split())
        return cls(extensions, frozenset(mechanisms))

    @classmethod
    def helo_only(cls) -> Capabilities:
        """No ESMTP: the server refused EHLO and took HELO (R4)."""
        return cls(esmtp=False)

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE limit, or ``None`` for no limit (RFC 1870: absent or 0)."""
        if "SIZE" not in self.extensions:
            return None
        value = self.extensions["SIZE"]
        # RFC 1870: size-param = 1*20DIGIT; anything else (such as "-5") is no limit.
        if not (value.isascii() and value.isdigit()):
            return None
        return int(value) or None

    @property
    def rcpt_max(self) -> int | None:
        """RFC 9422 ``LIMITS RCPTMAX=``, if advertised."""
        for item in self.extensions.get("LIMITS", "").split():
            name, _, value = item.partition("=")
            if name.upper() == "RCPTMAX" and value.isdigit() and int(value) > 0:
                return int(value)
        return None

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.extensions

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.extensions

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.extensions

    @property
    def dsn(self) -> bool:
        return "DSN" in self.extensions

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.extensions

    @property
    def binarymime(self) -> bool:
        return "BINARYMIME" in self.extensions

    @property
    def enhancedstatuscodes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.extensions

    @property
    def requiretls(self) -> bool:
        return "REQUIRETLS" in self.extensions


# ------------------------------------------------------------------------------ DATA

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
#: Up to this size, ``canonicalize`` splits the message at CRLF (fewer instructions).
_SPLIT_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Canonical:
    """A message in canonical form: CRLF line endings, ending in CRLF unless empty (R16)."""

    data: bytes
    eight_bit: bool

    def __len__(self) -> int:
        return len(self.data)


def canonicalize(message: str | bytes | bytearray | memoryview) -> Canonical:
    """Return the message with every line ending as CRLF and a final CRLF (R16-R19).

    Raises :class:`LocalProtocolError` for NUL (R17) or a line over 998 octets (R19). A
    ``str`` is encoded as UTF-8. Whether 8-bit octets may be sent depends on the server,
    so :attr:`Canonical.eight_bit` reports them for the caller to check (R18).
    """
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    # A bare CR or LF becomes CRLF (aiosmtplib and qmail do the same), and the last line
    # is terminated. An empty message stays empty: its wire form is just ".\r\n", whose
    # CRLF is the one ending the DATA command (RFC 5321 §4.1.1.4).
    if len(data) <= _SPLIT_LIMIT:
        # Without its CRLFs a canonical message has no CR or LF left, and its last piece
        # is empty: a split, a join and two memchr cost less than counting CR, LF and
        # CRLF (the pieces are short-lived; larger messages are counted instead).
        pieces = data.split(b"\r\n")
        rest = b"".join(pieces)
        canonical = not pieces[-1] and b"\r" not in rest and b"\n" not in rest
    else:
        crlf = data.count(b"\r\n")
        canonical = data.endswith(b"\r\n") and data.count(b"\r") == crlf == data.count(b"\n")
    if not canonical:
        data = _LINE_ENDING.sub(b"\r\n", data)
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
    if b"\x00" in data:
        raise LocalProtocolError("message contains a NUL octet (RFC 5322 text excludes it)")
    if _has_long_line(data):
        raise LocalProtocolError(
            f"message has a line longer than {MAX_DATA_LINE} octets; re-encode it "
            "(quoted-printable or base64) instead of sending it split"
        )
    return _new_canonical(data, not data.isascii())


_new_canonical = fast_constructor(Canonical)


def _has_long_line(data: bytes) -> bool:
    """Whether CRLF-terminated ``data`` has a line over :data:`MAX_DATA_LINE` octets.

    A line fits if its LF comes within ``MAX_DATA_LINE + 2`` octets of its start (text,
    CR, LF). So the last LF in that window is looked for: none means the line there is
    too long; otherwise every line up to it fits, and the next window starts after it.
    About one ``rfind`` per kilobyte, and no split into lines.
    """
    window = MAX_DATA_LINE + 2
    start = 0
    size = len(data)
    while size - start > window:  # the rest is one window at most: its lines fit
        last = data.rfind(b"\n", start, start + window)
        if last < 0:
            return True
        start = last + 1
    return False


def dot_stuff(canonical: Canonical) -> bytes:
    """Add RFC 5321 §4.5.2 transparency dots and the ``.\\r\\n`` terminator."""
    data = canonical.data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def unstuff(wire: bytes) -> bytes:
    """The receiver's inverse of :func:`dot_stuff` (for tests and the sink)."""
    if not wire.endswith(b".\r\n"):
        raise ValueError("no end-of-data marker")
    body = wire[:-3]
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def iter_lines(data: bytes) -> Iterable[bytes]:
    """The lines of canonical data, without their CRLF."""
    return data.split(b"\r\n")[:-1]
