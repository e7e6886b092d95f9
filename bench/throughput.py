"""Throughput of triomail against its peers: ``python -m bench.throughput``.

Starts Postfix ``smtp-sink`` on loopback and a latency proxy in front of it
(``bench.latency_proxy``), then sends the same 2 KB message over 20 connections with
each client, several times, interleaved (A B C A B C ...), at 0 ms and at 20 ms RTT:

- triomail: 20 connections driven directly, ``send_many`` in batches;
- triomail pool: ``triomail.open_pool`` (whose workers pipeline with ``send_many``);
- aiosmtplib: 20 clients in one asyncio loop;
- smtplib: 20 threads;
- Postfix ``smtp-source -d -s 20`` (C, no pipelining).

Then the CHUNKING case: a private Postfix ``smtpd`` (discard transport) at 20 ms RTT,
triomail with BDAT and with DATA pipelining, against smtp-source and aiosmtplib.

Then Haraka (issue 17), on loopback: a private Haraka 3 (Node.js, one process,
``queue/discard``) that refuses every command pipelined behind an end of data, so
triomail's default ``cross`` mode falls back to ``within`` on each connection (two round
trips a message); triomail started in ``within``, the pool, aiosmtplib and
smtp-source on the same server. The table shows the mode each triomail run ended in.
Needs Haraka installed by ``.ci/interop-servers.sh`` (else the case is skipped).

Each client runs in its own process. The table shows messages per second (median,
min, max over the runs), triomail's ratio to each client (median over median, in the
same run of the benchmark) and CPU seconds per 10,000 messages (user + system of the
client process: for the Python clients while sending, imports excluded; for
smtp-source the whole process). The sink, the proxy and Postfix are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from bench._common import (
    LOCAL_HOSTNAME,
    PAYLOAD,
    RECIPIENT,
    SENDER,
    SMTP_SOURCE,
    Run,
    latency_proxy,
    missing_tools,
    nproc,
    run_process,
    smtp_sink,
)


@dataclass(frozen=True)
class Client:
    label: str
    kind: str  # a bench._clients kind, or "smtp-source"
    args: tuple[str, ...] = ()


@dataclass
class Scenario:
    title: str
    rtt_ms: float
    server: Callable[[], AbstractContextManager[int]]
    clients: list[tuple[Client, int]]  # client and message count
    runs: dict[str, list[Run]] = field(default_factory=dict)


TRIOMAIL = Client("triomail send_many", "triomail")
TRIOMAIL_DATA = Client("triomail send_many, DATA", "triomail", ("--chunking", "off"))
TRIOMAIL_BDAT = Client("triomail send_many, BDAT", "triomail", ("--chunking", "on"))
POOL = Client("triomail open_pool", "triomail-pool")
TRIOMAIL_WITHIN = Client("triomail send_many, within", "triomail", ("--pipeline", "within"))
AIOSMTPLIB = Client("aiosmtplib (20 clients)", "aiosmtplib")
SMTPLIB = Client("smtplib (20 threads)", "smtplib")
SMTP_SOURCE_CLIENT = Client("Postfix smtp-source -d", "smtp-source")


def run_client(client: Client, port: int, messages: int, connections: int) -> Run:
    if client.kind == "smtp-source":
        argv = [
            str(SMTP_SOURCE), "-d", "-s", str(connections), "-m", str(messages),
            "-l", str(PAYLOAD), "-M", LOCAL_HOSTNAME, "-f", SENDER, "-t", RECIPIENT,
            f"127.0.0.1:{port}",
        ]  # fmt: skip
        _out, wall, cpu, status = run_process(argv, timeout=600)
        if status != 0:
            return Run(0, wall, cpu, error=f"exit status {status}")
        return Run(messages, wall, cpu)
    argv = [
        sys.executable, "-m", "bench._clients", client.kind, "--port", str(port),
        "--messages", str(messages), "--connections", str(connections), *client.args,
    ]  # fmt: skip
    out, wall, cpu, status = run_process(argv, timeout=600)
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return Run(0, wall, cpu, error=f"no report (exit status {status})")
    error = None if report["messages"] == messages else f"{report['messages']} of {messages}"
    return Run(
        report["messages"], report["seconds"], report["cpu"], error=error, mode=report.get("mode")
    )


def run_scenario(scenario: Scenario, rounds: int, connections: int) -> None:
    print(f"\n# {scenario.title}", flush=True)
    with scenario.server() as port:
        for r in range(rounds):
            order = scenario.clients[r % len(scenario.clients) :]
            order += scenario.clients[: r % len(scenario.clients)]
            for client, messages in order:
                run = run_client(client, port, messages, connections)
                scenario.runs.setdefault(client.label, []).append(run)
                note = f"  ({run.error})" if run.error else ""
                note += f"  [{run.mode}]" if run.mode else ""
                print(
                    f"  round {r + 1}: {client.label:<28} {run.rate:9.0f} msg/s"
                    f"  {run.seconds:6.2f} s{note}",
                    flush=True,
                )


def table(scenario: Scenario, reference: str) -> str:
    ref_runs = scenario.runs.get(reference, [])
    ref = statistics.median(r.rate for r in ref_runs) if ref_runs else 0.0
    lines = [
        f"## {scenario.title}",
        "",
        "| client | messages | msg/s median | min | max | triomail ratio | CPU s / 10k msgs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for client, messages in scenario.clients:
        runs = scenario.runs.get(client.label, [])
        if not runs:
            continue
        rates = [r.rate for r in runs]
        median = statistics.median(rates)
        ratio = "" if client.label == reference else (f"{ref / median:.2f}x" if median else "-")
        cpu = statistics.median(r.cpu / r.messages * 10_000 for r in runs if r.messages) if any(
            r.messages for r in runs
        ) else 0.0  # fmt: skip
        errors = sum(1 for r in runs if r.error)
        flag = f" ({errors} runs short)" if errors else ""
        modes = sorted({r.mode for r in runs if r.mode})
        flag += f" [{'; '.join(modes)}]" if modes else ""
        lines.append(
            f"| {client.label}{flag} | {messages} | {median:,.0f} | {min(rates):,.0f} | "
            f"{max(rates):,.0f} | {ratio} | {cpu:.2f} |"
        )
    return "\n".join(lines)


@contextmanager
def behind_proxy(server: Callable[[], AbstractContextManager[int]], rtt_ms: float) -> Iterator[int]:
    with server() as port:
        if rtt_ms <= 0:
            yield port
            return
        with latency_proxy(port, rtt_ms) as proxied:
            yield proxied


def postfix_version() -> str:
    try:
        out = subprocess.run(
            ["/usr/sbin/postconf", "-d", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return out.split("=")[-1].strip() or "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="triomail throughput against its peers")
    parser.add_argument("--rounds", type=int, default=3, help="runs per client (default 3)")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every message count (e.g. 0.2)"
    )
    parser.add_argument(
        "--only", choices=("loopback", "rtt", "chunking", "haraka"), action="append",
        help="run only these cases (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the runs as JSON")
    args = parser.parse_args(argv)

    missing = missing_tools()
    if missing:
        print(
            "The benchmark needs Postfix's smtp-sink, smtp-source and postfix "
            f"(missing: {', '.join(missing)}).\nInstall the Debian package: "
            '`echo "postfix postfix/main_mailer_type select No configuration" | '
            "debconf-set-selections; DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "postfix` (see the README).",
            file=sys.stderr,
        )
        return 2

    def n(count: int) -> int:
        return max(args.connections, int(count * args.scale))

    rtt = args.rtt_ms
    scenarios: list[tuple[str, Scenario, str]] = []
    if not args.only or "loopback" in args.only:
        scenarios.append(("loopback", Scenario(
            "0 ms RTT (loopback): smtp-sink, 2 KB message, "
            f"{args.connections} connections",
            0.0,
            smtp_sink,
            [(TRIOMAIL, n(20000)), (POOL, n(20000)), (AIOSMTPLIB, n(6000)),
             (SMTPLIB, n(6000)), (SMTP_SOURCE_CLIENT, n(20000))],
        ), TRIOMAIL.label))  # fmt: skip
    if not args.only or "rtt" in args.only:
        scenarios.append(("rtt", Scenario(
            f"{rtt:g} ms RTT (latency proxy): smtp-sink, 2 KB message, "
            f"{args.connections} connections",
            rtt,
            lambda: behind_proxy(smtp_sink, rtt),
            [(TRIOMAIL, n(4000)), (POOL, n(4000)), (AIOSMTPLIB, n(1000)),
             (SMTPLIB, n(1000)), (SMTP_SOURCE_CLIENT, n(1000))],
        ), TRIOMAIL.label))  # fmt: skip
    if not args.only or "chunking" in args.only:
        from bench._postfix import private_postfix

        scenarios.append(("chunking", Scenario(
            f"CHUNKING, {rtt:g} ms RTT: private Postfix smtpd (discard), 2 KB message, "
            f"{args.connections} connections",
            rtt,
            lambda: behind_proxy(private_postfix, rtt),
            [(TRIOMAIL_BDAT, n(4000)), (TRIOMAIL_DATA, n(2000)), (AIOSMTPLIB, n(600)),
             (SMTP_SOURCE_CLIENT, n(600))],
        ), TRIOMAIL_BDAT.label))  # fmt: skip
    if not args.only or "haraka" in args.only:
        from bench._haraka import haraka_version, private_haraka

        version = haraka_version()
        if version is None:
            print("Haraka is not installed (bash .ci/interop-servers.sh): no Haraka row",
                  file=sys.stderr)  # fmt: skip
        else:
            scenarios.append(("haraka", Scenario(
                f"Haraka {version}, 0 ms RTT (loopback): private Haraka (discard), 2 KB "
                f"message, {args.connections} connections",
                0.0,
                private_haraka,
                [(TRIOMAIL, n(3000)), (TRIOMAIL_WITHIN, n(3000)), (POOL, n(3000)),
                 (AIOSMTPLIB, n(1500)), (SMTP_SOURCE_CLIENT, n(1500))],
            ), TRIOMAIL.label))  # fmt: skip

    load = os.getloadavg()
    print(
        f"triomail throughput benchmark: {nproc()} CPUs, load average {load[0]:.2f}, "
        f"Python {platform.python_version()}, Postfix {postfix_version()}, "
        f"{args.rounds} rounds",
        flush=True,
    )
    started = time.monotonic()
    for _name, scenario, _ref in scenarios:
        run_scenario(scenario, args.rounds, args.connections)
    print(f"\n(total {time.monotonic() - started:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f})\n")  # fmt: skip
    for _name, scenario, reference in scenarios:
        print(table(scenario, reference))
        print()
    if args.json:
        data = {
            name: {
                "title": s.title,
                "runs": {label: [vars(r) for r in runs] for label, runs in s.runs.items()},
            }
            for name, s, _ in scenarios
        }
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
