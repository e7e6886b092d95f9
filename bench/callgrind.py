"""Instructions per message, counted by callgrind: a figure that does not move with the
load of the machine, for checking that a change costs the hot path nothing.

``python -m bench.callgrind [--kinds triomail,triomail-pool] [--small 2000 --large 4000]``

For each client kind it runs ``bench._clients`` under ``valgrind --tool=callgrind`` twice
against Postfix's ``smtp-sink`` on loopback, once with ``--small`` and once with
``--large`` messages over 20 connections, and prints
``(instructions(large) - instructions(small)) / (large - small)``: start-up, imports and
connecting cancel out, what is left is the cost of one more message. The same binary and
inputs give the same count to a few hundredths of a percent.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import smtp_sink

VALGRIND = "valgrind"


def instructions(kind: str, port: int, messages: int, connections: int) -> int:
    """Total instructions (Ir) of one ``bench._clients`` run under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}",
                sys.executable, "-m", "bench._clients", kind, "--port", str(port),
                "--messages", str(messages), "--connections", str(connections),
            ],
            capture_output=True, text=True, timeout=1800,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{kind} under callgrind failed:\n{done.stderr[-2000:]}")
        match = re.search(r"Collected : (\d+)", done.stderr)
        if match is None:
            raise RuntimeError(f"no instruction count in callgrind's output:\n{done.stderr}")
        return int(match.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="triomail,triomail-pool")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args(argv)
    with smtp_sink() as port:
        for kind in args.kinds.split(","):
            small = instructions(kind, port, args.small, args.connections)
            large = instructions(kind, port, args.large, args.connections)
            per = (large - small) / (args.large - args.small)
            print(f"{kind:15} {per:12,.0f} instructions per message", flush=True)


if __name__ == "__main__":
    main()
