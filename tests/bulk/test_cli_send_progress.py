"""The progress display: a bar redrawn in place on a TTY, plain periodic lines otherwise."""

from __future__ import annotations

import io
import os
import shutil

import pytest

from triomail._bulk.progress import Display, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_interval() -> None:
    clock = Clock()
    progress = Progress(total=1000, clock=clock)
    out = io.StringIO()
    display = Display(progress, out, tty=False, interval=5.0)
    for _ in range(20):
        clock.now += 1.0
        progress.accepted += 40
        display.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # 20 seconds, a line every 5
    assert all(line.startswith("progress: ") for line in lines)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    last = lines[-1]
    assert "80% 800/1,000" in last
    assert "40 msg/s" in last
    assert "ETA 0:05" in last
    assert "accepted 800" in last and "failed 0" in last and "retrying 0" in last


def test_tty_bar_is_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # room for the bar (the line fits the terminal)
    clock = Clock()
    progress = Progress(total=10, clock=clock)
    out = io.StringIO()
    display = Display(progress, out, tty=True, interval=5.0)
    progress.accepted = 5
    progress.failed = 1
    progress.retrying = 2
    clock.now += 1
    display.tick()
    display.message("rows.csv:3: skipped: bad")
    display.tick()
    display.finish()
    text = out.getvalue()
    assert text.count("\r\x1b[2K[") == 3
    assert "[##############----------]  60% 6/10" in text
    assert "failed 1" in text and "retrying 2" in text
    assert "\r\x1b[2Krows.csv:3: skipped: bad\n" in text
    assert text.endswith("\n")


def test_summary_table() -> None:
    progress = Progress(total=5, clock=Clock())
    progress.accepted = 3
    progress.failed = 1
    progress.deferred = 1
    progress.skipped = 2
    progress.earlier = 4
    progress.earlier_failed = 1
    progress.recipients = {"accepted": 3, "permanent": 1, "transient": 1}
    table = progress.summary()
    assert table.splitlines()[0] == "Summary"
    for text in (
        "accepted",
        "failed (permanent)",
        "failed (transient, retry with --resume)",
        "unknown (may have been delivered)",
        "bad rows skipped",
        "4 (1 of them refused)",
        "3 accepted, 1 permanent, 1 transient",
    ):
        assert text in table


@pytest.mark.parametrize("columns", [40, 80, 125, 200])
def test_tty_line_fits_the_terminal(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """Issue 13, item 10: a 125-column line wrapped on an 80-column terminal."""
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((columns, 24)))
    clock = Clock()
    progress = Progress(total=1_000_000, clock=clock)
    progress.skipped = 12_345
    progress.failed = 99_999
    out = io.StringIO()
    display = Display(progress, out, tty=True, interval=5.0)
    clock.now += 1.0
    progress.accepted += 123_456
    display.tick()
    display.finish()
    drawn = [part.split("\r\x1b[2K")[-1] for part in out.getvalue().split("\n") if part]
    assert drawn and all(len(line) < columns for line in drawn)
    assert all("%" in line for line in drawn)  # the most useful part stays
    if columns >= 200:
        assert drawn[-1].startswith("[")  # the bar, when there is room


@pytest.mark.parametrize(
    ("done", "seconds", "shown"),
    [(1, 5.0, "0.2 msg/s"), (3, 2.0, "1.5 msg/s"), (400, 10.0, "40 msg/s"), (0, 3.0, "0 msg/s")],
)
def test_a_slow_run_does_not_show_zero(done: int, seconds: float, shown: str) -> None:
    now = [0.0]
    progress = Progress(total=10, clock=lambda: now[0])
    progress.accepted = done
    now[0] = seconds
    (line,) = [x for x in progress.summary().splitlines() if x.startswith("rate")]
    assert line.split(None, 1)[1] == shown
