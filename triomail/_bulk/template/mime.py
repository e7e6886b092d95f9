"""MIME parts that do not change per row: attachments, text parts, their headers.

Attachments are read and base64-encoded once per file (an LRU cache keyed by the
file's size and modification time, so templated paths work too); file names use
RFC 2231 parameters. Text parts are 7bit when they are ASCII with short lines and
quoted-printable otherwise, so no line on the wire exceeds 998 octets (RFC 5322
§2.1.1, R19) and no 8-bit octet needs 8BITMIME (R18). Boundaries are random, made
once per template; part headers are cached bytes. A Content-ID is made per part and
message from the Message-ID (:func:`content_ids`).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import mimetypes
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .headers import MAX_LINE
from .rendered import RowError

# ----------------------------------------------------------------------- attachments


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file read and encoded once; its Content-ID is given per message (:meth:`part`)."""

    path: Path
    head: bytes  # Content-Type, Content-Transfer-Encoding, Content-Disposition lines
    body: bytes  # base64 lines, CRLF-terminated
    digest: str  # of the file's bytes (the journal's content hash includes it)

    def part(self, content_id: str) -> list[bytes]:
        """The MIME part with its Content-ID, as pieces to join (the body is not copied)."""
        return [self.head, f"Content-ID: <{content_id}>\r\n\r\n".encode("ascii"), self.body]


def content_ids(message_id: str, count: int) -> list[str]:
    """One Content-ID per attached part, unique per part and message (RFC 2392 §2).

    Derived from the message's unique Message-ID, as ``part<N>.<id-left>@<id-right>``,
    so the same file attached twice, or to every message, never shares one.
    """
    left, _, right = message_id.strip().strip("<>").rpartition("@")
    return [f"part{i + 1}.{left}@{right}" for i in range(count)]


def _rfc2231(param: str, value: str) -> str:
    if value.isascii() and '"' not in value and "\\" not in value:
        return f'{param}="{value}"'
    return f"{param}*=utf-8''{urllib.parse.quote(value, safe='')}"


def _base64_lines(data: bytes) -> bytes:
    encoded = binascii.b2a_base64(data, newline=False)
    return b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


@functools.lru_cache(maxsize=64)
def _load_attachment(path: Path, stamp: tuple[int, int]) -> Attachment:
    """Read and encode a file once; ``stamp`` (mtime, size) invalidates a changed file."""
    data = path.read_bytes()
    basename = path.name
    ctype, encoding = mimetypes.guess_type(basename)
    if ctype is None or encoding is not None:
        ctype = "application/octet-stream"
    digest = hashlib.sha256(data).hexdigest()[:16]
    head = (
        f"Content-Type: {ctype}; {_rfc2231('name', basename)}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment; {_rfc2231('filename', basename)}\r\n"
    )
    return Attachment(path, head.encode("ascii"), _base64_lines(data), digest)


def _resolve_attachment(base: Path, spec: str) -> Path:
    spec = spec.strip()
    if not spec:
        raise RowError("empty ATTACHMENT header")
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base / path
    path = path.resolve()
    if not path.is_file():
        raise RowError(f"attachment not found: {path}")
    return path


def confine_attachment(root: Path, base: Path, spec: str) -> None:
    """Refuse a path from row data that leaves ``root`` (``..``, absolute, symlink out).

    A path the template's author wrote may name any file; one built from a row may
    only name a file under ``root`` (the template's directory or ``--attachments-dir``),
    checked after symlinks are followed, so a row cannot attach ``/etc/passwd``.
    """
    path = Path(spec.strip())
    if path.is_absolute() or spec.strip().startswith("~"):
        raise RowError(f"attachment {spec.strip()!r} from the row's data is an absolute path")
    resolved = (base / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise RowError(
            f"attachment {spec.strip()!r} from the row's data leaves {root} "
            "(a row may attach only files under it; see --attachments-dir)"
        )


def attachment_for(base: Path, spec: str, root: Path | None = None) -> Attachment:
    """The attachment ``spec`` names; ``root``: the spec came from a row (see above)."""
    if root is not None:
        confine_attachment(root, base, spec)
    path = _resolve_attachment(base, spec)
    st = path.stat()
    return _load_attachment(path, (st.st_mtime_ns, st.st_size))


# ---------------------------------------------------------------------- text parts


def text_part(subtype: str, text: str, boundaries: Sequence[str]) -> tuple[bytes, bytes]:
    """Part headers and CRLF body for a text part: 7bit if possible, else QP (R18, R19)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        long_line = len(text) > MAX_LINE and max(map(len, text.split("\n"))) > MAX_LINE
        clash = any(b in text for b in boundaries)
        if not long_line and not clash:
            return _PART_HEADERS[subtype, "us-ascii", "7bit"], text.replace("\n", "\r\n").encode(
                "ascii"
            )
        charset = "us-ascii"
    else:
        charset = "utf-8"
    body = binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
    return _PART_HEADERS[subtype, charset, "quoted-printable"], body


class _PartHeaders(dict[tuple[str, str, str], bytes]):
    def __missing__(self, key: tuple[str, str, str]) -> bytes:
        subtype, charset, cte = key
        value = (
            f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n"
        ).encode("ascii")
        self[key] = value
        return value


_PART_HEADERS: Final = _PartHeaders()


def new_boundary() -> str:
    return f"==============={secrets.token_hex(10)}=="
