"""The pool's fault-injection soak (issue 4): 10,000 messages, ~5% faulty transactions."""

from __future__ import annotations

import logging

import pytest

from bench.soak import run_soak


@pytest.mark.parametrize("pipelined", [False, True], ids=["deadline", "pipelined"])
async def test_soak_loses_nothing_and_flags_every_duplicate(
    caplog: pytest.LogCaptureFixture, pipelined: bool
) -> None:
    caplog.set_level(logging.ERROR, logger="triomail")
    report = await run_soak(messages=10_000, share=0.05, seed=7, pipelined=pipelined)
    print("\n".join(report.lines()))
    assert report.faults_planned > 400  # the faults really were there
    assert report.lost == 0
    assert report.accepted_missing == 0
    assert report.unflagged_duplicates == 0
    assert report.retries > 0 and report.unknown_seen > 0
    assert sum(report.outcomes.values()) == 10_000
