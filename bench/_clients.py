"""The benchmark's clients, each run in its own process by ``bench.throughput``.

``python -m bench._clients KIND --port P --messages N --connections C [...]`` sends ``N``
copies of the benchmark message over ``C`` connections and prints one JSON line:
``{"messages": accepted, "seconds": wall, "cpu": cpu}``, where the clock and the CPU
(``getrusage(RUSAGE_SELF)``: every thread, user + system) cover connecting, sending and
closing, but not the interpreter start or the imports (done before the clock starts).

KIND is one of:

- ``triomail``: ``C`` Trio tasks, each on its own ``triomail.connect(..., tls="none")``
  connection, preparing each message (``conn.prepare``) and sending batches of
  ``--batch`` with ``conn.send_many`` (PIPELINING across transactions; BDAT if CHUNKING
  is advertised and ``--chunking`` allows; ``--lazy`` passes a generator instead);
- ``triomail-pool``: ``triomail.open_pool`` with ``C`` connections and ``pool.send_all``;

  for both, ``--pipeline`` is the mode to start in (``cross``, the default, falls back to
  ``within`` on a server that refuses commands behind an end of data, such as Haraka),
  and the report line adds ``"mode"``: the mode the connections ended in, ``cross ->
  within`` where they fell back;
- ``aiosmtplib``: ``C`` ``aiosmtplib.SMTP`` clients in one asyncio loop, ``sendmail``
  per message;
- ``smtplib``: ``C`` threads, each with an ``smtplib.SMTP`` and ``sendmail`` per message.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterable

from bench._common import LOCAL_HOSTNAME, RECIPIENT, SENDER, message, self_cpu

#: What a run learnt about the server, added to its report line (``"mode"``).
NOTES: dict[str, str] = {}


def _note_mode(start: str, ended: Iterable[str]) -> None:
    modes = sorted(set(ended))
    NOTES["mode"] = start if modes in ([], [start]) else f"{start} -> {', '.join(modes)}"


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_triomail(
    port: int,
    total: int,
    connections: int,
    batch: int,
    chunking: str,
    lazy: bool = False,
    pipeline: str = "cross",
) -> int:
    import trio

    import triomail
    from triomail import PreparedMessage

    data = message()
    flag = {"auto": None, "on": True, "off": False}[chunking]
    accepted = 0
    ended: list[str] = []

    async def one(share: int) -> None:
        nonlocal accepted
        async with triomail.connect(
            "127.0.0.1", port, tls="none", local_hostname=LOCAL_HOSTNAME
        ) as conn:
            conn.pipeline = pipeline  # type: ignore[assignment]
            prepare = conn.prepare
            recipients = [RECIPIENT]
            left = share
            while left:
                n = min(batch, left)
                left -= n
                messages: Iterable[PreparedMessage]
                if lazy:  # a generator: each message prepared just before it goes out
                    messages = (
                        prepare(data, sender=SENDER, recipients=recipients) for _ in range(n)
                    )
                else:  # a list: prepared together, which keeps the CPU's caches warm
                    messages = [
                        prepare(data, sender=SENDER, recipients=recipients) for _ in range(n)
                    ]
                for result in await conn.send_many(messages, chunking=flag):
                    accepted += result.ok
            ended.append(conn.pipeline)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for share in _shares(total, connections):
                nursery.start_soon(one, share)

    trio.run(main)
    _note_mode(pipeline, ended)
    return accepted


class _Fallbacks(logging.Handler):
    """Counts the connections that fell back (the client logs each once, at INFO)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "behind an end of data refused" in record.getMessage()


def run_pool(
    port: int, total: int, connections: int, batch: int, chunking: str, pipeline: str = "cross"
) -> int:
    import trio

    import triomail

    data = message()
    accepted = 0
    server = triomail.Server("127.0.0.1", port, tls="none", local_hostname=LOCAL_HOSTNAME)
    fallbacks = _Fallbacks()
    log = logging.getLogger("triomail")
    log.addHandler(fallbacks)
    log.setLevel(logging.INFO)

    def messages() -> object:
        for _ in range(total):
            yield triomail.prepare(data, sender=SENDER, recipients=[RECIPIENT])

    async def main() -> None:
        nonlocal accepted
        async with (
            triomail.open_pool(
                server,
                connections=connections,
                pipeline=pipeline,  # type: ignore[arg-type]
            ) as pool,  # default depth
            pool.send_all(messages()) as results,  # type: ignore[arg-type]
        ):
            async for result in results:
                accepted += result.ok

    trio.run(main)
    _note_mode(pipeline, ["within"] * bool(fallbacks.count))
    if fallbacks.count:
        NOTES["mode"] += f" ({fallbacks.count} of the connections fell back)"
    return accepted


def run_aiosmtplib(port: int, total: int, connections: int, batch: int, chunking: str) -> int:
    import asyncio

    import aiosmtplib

    data = message()
    accepted = 0

    async def one(share: int) -> None:
        nonlocal accepted
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, local_hostname=LOCAL_HOSTNAME
        )
        await client.connect()
        for _ in range(share):
            refused, _reply = await client.sendmail(SENDER, [RECIPIENT], data)
            accepted += not refused
        await client.quit()

    async def main() -> None:
        await asyncio.gather(*(one(share) for share in _shares(total, connections)))

    asyncio.run(main())
    return accepted


def run_smtplib(port: int, total: int, connections: int, batch: int, chunking: str) -> int:
    import smtplib
    import threading

    data = message()
    counts: list[int] = []

    def one(share: int) -> None:
        ok = 0
        with smtplib.SMTP("127.0.0.1", port, local_hostname=LOCAL_HOSTNAME) as client:
            for _ in range(share):
                refused = client.sendmail(SENDER, [RECIPIENT], data)
                ok += not refused
        counts.append(ok)

    threads = [threading.Thread(target=one, args=(s,)) for s in _shares(total, connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


KINDS: dict[str, Callable[[int, int, int, int, str], int]] = {
    "triomail": run_triomail,
    "triomail-pool": run_pool,
    "aiosmtplib": run_aiosmtplib,
    "smtplib": run_smtplib,
}


PRELOAD = {
    "triomail": ("trio", "triomail"),
    "triomail-pool": ("trio", "triomail"),
    "aiosmtplib": ("asyncio", "aiosmtplib"),
    "smtplib": ("smtplib", "threading"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument(
        "--lazy", action="store_true", help="triomail: a generator per batch, not a list"
    )
    parser.add_argument("--chunking", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--pipeline", choices=("cross", "within", "off"), help="triomail: the mode to start in"
    )
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the run")
    args = parser.parse_args(argv)
    run = KINDS[args.kind]
    # Imports are not part of the measurement: load them before the clock starts.
    for module in PRELOAD[args.kind]:
        importlib.import_module(module)
    params: tuple[int, int, int, int, str] = (
        args.port, args.messages, args.connections, args.batch, args.chunking
    )  # fmt: skip
    if args.lazy:
        run = functools.partial(run_triomail, lazy=True)
    if args.pipeline:
        run = functools.partial(run, pipeline=args.pipeline)
    cpu0 = self_cpu()
    start = time.perf_counter()
    if args.profile:
        import cProfile

        with cProfile.Profile() as profile:
            accepted = run(*params)
        profile.dump_stats(args.profile)
    else:
        accepted = run(*params)
    seconds = time.perf_counter() - start
    cpu = self_cpu() - cpu0
    print(json.dumps({"messages": accepted, "seconds": seconds, "cpu": cpu, **NOTES}))


if __name__ == "__main__":
    main()
