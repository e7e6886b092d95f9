"""``--dry-run``: every row planned and rendered as for a real run, nothing sent.

The first ``--show`` messages are printed on stdout (LF line ends, for reading); with
``--sink DIR`` every message is also written there as ``NNNNNN.eml``. Bad rows are
reported as in a real run, and make the exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .outcomes import Outcomes
from .planner import Policy, chunks, plan_chunk
from .recipients import RecipientsReader
from .records import MAX_BATCH
from .settings import EXIT_FAILED, EXIT_OK

__all__ = ["dry_run"]


def dry_run(
    reader: RecipientsReader,
    policy: Policy,
    outcomes: Outcomes,
    *,
    limit: int | None,
    show: int,
    out_dir: Path | None,
) -> int:
    """Render and check every row (up to ``limit``); the exit status."""
    progress = outcomes.progress
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    shown = 0
    count = 0
    for chunk in chunks(reader, MAX_BATCH):
        budget = None if limit is None else limit - count
        if budget is not None and budget <= 0:
            break
        plan = plan_chunk(policy, chunk, budget)
        outcomes.planned(plan)
        for row, rendered, _ in plan.send:
            count += 1
            progress.accepted += 1
            if shown < show:
                shown += 1
                rcpts = ", ".join(rendered.recipients)
                sys.stdout.write(f">>> message {count} (line {row.line}) to {rcpts}\n")
                sys.stdout.write(rendered.data.decode("utf-8", "replace").replace("\r\n", "\n"))
                sys.stdout.write("\n")
            if out_dir is not None:
                (out_dir / f"{count:06d}.eml").write_bytes(rendered.data)
    sys.stdout.flush()
    for line in outcomes.failure_lines():
        outcomes.display.message(line)
    where = f"; written to {out_dir}" if out_dir is not None else ""
    outcomes.display.message(
        f"dry run: {count} message(s) rendered and checked, {progress.skipped} bad "
        f"row(s); nothing was sent{where}"
    )
    return EXIT_OK if progress.skipped == 0 else EXIT_FAILED
