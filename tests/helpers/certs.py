"""TLS material for tests: one trustme CA per session, and context helpers.

The ``tls_ca`` fixture (``conftest.py``) is a session-wide :class:`trustme.CA`. Both the
scripted fake server (``scripted.py``) and the private Postfix instance (``postfix.py``)
use certificates issued by it, so a client context from :func:`client_ssl_context`
trusts both.
"""

from __future__ import annotations

import ssl

import trustme

#: The names a default server certificate is valid for.
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")


def make_ca() -> trustme.CA:
    """A fresh CA (what the session ``tls_ca`` fixture holds)."""
    return trustme.CA()


def server_ssl_context(
    ca: trustme.CA,
    *names: str,
    minimum_version: ssl.TLSVersion | None = None,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A server-side context with a leaf certificate issued by *ca*.

    *names* default to ``localhost`` and ``127.0.0.1``; pass other names for a
    wrong-name certificate. For a self-signed certificate use a different CA
    (``server_ssl_context(make_ca())``): the client does not trust it.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or DEFAULT_SERVER_NAMES)).configure_cert(ctx)
    if minimum_version is not None:
        ctx.minimum_version = minimum_version
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return ctx


def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context (``CERT_REQUIRED``, ``check_hostname``) trusting *ca*."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx
