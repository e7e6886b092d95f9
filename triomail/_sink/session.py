"""The I/O half of one capture-server connection (see :mod:`triomail._sink.server`).

A :class:`Session` owns the stream and runs the loop that the sans-IO
:class:`~triomail._sink.commands.ServerMachine` asks for: write the replies it has
queued, then read, wait, hand over a message or do the TLS handshake, as its next
event says. It writes only when the machine needs something, which keeps the replies
to pipelined commands in one write. Time limits are this side's business: the idle
timeout while reading and a bound on the TLS handshake.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import trio

from .commands import Captured, Pause, ServerMachine, Signal
from .config import SinkConfig
from .faults import FaultBook
from .message import CapturedMessage

__all__ = ["Session"]

_RECEIVE_SIZE = 65536
_HANDSHAKE_TIMEOUT = 30.0
# How long a polite close may take (a TLS close_notify to a silent peer).
_CLOSE_TIMEOUT = 1.0


class Session:
    """Serve one connection; :meth:`run` returns when it is closed.

    ``store`` keeps an accepted message and returns its queue id, or None when there
    is no room for it.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: tuple[str, int],
        config: SinkConfig,
        faults: FaultBook,
        store: Callable[[CapturedMessage], str | None],
    ) -> None:
        self._stream = stream
        self._config = config
        self._store = store
        self._machine = ServerMachine(config, faults, peer)
        self._idle = math.inf if config.idle_timeout <= 0 else config.idle_timeout

    async def run(self) -> None:
        """Serve until QUIT, EOF, an error or a fault; always closes the stream."""
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._serve()
        finally:
            # Also on cancellation (the sink is closing); no TLS close_notify here.
            await trio.aclose_forcefully(self._stream)

    async def _serve(self) -> None:
        machine = self._machine
        while True:
            event = machine.next_event()
            if isinstance(event, Captured):
                machine.stored(self._store(event.message))
                continue
            replies = machine.data_to_send()
            if replies:
                await self._stream.send_all(replies)
            if event is Signal.NEED_DATA:
                with trio.move_on_after(self._idle):
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        return  # the client closed its side
                    machine.receive_data(data)
                    continue
                machine.timed_out()
            elif isinstance(event, Pause):
                await trio.sleep(event.seconds)
            elif event is Signal.START_TLS:
                if not await self._start_tls():
                    return
            elif event is Signal.CLOSE:
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    await self._stream.aclose()  # TLS: sends close_notify
                return
            else:  # Signal.ABORT: the replies already due went out above
                return

    async def _start_tls(self) -> bool:
        """Wrap the stream in server-side TLS; return whether the handshake finished."""
        context = self._config.tls_context
        assert context is not None
        stream = trio.SSLStream(self._stream, context, server_side=True)
        self._stream = stream
        with trio.move_on_after(min(self._idle, _HANDSHAKE_TIMEOUT)):
            await stream.do_handshake()
            return True
        return False
