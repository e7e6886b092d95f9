"""Serving the web view with Hypercorn's Trio worker, beside whatever else the run does.

The app runs in the caller's trio run (Hypercorn's ``hypercorn.trio.serve``; Starlette
reaches Trio through AnyIO), so ``triomail sink --web`` has one process, one event
loop and one store that the SMTP sessions and the HTTP requests share without locks.
Leaving :func:`open_web` cancels the server, which also ends open event streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .app import build_app, is_loopback
from .store import LiveStore, Store

if TYPE_CHECKING:
    from triomail.testing import CapturedMessage, SMTPSink

__all__ = ["SinkPage", "open_sink_page", "open_web"]


@asynccontextmanager
async def open_web(
    store: Store, host: str = "127.0.0.1", port: int = 0, password: str | None = None
) -> AsyncIterator[str]:
    """Serve the page over ``store``; yield its base URL (``http://host:port/``)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 0.5
    app: Any = build_app(store, password, loopback=is_loopback(host))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, app, config))
        nursery.start_soon(store.poll)
        try:
            yield binds[0].rstrip("/") + "/"
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class SinkPage:
    """A capture server with its web view: ``sink``, ``store`` and the page's ``url``."""

    sink: SMTPSink
    store: LiveStore
    url: str


@asynccontextmanager
async def open_sink_page(**sink_kwargs: Any) -> AsyncIterator[SinkPage]:
    """An :class:`~triomail.testing.SMTPSink` (any of its keyword arguments) and its page."""
    from triomail.testing import SMTPSink

    store = LiveStore()
    on_message = chain(store, sink_kwargs.pop("on_message", None))
    async with SMTPSink(on_message=on_message, **sink_kwargs) as sink, open_web(store) as url:
        yield SinkPage(sink, store, url)


def chain(
    store: LiveStore, then: Callable[[CapturedMessage], object] | None
) -> Callable[[CapturedMessage], None]:
    """An ``on_message`` hook that feeds ``store`` and then calls ``then``."""

    def on_message(message: CapturedMessage) -> None:
        store.add(message)
        if then is not None:
            then(message)

    return on_message
