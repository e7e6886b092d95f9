"""Shared pieces of the benchmarks: the message, ports, child processes, the sink."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"
LOCAL_HOSTNAME = "bench.example.com"
PAYLOAD = 2048  # octets of body, like smtp-source -l 2048 (headers come on top)

SMTP_SINK = Path("/usr/sbin/smtp-sink")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
POSTFIX = Path("/usr/sbin/postfix")


def message(payload: int = PAYLOAD) -> bytes:
    """The benchmark message: a few headers and ``payload`` octets of 78-octet lines."""
    headers = (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Subject: throughput benchmark\r\n"
        "Message-ID: <bench@example.com>\r\n"
        "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs\r\n"
    body = line * (payload // len(line))
    body += b"x" * (payload - len(body) - 2) + b"\r\n"
    return headers + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_greeting(port: int, timeout: float = 20.0) -> None:
    """Connect until the server on ``port`` says 220 (then QUIT)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(4096)
                    return
                last = data
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"no 220 greeting on 127.0.0.1:{port} within {timeout}s ({last!r})")


def missing_tools() -> list[str]:
    return [str(p) for p in (SMTP_SINK, SMTP_SOURCE, POSTFIX) if not p.exists()]


@contextlib.contextmanager
def smtp_sink() -> Iterator[int]:
    """Postfix smtp-sink on a free loopback port (``-u nobody``, backlog 1000)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(SMTP_SINK), "-u", "nobody", f"127.0.0.1:{port}", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_greeting(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def latency_proxy(upstream_port: int, rtt_ms: float) -> Iterator[int]:
    """``bench.latency_proxy`` in a child process: ``rtt_ms / 2`` each way."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.latency_proxy", "--upstream-port", str(upstream_port),
         "--delay-ms", str(rtt_ms / 2)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("latency proxy did not start")
        yield int(line[1])
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Run:
    """One run of one client: messages accepted, wall seconds, CPU seconds."""

    messages: int
    seconds: float
    cpu: float
    error: str | None = None
    #: What the client reported learning (triomail: the pipelining mode it ended in).
    mode: str | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def run_process(argv: list[str], timeout: float) -> tuple[str, float, float, int]:
    """Run a child; return its stdout, wall seconds, CPU seconds (rusage) and status.

    Runs are sequential, so the growth of ``RUSAGE_CHILDREN`` across one run is that
    child's CPU time alone (user + system, the whole process).
    """
    cpu0 = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0 and err:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return out.decode(), wall, children_cpu() - cpu0, proc.returncode


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def nproc() -> int:
    return os.cpu_count() or 1
