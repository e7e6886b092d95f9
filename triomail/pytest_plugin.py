"""pytest plugin (entry point ``pytest11``): the ``smtp_sink`` fixture.

The fixture is an async generator fixture for pytest-trio: in trio mode every async
test can take it; outside trio mode mark the test ``@pytest.mark.trio``. Configure
the sink per test with ``@pytest.mark.smtp_sink(**kwargs)`` (any
:class:`~triomail.testing.SMTPSink` keyword argument). The sink module is imported
only when the fixture is used, so the plugin costs nothing otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._sink.server import SMTPSink

__all__ = ["smtp_sink"]


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

    marker = request.node.get_closest_marker("smtp_sink")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    async with SMTPSink(**kwargs) as sink:
        yield sink
