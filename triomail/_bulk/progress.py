"""Progress display for ``triomail send``: a live bar on a terminal, plain lines otherwise.

:class:`Progress` only counts; :meth:`Progress.line` formats the current state and
:meth:`Progress.summary` the final table. The CLI redraws the line a few times a
second on a TTY (``\\r`` + erase, on stderr) and prints it every ``interval`` seconds
when stderr is a file or a pipe, so logs stay readable.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["Progress"]

_BAR = 24


def _per_second(rate: float) -> str:
    """A rate as people read it: whole messages from 10 a second, else two significant
    digits, so a slow but working run does not show ``0 msg/s`` (issue 13, item 10)."""
    if rate >= 10 or rate == 0:
        return f"{rate:,.0f} msg/s"
    return f"{rate:.2g} msg/s"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Progress:
    """Counters of one run and their rendering."""

    #: Estimated number of messages in this run (rows, minus the ones already done).
    total: int | None = None
    clock: Callable[[], float] = time.monotonic
    accepted: int = 0
    #: Permanently refused (5xx) or refused locally.
    failed: int = 0
    #: Still transient after the last retry.
    deferred: int = 0
    unknown: int = 0
    #: Bad rows (reported and skipped).
    skipped: int = 0
    #: Rows not sent: every recipient is on the --exclude list.
    suppressed: int = 0
    #: What lint found in the rows it checked before sending (the summary's "lint" row).
    lint: str = ""
    #: Recipients refused (permanently or not), by enhanced status code (or reply code).
    refusals: dict[str, int] = field(default_factory=dict)
    #: Rows already accepted or refused in an earlier run (``--resume``).
    earlier: int = 0
    #: Of those, the ones refused (permanently).
    earlier_failed: int = 0
    #: Messages handed to the pool in this run.
    started: int = 0
    #: Retries the pool has scheduled (from its statistics).
    retrying: int = 0
    #: Recipients, over all finished messages, by outcome.
    recipients: dict[str, int] = field(default_factory=dict)
    _start: float = 0.0
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def __post_init__(self) -> None:
        self._start = self.clock()
        self._samples.append((self._start, 0))

    @property
    def done(self) -> int:
        return self.accepted + self.failed + self.deferred + self.unknown

    @property
    def in_flight(self) -> int:
        return max(0, self.started - self.done)

    @property
    def elapsed(self) -> float:
        return self.clock() - self._start

    def rate(self) -> float:
        """Messages per second over the last few seconds (overall at first)."""
        now = self.clock()
        done = self.done
        samples = self._samples
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > 5.0:
            samples.popleft()
        then, before = samples[0]
        if now - then < 0.2:
            return 0.0
        return (done - before) / (now - then)

    def overall_rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, *, bar: bool, width: int | None = None) -> str:
        """The progress line; within ``width`` columns (a terminal's) if given.

        Too wide, it loses the bar first, then its last parts (a wrapped line would
        be redrawn below itself at every tick).
        """
        parts = self._parts(bar=bar)
        text = "  ".join(parts)
        if width is not None:
            if bar and len(text) >= width:
                parts = parts[1:] if parts[0].startswith("[") else parts
            while len(parts) > 1 and len(text := "  ".join(parts)) >= width:
                parts = parts[:-1]
            text = text[: max(width - 1, 0)]
        return text

    def _parts(self, *, bar: bool) -> list[str]:
        rate = self.rate()
        done = self.done
        total = self.total
        parts = []
        if total:
            fraction = min(1.0, done / total)
            if bar:
                filled = int(fraction * _BAR)
                parts.append("[" + "#" * filled + "-" * (_BAR - filled) + "]")
            parts.append(f"{fraction * 100:.0f}% {done:,}/{total:,}")
        else:
            parts.append(f"{done:,}")
        parts.append(_per_second(rate))
        if total and rate > 0 and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        parts.append(f"accepted {self.accepted:,}")
        failed = self.failed + self.deferred + self.unknown
        parts.append(f"failed {failed:,}")
        parts.append(f"retrying {self.retrying:,}")
        if self.skipped:
            parts.append(f"bad rows {self.skipped:,}")
        return parts

    def summary(self, *, title: str = "Summary") -> str:
        """The table printed at the end of a run."""
        rows: list[tuple[str, str]] = [
            ("accepted", f"{self.accepted:,}"),
            ("failed (permanent)", f"{self.failed:,}"),
            ("failed (transient, retry with --resume)", f"{self.deferred:,}"),
            ("unknown (may have been delivered)", f"{self.unknown:,}"),
            ("bad rows skipped", f"{self.skipped:,}"),
        ]
        if self.suppressed:
            rows.append(("suppressed (--exclude), not sent", f"{self.suppressed:,}"))
        if self.lint:
            rows.append(("lint", self.lint))
        if self.refusals:
            top = sorted(self.refusals.items(), key=lambda item: (-item[1], item[0]))
            rows.append(("refusals by code", ", ".join(f"{c} x{n:,}" for c, n in top)))
        if self.earlier:
            done = f"{self.earlier:,}"
            if self.earlier_failed:
                done += f" ({self.earlier_failed:,} of them refused)"
            rows.append(("done in an earlier run", done))
        if self.recipients:
            per = ", ".join(f"{n:,} {k}" for k, n in sorted(self.recipients.items()))
            rows.append(("recipients", per))
        rows.append(("elapsed", f"{self.elapsed:.1f} s"))
        rows.append(("rate", _per_second(self.overall_rate())))
        width = max(len(name) for name, _ in rows)
        lines = [title, "-" * (width + 14)]
        lines.extend(f"{name:<{width}}  {value}" for name, value in rows)
        return "\n".join(lines)


class Display:
    """Draws a :class:`Progress` on ``stream``: in place on a TTY, else line by line."""

    def __init__(self, progress: Progress, stream: TextIO, *, tty: bool, interval: float) -> None:
        self.progress = progress
        self.stream = stream
        self.tty = tty
        self.interval = interval
        self._drawn = False
        self._last_plain = progress.clock()

    def tick(self) -> None:
        """Redraw (TTY) or print a line if the interval has passed (not a TTY)."""
        if self.tty:
            width = shutil.get_terminal_size().columns
            self.stream.write("\r\x1b[2K" + self.progress.line(bar=True, width=width))
            self.stream.flush()
            self._drawn = True
            return
        now = self.progress.clock()
        if now - self._last_plain >= self.interval:
            self._last_plain = now
            self.stream.write("progress: " + self.progress.line(bar=False) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line of text without garbling the bar."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Leave the final state of the bar on screen."""
        if self.tty:
            width = shutil.get_terminal_size().columns
            self.stream.write("\r\x1b[2K" + self.progress.line(bar=True, width=width) + "\n")
            self.stream.flush()
            self._drawn = False
