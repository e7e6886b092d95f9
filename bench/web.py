"""The web view over a big campaign folder: ``python -m bench.web``.

A campaign of 10,000 messages (``--messages``) is written with the real command,
``triomail send --dry-run --sink DIR`` (a ``text/markdown`` template: text/plain and
text/html alternative, about 1.5 kB each). Then ``triomail view DIR --web 0`` runs as
a child process and the bench measures, over plain HTTP on loopback:

* ``start``: from starting the command to its ``web view on URL`` line (imports, the
  folder listed once, the server listening).
* ``first page``: from then to having the page (``/``, its script and style sheet) and
  the first 50 rows of ``/api/messages``: what a user who opens the URL waits for;
  ``first rows`` is the ``/api/messages`` request alone, ``start + first page`` the
  whole wait from the command line. On a busy machine wall time says more about the
  other jobs; the ``cpu`` lines give the command's own CPU time for the same spans.
* the child's resident memory (``VmRSS`` from ``/proc``) after the first page, after
  paging through every message 50 at a time, after opening 1,000 messages one by one
  and after a search that matches nothing (every file's header block read); and its
  peak (``VmHWM``). "Flat" means the later figures stay near the first: the view keeps
  file names and a bounded cache of summaries, not messages.

The numbers quoted in docs/web.md come from this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TEMPLATE = """\
TO: {{name}} <{{email}}>
SUBJECT: Spring news for {{name}}
FROM: Shop <news@example.com>
CONTENT-TYPE: text/markdown

# Hello {{name}}

Our **spring collection** is here. Your customer number is {{number}}.

* Fresh colours
* Free returns

[Unsubscribe](https://example.com/u/{{number}})
"""

PAGE = 50


def write_campaign(folder: Path, count: int) -> float:
    """``triomail send --dry-run --sink folder``; return the seconds it took."""
    rows = folder.parent / "rows.csv"
    with open(rows, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "name", "number"])
        writer.writerows((f"user{i}@example.com", f"User {i}", i) for i in range(count))
    template = folder.parent / "template.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    started = time.perf_counter()
    command = [sys.executable, "-m", "triomail", "send", str(rows), str(template)]
    subprocess.run(
        [*command, "--dry-run", "--sink", str(folder)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        body: bytes = response.read()
        return body


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(folder: Path) -> dict[str, object]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "triomail", "view", str(folder), "--web", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.split()[3]
        up = time.perf_counter()
        start_cpu = cpu_seconds(process.pid)
        for path in ("", "static/app.js", "static/app.css"):
            get(url + path)
        rows_started = time.perf_counter()
        first = json.loads(get(f"{url}api/messages?start=0&limit={PAGE}"))
        done = time.perf_counter()
        result: dict[str, object] = {
            "messages": first["total"],
            "start s": round(up - started, 3),
            "first page s": round(done - up, 3),
            "first rows s": round(done - rows_started, 3),
            "start + first page s": round(done - started, 3),
            "start cpu s": round(start_cpu, 2),
            "start + first page cpu s": round(cpu_seconds(process.pid), 2),
            "rss after first page kB": memory(process.pid)["VmRSS"],
        }
        total = first["total"]
        paging = time.perf_counter()
        for start in range(0, total, PAGE):
            get(f"{url}api/messages?start={start}&limit={PAGE}")
        result["all pages s"] = round(time.perf_counter() - paging, 2)
        result["rss after all pages kB"] = memory(process.pid)["VmRSS"]
        for row in json.loads(get(f"{url}api/messages?start=0&limit=500"))["messages"][:1]:
            get(f"{url}api/messages/{row['id']}")
        names = sorted(p.name for p in folder.iterdir())[:1000]
        for name in names:
            get(f"{url}api/messages/{name}")
        result["rss after 1,000 opened kB"] = memory(process.pid)["VmRSS"]
        searching = time.perf_counter()
        found = json.loads(get(f"{url}api/messages?q=nobody-matches-this"))
        assert found["messages"] == []
        result["search (no match) s"] = round(time.perf_counter() - searching, 2)
        end = memory(process.pid)
        result["rss after search kB"] = end["VmRSS"]
        result["peak rss kB"] = end["VmHWM"]
        return result
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="triomail-bench-web-") as scratch:
        folder = Path(scratch) / "campaign"
        seconds = write_campaign(folder, args.messages)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(
            f"campaign: {args.messages:,} messages, {size / 1e6:.1f} MB, written in {seconds:.1f} s"
        )
        for key, value in measure(folder).items():
            print(f"{key:>28}: {value:,}" if isinstance(value, int) else f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
