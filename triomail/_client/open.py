"""Opening a session: :func:`connect`, :func:`open_connection`, :func:`start_session`.

Theory of operation
-------------------
All three take the same options, gathered once into a
:class:`~triomail._client.options.SessionOptions`; only ``tls`` is spelled out, since
its default differs (chosen by port here, required for an already-open stream).
:func:`open_connection` opens TCP under the ``connect`` deadline (R26) and hands the
stream to :func:`start_session`, which runs greeting, EHLO, STARTTLS and AUTH
(:meth:`SMTPConnection.start`) and, on any failure, closes the stream before raising:
a connection that failed to start is never returned half-open (R3, R10, R13).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Unpack

import trio

from .._core.commands import check_argument
from .._core.errors import SMTPConnectError, SMTPTimeoutError
from .._core.idna2008 import ascii_domain
from .options import OptionArgs, SessionOptions, TLSMode, local_name
from .session import SMTPConnection

__all__ = ["connect", "open_connection", "start_session"]

_DEFAULT_PORTS = {"implicit": 465, "starttls": 587, "none": 25}


@asynccontextmanager
async def connect(
    host: str, port: int | None = None, *, tls: TLSMode | None = None, **options: Unpack[OptionArgs]
) -> AsyncIterator[SMTPConnection]:
    """Open an SMTP session as an ``async with`` block; QUIT and close it at the end.

    Args:
        host: the server's name (or address) to connect to; also the name its
            certificate must match, unless ``server_hostname`` says otherwise.
        port: 587 for ``tls="starttls"``, 465 for ``"implicit"``, 25 for ``"none"``
            when not given.
        tls: ``"starttls"`` (the default except on port 465): upgrade with STARTTLS
            and stop before AUTH or MAIL if the server does not offer it or refuses;
            ``"implicit"`` (the default on 465): TLS before the greeting; ``"none"``:
            plaintext, by explicit choice only. Never a silent downgrade.
        ssl_context: the TLS client context; by default
            :func:`default_ssl_context` (certificates verified, TLS 1.2 or later). For
            a private CA: ``default_ssl_context("ca.pem")``.
        server_hostname: the name the certificate must match when ``host`` is an
            address or another name.
        username: log in with AUTH as this user (only over TLS unless
            ``allow_insecure_auth``).
        password: the password for ``username``.
        oauth_token: instead of a password, an OAuth 2 bearer token for XOAUTH2: a
            string, or an async callable returning one (called at each login).
        auth: the SASL mechanism (``"PLAIN"``, ``"LOGIN"``, ``"CRAM-MD5"``) or a list
            tried in order; by default every one the server offers, strongest first,
            until one is accepted (a refused password, 535, ends it).
        local_hostname: the name sent with EHLO; by default this machine's FQDN in
            A-label form, or an address literal.
        timeouts: the deadline of each stage (:class:`Timeouts`; RFC 5321 §4.5.3.2's
            by default).
        allow_insecure_auth: allow AUTH over plaintext (``tls="none"``): credentials
            then cross the network in the clear.

    Raises :class:`SMTPError` subclasses only: :class:`SMTPConnectError`,
    :class:`SMTPTimeoutError`, :class:`SMTPSecurityError` (TLS refused or missing),
    :class:`SMTPCertificateError`, :class:`SMTPAuthenticationError`, and so on.
    """
    conn = await open_connection(host, port, tls=tls, **options)
    try:
        yield conn
    finally:
        await conn.aclose()


async def open_connection(
    host: str, port: int | None = None, *, tls: TLSMode | None = None, **options: Unpack[OptionArgs]
) -> SMTPConnection:
    """Open an SMTP session and return it (not a block): the caller must
    ``await conn.aclose()``. Takes the arguments of :func:`connect`."""
    if tls is None:
        tls = "implicit" if port == 465 else "starttls"
    if tls not in _DEFAULT_PORTS:
        raise ValueError(f"tls must be 'implicit', 'starttls' or 'none', not {tls!r}")
    settings = SessionOptions(tls, **options)
    if port is None:
        port = _DEFAULT_PORTS[tls]
    check_argument(host, "host")
    try:
        with trio.fail_after(settings.timeouts.connect):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise SMTPTimeoutError(f"connecting to {host}:{port} timed out", stage="connect") from None
    except OSError as exc:
        raise SMTPConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
    return await _start(stream, host, settings)


async def start_session(
    stream: trio.abc.Stream, *, host: str, tls: TLSMode, **options: Unpack[OptionArgs]
) -> SMTPConnection:
    """Run greeting, EHLO, STARTTLS and AUTH over an already-open stream; return the
    session (not a block: ``await conn.aclose()``).

    ``host`` is the name the certificate must match; ``tls`` and the options are those
    of :func:`connect`. On failure the stream is closed and the error raised.
    """
    return await _start(stream, host, SessionOptions(tls, **options))


async def _start(stream: trio.abc.Stream, host: str, options: SessionOptions) -> SMTPConnection:
    try:
        if options.local_hostname is None and not local_name.cache_info().currsize:
            # The first look-up of our FQDN may block on DNS: keep it off the trio thread.
            await trio.to_thread.run_sync(local_name)
        conn = SMTPConnection(
            stream,
            # The name TLS checks (R2), as IDNA 2008 A-labels: the ssl module would encode
            # a U-label with the IDNA 2003 codec, and check another domain's certificate.
            host=ascii_domain(options.server_hostname or host),
            timeouts=options.timeouts,
            local_hostname=options.local_hostname,
            ssl_context=options.ssl_context,
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)  # R13: a bad EHLO name; nothing written
        raise
    try:
        await conn.start(options)
    except BaseException:
        # QUIT if the session is still sound (AUTH refused); after a TLS failure or any
        # broken state, close without another byte (R3, R10).
        await conn.aclose()
        raise
    return conn
