"""The options of a session, gathered once, and the defaults they fall back on.

:class:`SessionOptions` is the one list of what :func:`~triomail.connect`,
:func:`~triomail.open_connection` and :func:`~triomail.start_session` accept;
:class:`OptionArgs` is the same list as keyword arguments (all but ``tls``, whose
default differs between them). :func:`default_ssl_context` verifies (R2) and
:func:`local_name` is the EHLO name when none is given (R32).
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from .._core.idna2008 import ascii_domain
from .._core.timeouts import Timeouts

__all__ = [
    "OptionArgs",
    "Pipeline",
    "SessionOptions",
    "TLSMode",
    "TokenSource",
    "default_ssl_context",
    "local_name",
    "pipeline_mode",
]

TLSMode = Literal["implicit", "starttls", "none"]
#: How ``send_many`` pipelines (RFC 2920): ``cross`` writes the next envelope behind
#: an end of data, ``within`` waits for the end-of-data reply first (two round trips a
#: message), ``off`` sends each command alone.
Pipeline = Literal["cross", "within", "off"]


def pipeline_mode(mode: object) -> Pipeline:
    """``mode`` if it is a :data:`Pipeline` mode; ValueError if not."""
    if mode not in ("cross", "within", "off"):
        raise ValueError(f"pipeline must be 'cross', 'within' or 'off', not {mode!r}")
    return mode


TokenSource = str | Callable[[], Awaitable[str]]


class OptionArgs(TypedDict, total=False):
    """The keyword arguments :class:`SessionOptions` takes besides ``tls`` (for ``**``)."""

    ssl_context: ssl.SSLContext | None
    username: str | None
    password: str | None
    oauth_token: TokenSource | None
    auth: str | Sequence[str] | None
    local_hostname: str | None
    server_hostname: str | None
    timeouts: Timeouts
    allow_insecure_auth: bool


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How to run a session: the options of :func:`~triomail.connect`, in one place
    (its docstring says what each one does).

    ``tls`` is ``"implicit"`` (the default for port 465), ``"starttls"`` (the default
    otherwise, and required: never a silent downgrade, R1) or ``"none"`` (explicit
    plaintext); ``None`` picks by port. Credentials go only over TLS unless
    ``allow_insecure_auth`` (R9). Deadlines come from ``timeouts`` (R26).
    ``auth`` names the SASL mechanism (or mechanisms, in order) to try; by default each
    one the server offers that the credentials can serve, strongest first.
    ``server_hostname`` is the name the server's certificate must match when it is not
    the host connected to (an IP address, say); by default that host (R2).
    """

    tls: TLSMode | None = None
    ssl_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    oauth_token: TokenSource | None = None
    auth: str | Sequence[str] | None = None
    local_hostname: str | None = None
    server_hostname: str | None = None
    timeouts: Timeouts = Timeouts()
    allow_insecure_auth: bool = False


def default_ssl_context(
    cafile: str | os.PathLike[str] | None = None,
    *,
    capath: str | os.PathLike[str] | None = None,
    cadata: str | bytes | None = None,
) -> ssl.SSLContext:
    """A verifying client context: CERT_REQUIRED, host name check, TLS >= 1.2 (R2).

    It trusts the system's certificate authorities, or, when ``cafile`` (a PEM file),
    ``capath`` (a hashed directory) or ``cadata`` (PEM text or DER bytes) is given, those
    instead: how to reach a relay whose certificate a private CA issued.
    """
    context = ssl.create_default_context(cafile=cafile, capath=capath, cadata=cadata)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Keep truncation detection (R11), as trio.open_ssl_over_tcp_stream does.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


@functools.lru_cache(maxsize=1)
def local_name() -> str:
    """The EHLO name: the FQDN in A-label form, or an address literal (R32)."""
    name = socket.getfqdn()
    try:
        name = ascii_domain(name)  # IDNA 2008, as every domain triomail writes
    except UnicodeError:
        name = "localhost"
    if "." not in name or any(c in name for c in " \r\n\t\x00\x7f"):
        return "[127.0.0.1]"
    return name
