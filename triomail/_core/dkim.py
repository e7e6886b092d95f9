"""DKIM signatures for outgoing mail (RFC 6376, RFC 8463), computed without I/O.

Theory of operation
-------------------
A signer turns the canonical bytes of one message (CRLF line endings, the form
``PreparedMessage`` holds, before DATA dot-stuffing) into ``DKIM-Signature`` header
fields to put in front of it. It signs with ``c=relaxed/relaxed`` (RFC 6376 §3.4.2 and
§3.4.4), which survives the re-folding and whitespace changes relays make:

1. The body is canonicalised (runs of WSP become one SP, WSP at line ends and empty
   lines at the end go) and hashed with SHA-256 into ``bh=`` (§3.7).
2. The header fields named in ``h=`` are picked bottom-up, one instance per listing
   (§5.4.2), and canonicalised (names lower-cased, values unfolded, WSP runs collapsed).
   A name listed once more than it occurs signs a "null" instance, so a second ``From``
   added later breaks the signature (over-signing, §8.15).
3. The ``DKIM-Signature`` field itself, with an empty ``b=``, is canonicalised the same
   way and appended without its CRLF (§3.7). It is folded before it is hashed (each fold
   is one SP in the relaxed form), so the hash covers exactly what the receiver unfolds;
   only the ``b=`` value is added after, and receivers delete that value, folding
   included, before they verify (§3.5).
4. The header hash input is signed: RSASSA-PKCS1-v1_5 with SHA-256 (``rsa-sha256``;
   RFC 8301: at least 1024-bit keys, no SHA-1) or Ed25519 over its SHA-256 digest
   (``ed25519-sha256``, RFC 8463 §3).

The default ``h=`` set covers what receivers judge a bulk message by, including both
RFC 8058 one-click fields: a one-click ``List-Unsubscribe-Post`` is honoured only when
DKIM covers it (RFC 8058 §4). Each name is listed as often as it occurs; names in
``oversign`` (``From`` by default) once more.

Several signatures on one message (RSA for every receiver, Ed25519 for those that check
it) share one parse and one body hash: see :class:`DKIMMultiSigner`. The field is folded
at 78 characters where the grammar allows FWS (between tags, after a colon in ``h=``,
inside ``b=``); no line can exceed 998 (RFC 5322 §2.1.1).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from .idna2008 import ascii_domain

__all__ = [
    "DEFAULT_HEADERS",
    "DKIMMultiSigner",
    "DKIMSigner",
    "SplitMessage",
    "load_private_key",
]

#: The header fields signed when present, in ``h=`` order.
DEFAULT_HEADERS = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
    "Reply-To",
)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
KeySource = bytes | str | os.PathLike[str] | PrivateKey

_MIN_RSA_BITS = 1024  # RFC 8301 §3.2
_FOLD_AT = 78  # RFC 5322 §2.1.1: "SHOULD" limit; 998 is the "MUST"
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,200}\Z")  # RFC 5322 §3.6.8 ftext
_WSP_RUN = re.compile(rb"[ \t]+")
_CRLF = b"\r\n"


def load_private_key(source: KeySource, passphrase: bytes | None = None) -> PrivateKey:
    """An RSA or Ed25519 private key from PEM bytes (or text), a file path, or a key object.

    The passphrase is bytes, to be read from a file or the environment by the caller,
    never from a command line (where ``ps`` shows it).
    """
    key: object = source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        key = serialization.load_pem_private_key(source.encode("ascii"), password=passphrase)
    elif isinstance(source, bytes):
        key = serialization.load_pem_private_key(source, password=passphrase)
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as file:
            key = serialization.load_pem_private_key(file.read(), password=passphrase)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits: DKIM needs >= {_MIN_RSA_BITS}")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError(f"DKIM signs with RSA or Ed25519 keys, not {type(key).__name__}")


def _relaxed_header(field: bytes) -> bytes:
    """RFC 6376 §3.4.2: ``name:value`` CRLF, unfolded, WSP runs as one SP, trimmed."""
    name, _, value = field.partition(b":")
    # Memchr-speed scans spare most fields the regex, the costliest step after the key's.
    if b"\r" in value:
        value = value.replace(_CRLF, b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.rstrip(b" \t").lower() + b":" + value.strip(b" ") + _CRLF


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 on CRLF text: WSP runs as one SP, none at line ends, no empty tail."""
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    if b" \r\n" in body:
        body = body.replace(b" \r\n", _CRLF)
    body = body.rstrip(_CRLF)
    if body.endswith(b" "):  # a last line without CRLF (not canonical, but possible)
        body = body[:-1]
    return body + _CRLF if body else b""  # an empty body hashes as empty (erratum 3192)


class SplitMessage:
    """One message split into header fields and body, shared by the signatures over it."""

    __slots__ = ("_body", "_body_hash", "fields")

    def __init__(self, data: bytes) -> None:
        if data.startswith(_CRLF):  # no header section at all
            head, self._body = b"", data[2:]
        else:
            end = data.find(b"\r\n\r\n")
            head, self._body = (data, b"") if end < 0 else (data[: end + 2], data[end + 4 :])
        #: Lower-cased field name -> the raw fields (folding kept, no final CRLF), in order.
        self.fields: dict[bytes, list[bytes]] = {}
        raw: list[bytes] = []
        for line in head.split(_CRLF):
            if line[:1] in (b" ", b"\t") and raw:
                raw[-1] += _CRLF + line
            elif line:
                raw.append(line)
        for field in raw:
            name = field.partition(b":")[0].rstrip(b" \t").lower()
            self.fields.setdefault(name, []).append(field)
        self._body_hash: str | None = None

    def body_hash(self) -> str:
        """``bh=``: the base64 SHA-256 of the relaxed body, computed once."""
        if self._body_hash is None:
            digest = hashlib.sha256(_relaxed_body(self._body)).digest()
            self._body_hash = base64.b64encode(digest).decode("ascii")
        return self._body_hash


class DKIMSigner:
    """Signs messages for ``domain`` with the key published at ``selector._domainkey.domain``.

    ``private_key`` is PEM bytes, a path, or a ``cryptography`` RSA/Ed25519 key; see
    :func:`load_private_key`. ``expires_in`` (seconds) adds ``x=``; ``timestamp`` adds
    ``t=`` (§3.5). :meth:`sign` returns the header field to prepend.
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key: KeySource,
        *,
        passphrase: bytes | None = None,
        headers: Iterable[str] = DEFAULT_HEADERS,
        oversign: Iterable[str] = ("From",),
        timestamp: bool = True,
        expires_in: int | None = None,
    ) -> None:
        self._key = load_private_key(private_key, passphrase)  # private: kept out of vars()
        self.domain = ascii_domain(domain.rstrip("."))
        self.selector = ascii_domain(selector)
        self.algorithm = (
            "rsa-sha256" if isinstance(self._key, rsa.RSAPrivateKey) else "ed25519-sha256"
        )
        # One entry per name, whatever its case: a name listed twice would sign its
        # instances twice, while a verifier gives the second listing nothing (§5.4.2).
        unique: dict[str, str] = {}
        for name in headers:
            unique.setdefault(name.lower(), name)
        self.headers = tuple(unique.values())
        for name in self.headers:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"not a header field name: {name!r}")
        if expires_in is not None and expires_in <= 0:
            raise ValueError("expires_in must be a positive number of seconds")
        oversigned = {name.lower() for name in oversign}
        self._lookup = [
            (name, name.lower().encode("ascii"), name.lower() in oversigned)
            for name in self.headers
        ]
        self._timestamp = timestamp
        self._expires_in = expires_in
        # The tags every signature shares, folded once.
        fixed = ["v=1", f"a={self.algorithm}", "c=relaxed/relaxed", f"d={self.domain}"]
        self._head = _fold(["DKIM-Signature:"], [*fixed, f"s={self.selector}"])

    @property
    def public_key(self) -> str:
        """The ``p=`` value to publish: base64 SubjectPublicKeyInfo (RSA) or raw key (Ed25519)."""
        public = self._key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    @property
    def dns_name(self) -> str:
        """Where the key record lives: ``<selector>._domainkey.<domain>`` (§3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        """The TXT record to publish at :attr:`dns_name` (§3.6.1)."""
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={self.public_key}"

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The ``DKIM-Signature: ...`` field (CRLF-terminated) for canonical ``message``."""
        return self.sign_split(SplitMessage(message), now=now)

    def sign_split(self, message: SplitMessage, *, now: float | None = None) -> bytes:
        """:meth:`sign` for a message already split (several signatures, one parse)."""
        names: list[str] = []
        signed: list[bytes] = []
        for name, lower, oversigned in self._lookup:
            instances = message.fields.get(lower, ())
            names.extend([name] * (len(instances) + oversigned))
            # Bottom-up: the first listing takes the last instance (§5.4.2).
            for field in reversed(instances):
                signed.append(_relaxed_header(field))
        tags = []
        if self._timestamp or self._expires_in is not None:
            stamp = int(time.time() if now is None else now)
            if self._timestamp:
                tags.append(f"t={stamp}")
            if self._expires_in is not None:
                tags.append(f"x={stamp + self._expires_in}")
        tags.append("h=" + ":".join(names))
        tags.append(f"bh={message.body_hash()}")
        lines = _fold(self._head.copy(), tags)
        _append(lines, "b=", " ")
        signed.append(_relaxed_signature_field(lines))
        data = b"".join(signed)
        if isinstance(self._key, rsa.RSAPrivateKey):
            signature = self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            signature = self._key.sign(hashlib.sha256(data).digest())
        _fold_b(lines, base64.b64encode(signature).decode("ascii"))
        return ("\r\n".join(lines) + "\r\n").encode("ascii")

    def __repr__(self) -> str:
        return f"DKIMSigner({self.domain!r}, {self.selector!r}, {self.algorithm})"


class DKIMMultiSigner:
    """Several signatures per message, e.g. RSA and Ed25519 (RFC 8463 §4 suggests both).

    The fields come out in the order of ``signers``; the message is parsed and its body
    hashed once for all of them.
    """

    def __init__(self, *signers: DKIMSigner) -> None:
        if not signers:
            raise ValueError("DKIMMultiSigner needs at least one signer")
        self.signers = signers

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The ``DKIM-Signature`` fields, each CRLF-terminated, to prepend to ``message``."""
        split = SplitMessage(message)
        return b"".join(signer.sign_split(split, now=now) for signer in self.signers)


def _fold(lines: list[str], tags: list[str]) -> list[str]:
    """Append ``tags`` to the field's ``lines``, folding at FWS to stay within 78 columns."""
    for tag in tags:
        tag += ";"
        if len(tag) < _FOLD_AT or not tag.startswith("h="):
            _append(lines, tag, " ")  # only the gap between tags folds
            continue
        # A long h= folds after its colons, where FWS is allowed (§3.5, sig-h-tag).
        parts = tag.split(":")
        _append(lines, parts[0] + ":", " ")
        for part in parts[1:-1]:
            _append(lines, part + ":", "")
        _append(lines, parts[-1], "")
    return lines


def _append(lines: list[str], atom: str, gap: str) -> None:
    if len(lines[-1]) + len(gap) + len(atom) <= _FOLD_AT:
        lines[-1] += gap + atom
    else:
        lines.append("\t" + atom)  # the fold (CRLF + TAB) stands in for the gap


def _relaxed_signature_field(lines: list[str]) -> bytes:
    """:func:`_relaxed_header` of the folded field up to ``b=``, without its CRLF.

    Each fold is CRLF TAB and no line ends in WSP, so relaxed canonicalisation turns each
    fold into one SP and changes nothing else but the name's case: no regex needed.
    """
    text = " ".join([lines[0], *(line[1:] for line in lines[1:])])
    return b"dkim-signature:" + text[len("DKIM-Signature: ") :].encode("ascii")


def _fold_b(lines: list[str], value: str) -> None:
    """Append the ``b=`` value after the trailing ``b=``, continuing on folded lines."""
    room = max(_FOLD_AT - len(lines[-1]), 0)
    lines[-1] += value[:room]
    for start in range(room, len(value), _FOLD_AT - 1):
        lines.append("\t" + value[start : start + _FOLD_AT - 1])
