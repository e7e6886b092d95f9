"""Shared fixtures.

- ``tls_ca``: session-wide :class:`trustme.CA` (``certs.py`` has the context helpers).
- ``server_ssl_ctx`` / ``client_ssl_ctx``: fresh contexts per test, from ``tls_ca``.
- ``postfix``: session-wide private Postfix that discards every message.
- ``postfix_store``: the same, but every message is stored (``received_messages()``).

Helpers live in importable modules next to this file: ``certs``, ``postfix``,
``scripted`` (``from scripted import scripted_server, send_lines, expect``).
"""

from __future__ import annotations

import ssl
from collections.abc import Generator, Iterator

import pytest
import trustme
from helpers import certs
from helpers.postfix import POSTFIX, PostfixInstance, start_postfix

# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return certs.make_ca()


@pytest.fixture
def server_ssl_ctx(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Server context, cert for ``localhost`` and ``127.0.0.1`` issued by ``tls_ca``."""
    return certs.server_ssl_context(tls_ca)


@pytest.fixture
def client_ssl_ctx(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Verifying client context trusting ``tls_ca``."""
    return certs.client_ssl_context(tls_ca)


# -- Postfix ------------------------------------------------------------------------------

_POSTFIX_FIXTURES = ("postfix", "postfix_store")


def _postfix_or_skip() -> None:
    if not POSTFIX.exists():
        pytest.skip(f"{POSTFIX} not installed (Debian package `postfix`; .ci/run installs it)")


@pytest.fixture(scope="session")
def postfix(tls_ca: trustme.CA) -> Iterator[PostfixInstance]:
    """Private Postfix on ``127.0.0.1:<port>``: STARTTLS (cert from ``tls_ca``),
    PIPELINING, CHUNKING, SMTPUTF8, SIZE 1000000; every message is discarded. Use
    ``checkpoint()`` + ``wait_delivered(n, since=cp)`` to see that mail was accepted."""
    _postfix_or_skip()
    with start_postfix(tls_ca, mode="discard") as inst:
        yield inst


@pytest.fixture(scope="session")
def postfix_store(tls_ca: trustme.CA) -> Iterator[PostfixInstance]:
    """Like ``postfix``, but every message is written to a directory; use
    ``checkpoint()`` + ``wait_received(n, since=cp)`` / ``received_messages(since=cp)``."""
    _postfix_or_skip()
    with start_postfix(tls_ca, mode="store") as inst:
        yield inst


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tail of the maillog of any Postfix the test used."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in _POSTFIX_FIXTURES:
            inst = funcargs.get(name)
            if isinstance(inst, PostfixInstance):
                tail = "\n".join(inst.log().splitlines()[-60:])
                report.sections.append((f"{name} maillog (tail)", tail))
    return report
