"""``triomail status JOURNAL``: where a campaign stands, as a whole, per worker, per state.

Theory of operation
-------------------
The journal is read without being changed (:meth:`.journal.Journal.peek` opens an
SQLite file read-only; :func:`.journal.pg_sql.peek` reads the
campaign's rows), so it can be run at any time, also while workers send: with
``--watch SECONDS`` it prints the table again every so often until interrupted. A
shared journal names its workers (host, pid, running or finished); an SQLite journal's
"workers" are its successive runs. *in-flight* rows are those on the wire now, or
left by a run that was cut off (unknown until ``--resume`` settles them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .settings import EXIT_CANNOT_RUN, EXIT_OK, is_url, journal_target

__all__ = ["format_snapshot", "register"]


def register(subparsers: Any) -> None:
    """Add the ``status`` subcommand."""
    p = subparsers.add_parser(
        "status",
        help="show a send journal's progress: the whole campaign, per worker and per state",
        description="Show where a `triomail send` campaign stands, from its journal "
        "(an SQLite file or a postgresql://...?campaign=NAME URL), without changing it.",
    )
    p.add_argument("journal", type=journal_target, metavar="JOURNAL", help="path or URL")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print it again every SECONDS")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .journal import JournalError, Snapshot

    def snapshot() -> Snapshot:
        if is_url(args.journal):
            from .journal.pg_sql import peek

            return peek(args.journal)
        from .journal import Journal

        assert isinstance(args.journal, Path)
        return Journal.peek(args.journal)

    try:
        while True:
            print(format_snapshot(str(args.journal), snapshot()), flush=True)
            if not args.watch:
                return EXIT_OK
            time.sleep(args.watch)
            print()
    except JournalError as exc:
        print(f"triomail status: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        return EXIT_OK


def format_snapshot(where: str, snap: Any) -> str:
    """The table: totals per state, then one line per worker (or run)."""
    from .journal import STATES

    totals = dict.fromkeys(STATES, 0)
    for counts in snap.by_run.values():
        for state, n in counts.items():
            totals[state] += n
    lines = [f"campaign {snap.campaign} in {where}: {sum(totals.values()):,} messages"]
    lines += [f"  {state:<10} {totals[state]:>10,}" for state in STATES]
    lines.append("per worker (run): " + " / ".join(STATES))
    for run in sorted(snap.by_run.keys() | snap.workers.keys()):
        counts = snap.by_run.get(run, dict.fromkeys(STATES, 0))
        numbers = " / ".join(f"{counts[s]:,}" for s in STATES)
        who = snap.workers.get(run, "")
        lines.append(f"  run {run}: {numbers}" + (f"  ({who})" if who else ""))
    return "\n".join(lines)
