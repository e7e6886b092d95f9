"""The on-wire journal's cost: ``triomail send`` from several source trees, interleaved.

``python -m bench.wire [--rows N] [--runs K] [--connections C] [--html] [NAME=TREE ...]``
sends the same campaign (the plain bulk template, or with ``--html`` the text+html one
of ``bench.bulk``; an SQLite journal) to one Postfix ``smtp-sink`` with each tree's
``triomail`` (``PYTHONPATH=TREE``; ``this`` is the checkout), A B A B..., and prints per
tree the medians of: the steady rate (the summary's ``rate`` line), the whole
command's rate (rows over its wall time, start-up included) and its CPU per message
(user + system of it and its render process, from ``wait4``). Noise on a shared 2-CPU
machine is high: compare trees only within one run of this command.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import smtp_sink
from .bulk import HTML_TEMPLATE, PLAIN_TEMPLATE, write_rows

HERE = Path(__file__).resolve().parent.parent


def one(
    tree: Path, work: Path, rows: Path, template: Path, port: int, conns: int
) -> tuple[float, float, float]:
    """(steady msg/s, wall seconds, CPU seconds) of one run of ``tree``'s ``triomail send``."""
    journal = work / "j.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "triomail", "send", str(rows), str(template), "--server",
        f"smtp+plain://127.0.0.1:{port}", "--yes", "--journal", str(journal),
        "--connections", str(conns), "--progress-interval", "3600",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: exit {out.returncode}: {out.stderr[-500:]}")
    steady = next(
        float(line.split()[-2].replace(",", ""))
        for line in out.stdout.splitlines()
        if line.startswith("rate ") and line.endswith("msg/s")
    )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return steady, wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--html", action="store_true", help="the text+html template")
    parser.add_argument("trees", nargs="*", help="NAME=TREE (a directory holding triomail/)")
    args = parser.parse_args()
    trees = {"this": HERE} | {
        name: Path(path) for name, path in (t.split("=", 1) for t in args.trees)
    }
    with tempfile.TemporaryDirectory() as tmp, smtp_sink() as port:
        work = Path(tmp)
        rows, template = work / "rows.csv", work / "template.txt"
        write_rows(rows, args.rows)
        template.write_text(HTML_TEMPLATE if args.html else PLAIN_TEMPLATE, encoding="utf-8")
        got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                got[name].append(one(tree, work, rows, template, port, args.connections))
    print(
        f"{args.rows:,} rows, {args.connections} connections, {args.runs} runs each, "
        f"{os.cpu_count()} CPUs, {'text+html' if args.html else 'plain'} template; medians "
        "of the steady rate, the whole command's rate and CPU per message (start-up "
        "included), then each run's steady rate"
    )
    for name, runs in got.items():
        steady = statistics.median(s for s, _, _ in runs)
        whole = args.rows / statistics.median(w for _, w, _ in runs)
        cpu = statistics.median(c for _, _, c in runs) / args.rows * 1e6
        print(
            f"{name:<8}{steady:>9,.0f} msg/s steady{whole:>8,.0f} msg/s whole{cpu:>6,.0f} "
            "us/msg   " + " ".join(f"{s:,.0f}" for s, _, _ in runs)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
