"""The policy brake (issue 14): a campaign that the server refuses for policy stops
sending, finishes what is on the wire, leaves the rest for ``--resume`` and exits 3
with the codes seen; rate limiting and address refusals do not trip it. Against the
capture server's faults."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_cli_send import send_async, server, write_rows

from triomail._bulk.brake import MIN_SEEN, WINDOW, Brake, is_policy
from triomail._bulk.settings import EXIT_BRAKE
from triomail._core.reply import Reply
from triomail._core.results import Outcome, RecipientResult
from triomail.testing import Fault, SMTPSink

ROWS = 400
TEMPLATE = "From: news@example.com\nTo: {{email}}\nSubject: Hi {{name}}\n\nHi.\n"


async def run(tmp_path: Path, sink: SMTPSink, *options: object) -> int:
    rows = write_rows(
        tmp_path / "rows.csv", [(f"u{i}@example.org", f"n{i}", str(i)) for i in range(ROWS)]
    )
    (tmp_path / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    url = server(sink).replace("smtp://", "smtp+plain://")
    return await send_async(
        rows, tmp_path / "t.txt", "--server", url, "--yes", "--journal", tmp_path / "j.db",
        "--connections", "2", "--retries", "0", *options,
    )  # fmt: skip


async def test_policy_refusals_stop_the_campaign_and_resume_continues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refuse = Fault("RCPT", code=550, text="5.7.26 unauthenticated mail is prohibited")
    async with SMTPSink(tls=False, faults=[refuse]) as sink:
        assert await run(tmp_path, sink) == EXIT_BRAKE
    err = capsys.readouterr().err
    assert "stopped by the policy brake: " in err and "5.7.26 x" in err
    assert "then --resume" in err
    states = dict(
        sqlite3.connect(tmp_path / "j.db").execute(
            "SELECT state, count(*) FROM messages GROUP BY state"
        )
    )
    refused = states.get("permanent", 0)
    assert MIN_SEEN <= refused < ROWS // 2  # stopped early, not at the end of the file
    assert states.get("in-flight", 0) == 0  # what was on the wire was finished
    async with SMTPSink(tls=False) as sink:
        status = await run(tmp_path, sink, "--resume")
        assert len(sink.messages) == ROWS - refused  # the rest, once the cause is fixed
    assert status == 1  # the refused ones stay refused (recorded)


@pytest.mark.parametrize(
    "fault",
    [
        Fault("RCPT", code=450, text="4.7.0 rate limit exceeded, try later", times=30),
        Fault("RCPT", code=550, text="5.1.1 no such user", times=30),
    ],
    ids=["rate-limiting", "address"],
)
async def test_other_refusals_do_not_trip_it(tmp_path: Path, fault: Fault) -> None:
    async with SMTPSink(tls=False, faults=[fault]) as sink:
        assert await run(tmp_path, sink) == 1
        assert len(sink.messages) == ROWS - 30


def test_the_window_slides() -> None:
    refused = (RecipientResult("a@b.c", Outcome.PERMANENT, Reply(550, ("policy",), (5, 7, 1))),)
    first = Brake(0.5)
    for _ in range(MIN_SEEN - 1):
        first.observe(refused)
    assert not first.tripped  # fewer than MIN_SEEN seen
    first.accepted()
    assert first.tripped
    tripped: list[bool] = []
    brake = Brake(0.5, on_trip=lambda: tripped.append(True))
    for _ in range(WINDOW):
        brake.accepted()
    for _ in range(WINDOW // 2 - 1):
        brake.observe(refused)
    assert not tripped
    for _ in range(WINDOW):
        brake.accepted()
    assert brake.count == 0  # the refusals slid out
    for _ in range(WINDOW // 2):
        brake.observe(refused)
    assert tripped == [True]
    limited = Reply(421, ("unusual rate of unsolicited mail",), (4, 7, 28))
    assert is_policy(RecipientResult("a@b.c", Outcome.TRANSIENT, limited))
    throttled = Reply(451, ("rate limit exceeded",), (4, 7, 0))
    assert not is_policy(RecipientResult("a@b.c", Outcome.TRANSIENT, throttled))
