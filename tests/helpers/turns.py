"""A loopback TCP relay that counts round trips between an SMTP client and a server.

A round trip is the client waiting for the server: so the relay counts the server's
turns, each run of server-to-client data with no client data in between (the greeting
is one, each reply group the client waited for is one). It measures what the client
does, not how either side's writes are cut into segments: two client writes with no
reply between them are one turn, a reply group read in two pieces is one turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio


class Turns:
    """The server turns seen so far on every relayed connection."""

    def __init__(self) -> None:
        self.count = 0
        self._last: dict[int, str] = {}

    def saw(self, connection: int, side: str) -> None:
        if side == "server" and self._last.get(connection) != "server":
            self.count += 1
        self._last[connection] = side


async def _pump(
    source: trio.abc.Stream, sink: trio.abc.Stream, turns: Turns, connection: int, side: str
) -> None:
    try:
        while data := await source.receive_some(65536):
            turns.saw(connection, side)
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(sink)


@asynccontextmanager
async def counting_relay(host: str, port: int) -> AsyncIterator[tuple[int, Turns]]:
    """Relay a free loopback port to ``host:port``; yields that port and the count."""
    turns = Turns()
    numbers = iter(range(1_000_000))

    async def relay(client: trio.SocketStream) -> None:
        number = next(numbers)
        server = await trio.open_tcp_stream(host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, server, turns, number, "client")
            nursery.start_soon(_pump, server, client, turns, number, "server")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], turns
        nursery.cancel_scope.cancel()
