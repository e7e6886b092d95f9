"""A loopback TCP proxy that delays every chunk by a fixed one-way delay, both ways.

``python -m bench.latency_proxy --listen-port P --upstream-port Q --delay-ms 10``

The kernel here has no ``netem``, so a link with a round-trip time is emulated in user
space: each chunk read from one side is written to the other ``delay`` seconds after it
was read, in order (chunks that are due together go out in one write). A 10 ms one-way
delay gives a 20 ms RTT. It listens on 127.0.0.1 only and prints ``ready <port>`` once
it accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import deque

import trio

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    """Copy ``src`` to ``dst``, each chunk ``delay`` seconds after it was read.

    The sockets are driven directly (wait_readable/os.read, os.write) so that the proxy
    adds as little as possible to the delay it emulates, even with many connections.
    """
    src_fd = src.socket.fileno()
    dst_fd = dst.socket.fileno()
    pending: deque[tuple[float, bytes]] = deque()
    lot = trio.lowlevel.ParkingLot()
    done = False

    async def reader() -> None:
        nonlocal done
        try:
            while True:
                await trio.lowlevel.wait_readable(src_fd)
                try:
                    data = os.read(src_fd, 262144)
                except BlockingIOError:
                    continue
                if not data:
                    break
                pending.append((trio.current_time() + delay, data))
                lot.unpark_all()
        except (*_GONE, OSError):
            pass
        finally:
            done = True
            lot.unpark_all()

    async def writer() -> None:
        while True:
            while not pending:
                if done:
                    with contextlib.suppress(*_GONE, OSError):
                        await dst.send_eof()
                    return
                await lot.park()
            await trio.sleep_until(pending[0][0])
            now = trio.current_time()
            parts = []
            while pending and pending[0][0] <= now:  # all that is due: one write
                parts.append(pending.popleft()[1])
            view = memoryview(b"".join(parts))
            try:
                while view:
                    try:
                        view = view[os.write(dst_fd, view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst_fd)
            except (*_GONE, OSError):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _handle(client: trio.SocketStream, upstream_port: int, delay: float) -> None:
    try:
        server = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    except OSError:
        await client.aclose()
        return
    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(_pump, client, server, delay)
        nursery.start_soon(_pump, server, client, delay)


async def serve(
    listen_port: int,
    upstream_port: int,
    delay: float,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Proxy 127.0.0.1:listen_port to 127.0.0.1:upstream_port with ``delay`` each way."""
    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1", backlog=1000)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(
            lambda stream: _handle(stream, upstream_port, delay), listeners, handler_nursery=nursery
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    args = parser.parse_args(argv)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, args.listen_port, args.upstream_port,
                                       args.delay_ms / 1000)  # fmt: skip
            print(f"ready {port}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
