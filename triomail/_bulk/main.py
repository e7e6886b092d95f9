"""``triomail send RECIPIENTS TEMPLATE``: from the parsed command line to the exit status.

Theory of operation
-------------------
:func:`run` merges the settings (:mod:`.settings`), raises the garbage collector's
thresholds for the batch, and turns :class:`.settings.CannotRun` into one line on stderr
and exit status 2, Ctrl-C before the batch into 130.

With ``--render process`` or ``auto`` (more than one CPU, not a dry run), the render
process (:mod:`.render_process`) is started before anything else, so that its start-up
(Python, Jinja2, the template) overlaps ours. That is why this module imports nothing
heavy, and the rest of the command (:mod:`.launch`: Jinja2, SQLite, trio, the pool) is
imported in :func:`_main` only once the child is on its way.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from .deliver import template_headers
from .render_process import RenderProcess
from .settings import EXIT_CANNOT_RUN, EXIT_INTERRUPTED, CannotRun, SendSettings, settings_from

__all__ = ["GC_THRESHOLDS", "run"]

#: The cyclic garbage collector's thresholds during a run. A batch allocates objects by
#: the million and frees them by reference counting; with the default threshold (700)
#: the collector ran ~230 times per 10,000 messages (about 5% of the CPU), scanning the
#: imported modules' objects again and again. Restored when the run ends.
GC_THRESHOLDS = (20_000, 50, 100)


def run(args: argparse.Namespace) -> int:
    """Run ``triomail send``; return the exit status."""
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        settings = settings_from(args)
        _mailmerge_resume(settings, getattr(args, "resume_row", None))
        return _main(settings)
    except CannotRun as exc:
        print(f"triomail send: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("triomail send: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        gc.set_threshold(*thresholds)


def _mailmerge_resume(settings: SendSettings, row: int | None) -> None:
    """mailmerge's ``--resume N`` starts at message N. Our journal knows which rows were
    sent, so N is not needed when there is one; without one, starting anywhere but at
    the top could send rows twice or never, so it is refused with the way out."""
    if row is None:
        return
    path = settings.journal_path()
    if isinstance(path, str) or (path is not None and path.is_file()):  # a URL: a database
        print(
            f"triomail send: --resume {row}: the journal {path} records which rows were "
            "sent; the batch resumes from it, not from a row number",
            file=sys.stderr,
        )
        return
    raise CannotRun(
        f"--resume {row}: no journal {path or '(in memory)'} to resume from (triomail "
        f"resumes from its journal, not from a row number); to start at message {row} "
        f"as mailmerge would, remove the first {row - 1} row(s) from {settings.recipients} "
        "and send without --resume"
    )


def _verbose(stack: contextlib.ExitStack) -> None:
    """-v: the DEBUG transcript of the ``triomail`` logger (AUTH redacted, R36) on
    stderr, for this run."""
    log = logging.getLogger("triomail")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    stack.callback(log.setLevel, level)
    stack.callback(log.removeHandler, handler)


def _main(settings: SendSettings) -> int:
    with contextlib.ExitStack() as stack:
        if settings.verbose:
            _verbose(stack)
        if not _seekable_file(settings.recipients):
            settings.recipients = _spool(settings, stack)
        renderer = None
        if settings.render_in_process():
            # First of all, so that its start-up overlaps ours.
            try:
                renderer = RenderProcess.start(
                    settings.template,
                    settings.recipients,
                    settings.attachments_dir,
                    settings.encoding,
                    template_headers(settings),
                )
            except OSError as exc:
                raise CannotRun(f"cannot start the render process: {exc}") from None
            stack.callback(renderer.close)
        from .launch import prepare_and_run  # after the start (see the header)

        return prepare_and_run(settings, renderer)


def _seekable_file(path: Path) -> bool:
    """A regular file (read twice: by the row counter and by the render process)."""
    if str(path) == "-":
        return False
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True  # missing: the reader says so, in its words


def _spool(settings: SendSettings, stack: contextlib.ExitStack) -> Path:
    """Copy a piped recipients file (``-``, ``/dev/stdin``, ``<(...)``) to a private
    temporary file, removed at the end: it is read more than once."""
    if settings.journal is None and settings.sink is None and not settings.dry_run:
        raise CannotRun(
            "recipients from a pipe need --journal PATH (the journal is kept next to the "
            "recipients file, and a pipe has none)"
        )
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triomail-")))
    name = "stdin" if str(settings.recipients) == "-" else settings.recipients.name
    target = directory / name
    try:
        with contextlib.ExitStack() as files:
            source = (
                sys.stdin.buffer
                if str(settings.recipients) == "-"
                else files.enter_context(settings.recipients.open("rb"))
            )
            with target.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except OSError as exc:
        raise CannotRun(f"cannot read {settings.recipients}: {exc.strerror}") from None
    return target
