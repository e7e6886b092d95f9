"""pytest plugin (entry point ``pytest11``): the ``smtp_sink`` and ``smtp_sink_web`` fixtures.

The fixture is an async generator fixture for pytest-trio: in trio mode every async
test can take it; outside trio mode mark the test ``@pytest.mark.trio``. Configure
the sink per test with ``@pytest.mark.smtp_sink(**kwargs)`` (any
:class:`~triomail.testing.SMTPSink` keyword argument). The sink module is imported
only when the fixture is used, so the plugin costs nothing otherwise.

What the fixture needs is the ``testing`` extra: ``pip install 'triomail[testing]'``
(pytest, pytest-trio, and trustme for the sink's throwaway TLS certificate). Without
trustme the sink still runs, without STARTTLS, and ``client_ssl_context()`` says why.
``smtp_sink.wait_for_messages(n)`` gives up after ``timeout`` seconds (10 by default)
with a :exc:`TimeoutError` naming what arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._sink.server import SMTPSink
    from ._web.serve import SinkPage

__all__ = ["smtp_sink", "smtp_sink_web"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "smtp_sink(**kwargs): keyword arguments for the smtp_sink fixture's SMTPSink"
    )


@pytest.fixture
async def smtp_sink(request: pytest.FixtureRequest) -> AsyncIterator[SMTPSink]:
    """A running :class:`~triomail.testing.SMTPSink` on 127.0.0.1 and a free port.

    Connect to ``smtp_sink.host``/``smtp_sink.port``; use
    ``smtp_sink.client_ssl_context()`` for STARTTLS; read ``smtp_sink.messages``.
    """
    from ._sink.server import SMTPSink

    async with SMTPSink(**_sink_kwargs(request)) as sink:
        yield sink


@pytest.fixture
async def smtp_sink_web(request: pytest.FixtureRequest) -> AsyncIterator[SinkPage]:
    """A running sink (configured as ``smtp_sink``) with its web view (``triomail[web]``).

    ``smtp_sink_web.sink`` is the :class:`~triomail.testing.SMTPSink`,
    ``smtp_sink_web.url`` the page (the JSON API is under ``url + "api/"``).
    """
    from ._web.serve import open_sink_page

    async with open_sink_page(**_sink_kwargs(request)) as page:
        yield page


def _sink_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("smtp_sink")
    return dict(marker.kwargs) if marker is not None else {}
