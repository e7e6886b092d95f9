"""Bulk sending, triomail against mailmerge: ``python -m bench.bulk``.

Both tools run as their normal command line, as a child process, on the same CSV and
the same template, sending to the same Postfix ``smtp-sink`` (started here on a free
loopback port). Runs are interleaved (A B A B A B) and the table shows the median of
three runs of each, in messages per second of wall time (process start to exit), and
the ratio measured side by side.

Cases:

* ``plain``: the mailmerge sample template (``TO``/``SUBJECT``/``FROM`` and a text
  body with three fields), 10,000 rows.
* ``text+html``: a ``Content-Type: text/markdown`` template (text/plain and text/html
  alternative) with a non-ASCII subject and non-ASCII names, 10,000 rows.
* ``DKIM``: the text+html case, triomail only, unsigned, signed with an RSA-2048 key and
  signed with an Ed25519 key (``--dkim-key``; signed in the render process), interleaved,
  with the signed/unsigned ratio (``--no-dkim`` skips it, ``--only-dkim`` runs it alone).
* ``1M rows``: the text+html template over 1,000,000 rows, triomail only, once; the
  peak RSS of the command (``os.wait4``) is reported, and that of its render process
  (sampled from ``/proc`` while it runs).

mailmerge opens one SMTP connection per message and sends them one after another; that
is how it works, and what users switching from it get. triomail uses ``--connections``
(4 here: on loopback the pool pipelines many messages per connection, and 2-8
connections beat 20 on this 2-CPU machine; against a real relay with 20+ ms round trips
more connections pay). The ratio is taken on wall time of the whole command, start-up
included; the ``steady`` column is triomail's own rate from its summary (excluding
start-up, about 0.5-0.8 s of imports, the server check and the journal).
``--quick`` runs smaller batches (for a smoke test of the bench).

Both tools are measured as installed: pip byte-compiles mailmerge (and every
dependency) when it installs them, so the bench byte-compiles triomail's own modules
first (an editable checkout, with ``PYTHONDONTWRITEBYTECODE`` set, would otherwise
compile them from source in every run).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._common import SMTP_SINK, smtp_sink

MAILMERGE = Path(sys.executable).parent / "mailmerge"

PLAIN_TEMPLATE = """\
TO: {{email}}
SUBJECT: Testing mailmerge
FROM: My Self <myself@example.com>

Hi, {{name}},

Your number is {{number}}.
"""

HTML_TEMPLATE = """\
TO: {{name}} <{{email}}>
SUBJECT: Votre relevé {{plan}} — your statement, {{name}}
FROM: Triomail Bench <bench@example.com>
CONTENT-TYPE: text/markdown

Hi **{{name}}**,

Your number is **{{number}}**, on the *{{plan}}* plan.

- Your account: [{{email}}](https://example.com/account?u={{number}})
- Questions? Reply to this message.

Merci et à bientôt,
The Triomail team
"""

FIRST = ["Alice", "Bob", "Zoë", "Chloé", "Jürgen", "Ólafur", "Søren", "Ana", "Li", "Kwame"]
LAST = ["Liddell", "Smith", "Lefèvre", "Dubois", "Müller", "Arnalds", "Kierkegaard", "Silva"]


def write_rows(path: Path, n: int, seed: int = 1) -> None:
    """Personalised rows: unique addresses, names from a mixed-script pool."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["email", "name", "number", "plan"])
        for i in range(n):
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            w.writerow(
                [f"user{i}@example.com", name, rng.randint(1, 99999), rng.choice(("Basic", "Pro"))]
            )


@dataclass
class Run:
    seconds: float
    returncode: int
    max_rss_kib: int
    steady: float | None = None  # triomail's own msg/s (its summary's "rate" line)
    #: Peak RSS of the command's own child processes (triomail's render process), KiB.
    children_rss_kib: int = 0


def _peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a running process, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def run_child(argv: list[str], *, cwd: Path, stdout: Path, watch: bool = False) -> Run:
    """Run a command; wall time and the child's own peak RSS (``wait4`` rusage).

    ``watch``: also sample the peak RSS of the command's own children while it runs
    (``/proc``, every 0.5 s), which ``wait4`` folds into one maximum.
    """
    children: dict[int, int] = {}
    with stdout.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if watch else 0)
            if pid:
                break
            for child in _children(proc.pid):
                children[child] = max(children.get(child, 0), _peak_rss_kib(child))
            time.sleep(0.5)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_children = max(children.values(), default=0)
    return Run(seconds, proc.returncode, int(usage.ru_maxrss), None, peak_children)


def compile_triomail() -> None:
    """Byte-compile the triomail package, as ``pip install`` does (``__pycache__``)."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("triomail")
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        compileall.compile_dir(location, quiet=1)


def run_triomail(
    work: Path,
    rows: Path,
    template: Path,
    port: int,
    connections: int,
    *,
    watch: bool = False,
    extra: Sequence[str] = (),
) -> Run:
    journal = work / "journal.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "triomail", "send", str(rows), str(template),
        "--server", f"smtp+plain://127.0.0.1:{port}", "--yes", "--journal", str(journal),
        "--connections", str(connections), "--progress-interval", "3600", *extra,
    ]  # fmt: skip
    log = work / "triomail.log"
    run = run_child(argv, cwd=work, stdout=log, watch=watch)
    if run.returncode != 0:
        raise RuntimeError(f"triomail exited {run.returncode}: see {log}")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("rate ") and line.endswith("msg/s"):
            run.steady = float(line.split()[-2].replace(",", ""))
    return run


def run_mailmerge(work: Path, rows: Path, template: Path, port: int) -> Run:
    config = work / "mailmerge_server.conf"
    config.write_text(f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nratelimit = 0\n")
    argv = [
        str(MAILMERGE), "--no-limit", "--no-dry-run", "--output-format", "raw",
        "--template", str(template), "--database", str(rows), "--config", str(config),
    ]  # fmt: skip
    run = run_child(argv, cwd=work, stdout=work / "mailmerge.log")
    if run.returncode != 0:
        raise RuntimeError(f"mailmerge exited {run.returncode}: see {work / 'mailmerge.log'}")
    return run


# -- DKIM: the text+html campaign unsigned, RSA-signed and Ed25519-signed (issue 14) --------


def dkim_keys(work: Path) -> dict[str, list[str]]:
    """The ``send`` options of each variant: none, an RSA-2048 key, an Ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    keys = {
        "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    variants: dict[str, list[str]] = {"unsigned": []}
    for name, key in keys.items():
        path = work / f"{name}.pem"
        path.write_bytes(key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
        variants[name] = ["--dkim-key", str(path), "--dkim-selector", name.partition("-")[0]]
    return variants


def dkim_section(
    work: Path, rows: Path, template: Path, port: int, args: argparse.Namespace
) -> None:
    """Signed against unsigned, interleaved runs, medians; signing is in the render process."""
    variants = dkim_keys(work)
    walls: dict[str, list[float]] = {}
    steadies: dict[str, list[float]] = {}
    for i in range(args.runs):
        for name, extra in variants.items():
            t = run_triomail(work, rows, template, port, args.connections, extra=extra)
            walls.setdefault(name, []).append(args.rows / t.seconds)
            steadies.setdefault(name, []).append(t.steady or 0.0)
            print(
                f"  run {i + 1} text+html {name:<9} {args.rows / t.seconds:8,.0f} msg/s"
                f" (steady {t.steady or 0:,.0f})",
                flush=True,
            )
    header = f"{'DKIM':<11}{'triomail msg/s':>16}{'(steady)':>10}{'vs unsigned':>17}"
    print(f"\n{header}\n{'-' * len(header)}")
    base = statistics.median(walls["unsigned"])
    base_steady = statistics.median(steadies["unsigned"]) or 1.0
    for name in variants:
        wall, steady = statistics.median(walls[name]), statistics.median(steadies[name])
        ratio = f"{wall / base:.2f}x / {steady / base_steady:.2f}x"
        print(f"{name:<11}{wall:>16,.0f}{steady:>10,.0f}{ratio:>17}")
    print("(text+html template; ratios of wall time / steady rate; target signed >= 0.8x)\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=1_000_000, help="rows of the RSS run (0: skip)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="1,000 rows, 20,000 for RSS, 1 run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-dkim", action="store_true", help="skip the DKIM section")
    parser.add_argument("--only-dkim", action="store_true", help="only the DKIM section")
    # -- the PostgreSQL journal (issue 15): bench/bulk_postgres.py
    parser.add_argument(
        "--postgres", action=argparse.BooleanOptionalAction, default=True,
        help="also compare the SQLite and PostgreSQL journals (bench/bulk_postgres.py)",
    )  # fmt: skip
    parser.add_argument("--only-postgres", action="store_true", help="only the journal section")
    parser.add_argument(
        "--pg-connections", type=int, default=32,
        help="the journals compared again with this many connections (default 32)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.rows, args.big, args.runs = 1_000, 20_000, 1
    missing = [str(p) for p in (SMTP_SINK, MAILMERGE) if not p.exists()]
    if missing:
        print(f"bench.bulk: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    compile_triomail()
    work = Path(tempfile.mkdtemp(prefix="triomail-bulk-"))
    try:
        rows = work / "rows.csv"
        write_rows(rows, args.rows)
        templates = {"plain": work / "plain.txt", "text+html": work / "html.txt"}
        templates["plain"].write_text(PLAIN_TEMPLATE, encoding="utf-8")
        templates["text+html"].write_text(HTML_TEMPLATE, encoding="utf-8")
        results: dict[tuple[str, str], list[float]] = {}
        steady: dict[str, list[float]] = {}
        print(
            f"bench.bulk: {args.rows:,} rows, {args.runs} interleaved runs, triomail with "
            f"{args.connections} connections, mailmerge one connection per message; "
            f"smtp-sink on loopback; {os.cpu_count()} CPUs",
            flush=True,
        )

        def journal_section() -> None:
            """The PostgreSQL journal against SQLite (issue 15): bench/bulk_postgres.py."""
            from .bulk_postgres import postgres_section

            with smtp_sink() as port:
                postgres_section(
                    work, rows, args.rows, templates["plain"], port, args.connections,
                    args.runs, args.pg_connections,
                )  # fmt: skip

        if args.only_postgres:
            journal_section()
            return 0
        with smtp_sink() as port:
            if not args.no_dkim:
                dkim_section(work, rows, templates["text+html"], port, args)
                if args.only_dkim:
                    return 0
            for i in range(args.runs):
                for case, template in templates.items():
                    t = run_triomail(work, rows, template, port, args.connections)
                    m = run_mailmerge(work, rows, template, port)
                    results.setdefault((case, "triomail"), []).append(args.rows / t.seconds)
                    results.setdefault((case, "mailmerge"), []).append(args.rows / m.seconds)
                    steady.setdefault(case, []).append(t.steady or 0.0)
                    print(
                        f"  run {i + 1} {case:<9} triomail {args.rows / t.seconds:8,.0f} msg/s"
                        f" (steady {t.steady or 0:,.0f})"
                        f"   mailmerge {args.rows / m.seconds:6,.0f} msg/s",
                        flush=True,
                    )
            big: Run | None = None
            if args.big:
                big_rows = work / "big.csv"
                write_rows(big_rows, args.big, seed=2)
                print(f"  {args.big:,}-row run (text+html) ...", flush=True)
                big = run_triomail(
                    work, big_rows, templates["text+html"], port, args.connections, watch=True
                )
        print()
        header = (
            f"{'case':<11}{'triomail msg/s':>16}{'(steady)':>10}{'mailmerge msg/s':>17}{'ratio':>8}"
        )
        print(header)
        print("-" * len(header))
        for case in templates:
            t_med = statistics.median(results[(case, "triomail")])
            s_med = statistics.median(steady[case])
            m_med = statistics.median(results[(case, "mailmerge")])
            print(f"{case:<11}{t_med:>16,.0f}{s_med:>10,.0f}{m_med:>17,.0f}{t_med / m_med:>7.1f}x")
        if big is not None:
            print(
                f"\n{args.big:,} rows (text+html, triomail): {args.big / big.seconds:,.0f} msg/s "
                f"(steady {big.steady or 0:,.0f}), {big.seconds:,.0f} s, "
                f"peak RSS {big.max_rss_kib / 1024:,.0f} MiB"
                + (
                    f" (render process {big.children_rss_kib / 1024:,.0f} MiB; "
                    "the larger of the two is the wait4 figure)"
                    if big.children_rss_kib
                    else ""
                )
            )
        print(
            f"\nmedians of {args.runs} run(s); wall time of the whole command (start-up included)"
        )
        if args.postgres:
            journal_section()
    finally:
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
