"""``triomail send`` as a process: kill -9 and --resume, Ctrl-C, and real Postfix.

The capture server runs in the test's trio loop and ``python -m triomail send`` in a
child process, so the child can be killed or interrupted while the server keeps count.
Messages are identified by their Message-ID, which the journal keeps stable across
retries and runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from helpers.postfix import POSTFIX, PostfixInstance, _wait_greeting, start_postfix
from test_cli_send import (
    batch,
    ca_file,
    message_id,
    report_lines,
    server,
    sink_ids,
    sink_options,
)

from triomail._bulk.journal import Journal, Record
from triomail.testing import Fault, SMTPSink


class Child:
    """``python -m triomail send ...`` with its output in files."""

    def __init__(self, proc: trio.Process, out: Path, err: Path) -> None:
        self.proc = proc
        self.out = out
        self.err = err

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")


async def start(tmp_path: Path, name: str, *args: object) -> Child:
    out = tmp_path / f"{name}.out"
    err = tmp_path / f"{name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as o, err.open("wb") as e:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "triomail", "send", *(str(a) for a in args)],
            stdin=subprocess.DEVNULL,
            stdout=o,
            stderr=e,
            env=env,
        )
    return Child(proc, out, err)


async def finish(child: Child, timeout: float = 60.0) -> int:
    with trio.fail_after(timeout):
        return await child.proc.wait()


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling another process's output
            await trio.sleep(0.01)


def records(path: Path) -> list[Record]:
    journal, _ = Journal.open(path, resume=True)
    try:
        return journal.records()
    finally:
        journal.close()


def previous_unknown(report: Path) -> set[str]:
    return {
        x["message_id"]
        for x in report_lines(report)
        if x["type"] == "message" and x.get("previous") == "unknown"
    }


# --------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("render", ["process", "inline"])
async def test_kill_9_mid_batch_then_resume(tmp_path: Path, render: str) -> None:
    """Every row ends accepted exactly once, except rows whose outcome was unknown."""
    n = 150
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    report = tmp_path / "r.jsonl"
    async with SMTPSink(faults=[Fault(".", delay=0.02)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", journal, "--connections", "4", "--yes", "--render", render)
        child = await start(tmp_path, "first", *common)
        await wait_until(lambda: sink.received >= 40)
        child.proc.kill()
        assert await finish(child) == -signal.SIGKILL
        before = records(journal)
        in_flight = {r.message_id for r in before if r.state == "in-flight"}
        accepted = {r.message_id for r in before if r.state == "accepted"}
        assert accepted <= set(sink_ids(sink))  # nothing recorded accepted was not received
        assert in_flight  # the kill landed mid-batch
        child = await start(tmp_path, "resume", *common, "--resume", "--report", report)
        assert await finish(child) == 0, child.stderr
        assert f"{len(in_flight)} with an unknown outcome" in child.stderr
    after = records(journal)
    assert len(after) == n and all(r.state == "accepted" for r in after)
    counts = Counter(sink_ids(sink))
    assert set(counts) == {r.message_id for r in after}
    duplicated = {mid for mid, c in counts.items() if c > 1}
    assert all(c <= 2 for c in counts.values())
    assert duplicated <= in_flight
    assert duplicated <= previous_unknown(report)


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("render", ["process", "inline"])
async def test_ctrl_c_finishes_in_flight_then_resume(tmp_path: Path, render: str) -> None:
    """The first Ctrl-C stops reading rows; what the pool holds is sent and recorded."""
    n = 400
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    async with SMTPSink(faults=[Fault(".", delay=0.01)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", journal, "--connections", "2", "--yes", "--render", render)
        child = await start(tmp_path, "first", *common)
        await wait_until(lambda: sink.received >= 20)
        child.proc.send_signal(signal.SIGINT)
        assert await finish(child, 15) == 130, child.stderr
        assert "finishing the" in child.stderr
        assert "continue with --resume" in child.stderr
        assert "Traceback" not in child.stderr
        assert "Summary" in child.stdout
        state = Counter(r.state for r in records(journal))
        assert state["in-flight"] == 0  # every transaction on the wire was finished
        assert state["accepted"] == sink.received  # and recorded
        assert sink.received < n
        child = await start(tmp_path, "resume", *common, "--resume")
        assert await finish(child) == 0, child.stderr
    counts = Counter(sink_ids(sink))
    assert len(counts) == n and set(counts.values()) == {1}


async def test_ctrl_c_does_not_wait_for_a_server_gone_quiet(tmp_path: Path) -> None:
    """After some messages the server accepts new connections but never greets (its
    greeting timeout is minutes). The first Ctrl-C must not wait for that: what was
    sent is recorded, the rest is "not sent", and --resume sends each row once."""
    n = 60
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    async with SMTPSink(messages_per_connection=5) as sink, trio.open_nursery() as nursery:
        forwarded = 0

        async def quiet_after_three(client: trio.SocketStream) -> None:
            # A TCP relay to the sink for the server check and the first two pool
            # connections; later connections are accepted and left in silence.
            nonlocal forwarded
            if forwarded >= 3:
                async with client:
                    await trio.sleep_forever()
            forwarded += 1
            upstream = await trio.open_tcp_stream(sink.host, sink.port)

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await a.receive_some():
                        await b.send_all(data)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await b.send_eof()

            async with client, upstream, trio.open_nursery() as pumps:
                pumps.start_soon(pump, client, upstream)
                pumps.start_soon(pump, upstream, client)

        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, quiet_after_three, 0, host="127.0.0.1")
        )
        relay = f"smtp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        common = (rows, tpl, "--ca-file", ca_file(sink, tmp_path), "--journal", journal)
        common += ("--connections", "2", "--yes")
        child = await start(tmp_path, "first", *common, "--server", relay)
        await wait_until(lambda: forwarded >= 3 and sink.received >= 10)
        await trio.sleep(1.0)  # both workers now wait for a greeting that never comes
        sent = sink.received
        child.proc.send_signal(signal.SIGINT)
        assert await finish(child, 10) == 130, child.stderr
        assert "Traceback" not in child.stderr
        state = Counter(r.state for r in records(journal))
        assert state["in-flight"] == 0
        assert state["accepted"] == sent == sink.received
        child = await start(tmp_path, "resume", *common, "--server", server(sink), "--resume")
        assert await finish(child) == 0, child.stderr
        nursery.cancel_scope.cancel()
    counts = Counter(sink_ids(sink))
    assert len(counts) == n and set(counts.values()) == {1}


async def test_ctrl_c_records_a_retry_waiting_for_its_backoff_as_transient(
    tmp_path: Path,
) -> None:
    """Everything else is done; user0, refused 451, waits for a 60 s backoff. Ctrl-C
    does not wait for it: it was not delivered, so it is recorded as transient (not
    in-flight) and --resume --at-most-once sends it."""
    n = 20
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    faults = [
        Fault("RCPT", code=451, text="4.3.0 try later", recipient="user0@example.com", times=1)
    ]
    async with SMTPSink(faults=faults) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", journal, "--connections", "2", "--yes")
        child = await start(tmp_path, "first", *common, "--retry-backoff", "60")
        await wait_until(lambda: sink.received == n - 1)
        await trio.sleep(0.3)  # the last results are recorded
        child.proc.send_signal(signal.SIGINT)
        assert await finish(child, 10) == 130, child.stderr
        assert "Traceback" not in child.stderr
        [user0] = [r for r in records(journal) if r.line == 2]
        assert user0.state == "transient"
        child = await start(tmp_path, "resume", *common, "--resume", "--at-most-once")
        assert await finish(child) == 0, child.stderr
        assert "0 with an unknown outcome" in child.stderr
    assert all(r.state == "accepted" for r in records(journal))
    counts = Counter(sink_ids(sink))
    assert len(counts) == n and set(counts.values()) == {1}


async def test_second_ctrl_c_aborts(tmp_path: Path) -> None:
    n = 20
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    report = tmp_path / "r.jsonl"
    async with SMTPSink(faults=[Fault(".", delay=5.0, times=4)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", journal, "--connections", "4", "--yes")
        child = await start(tmp_path, "first", *common, "--report", report)
        await wait_until(lambda: sink.active_connections >= 4 and "capture" not in child.stderr)
        await trio.sleep(0.5)  # four final dots are out, their replies 5 s away
        child.proc.send_signal(signal.SIGINT)
        await wait_until(lambda: "press Ctrl-C again" in child.stderr, 10)
        child.proc.send_signal(signal.SIGINT)
        with trio.fail_after(3):  # well before the delayed replies
            assert await child.proc.wait() == 130
        assert "aborting" in child.stderr
        assert "Traceback" not in child.stderr
        before = records(journal)
        unknown = {r.message_id for r in before if r.state == "unknown"}
        assert len(unknown) >= 4  # cut off after the final dot: recorded as unknown
        cut = [x for x in report_lines(report) if x.get("note") == "cut off by an abort"]
        assert unknown <= {x["message_id"] for x in cut}
        # Messages the pool held without a result were not sent: transient, not in-flight.
        assert not [r for r in before if r.state == "in-flight"]
        child = await start(tmp_path, "resume", *common, "--resume")
        assert await finish(child) == 0, child.stderr
    counts = Counter(sink_ids(sink))
    assert len(counts) == n
    assert {mid for mid, c in counts.items() if c > 1} <= unknown


async def test_abort_records_held_messages_as_not_sent_for_at_most_once(tmp_path: Path) -> None:
    """The second Ctrl-C cuts off the transactions on the wire (unknown) while the pool
    still holds queued messages and a retry waiting for its backoff. Those were never
    delivered: they are recorded as transient, not left in-flight, so --resume
    --at-most-once sends them and skips only the unknown ones."""
    n = 80
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    report = tmp_path / "r.jsonl"
    faults = [
        # One message per connection: user0 is refused and waits for a 60 s backoff; the
        # next two final dots get their replies 5 s later, so the queue fills up.
        Fault("RCPT", code=451, text="4.3.0 try later", recipient="user0@example.com", times=1),
        Fault(".", delay=5.0, times=2),
    ]
    async with SMTPSink(faults=faults, hide_extensions=["CHUNKING"]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", journal, "--connections", "2", "--yes")
        first = (*common, "--max-per-connection", "1", "--retry-backoff", "60", "--report", report)
        child = await start(tmp_path, "first", *first)
        await wait_until(lambda: sink.active_connections >= 2)
        await trio.sleep(0.5)  # both delayed final dots are out
        child.proc.send_signal(signal.SIGINT)
        await wait_until(lambda: "press Ctrl-C again" in child.stderr, 10)
        child.proc.send_signal(signal.SIGINT)
        with trio.fail_after(3):  # well before the delayed replies
            assert await child.proc.wait() == 130
        assert "Traceback" not in child.stderr
        before = {r.message_id: r for r in records(journal)}
        state = Counter(r.state for r in before.values())
        assert state["in-flight"] == 0, state
        unknown = {mid for mid, r in before.items() if r.state == "unknown"}
        transient = {mid for mid, r in before.items() if r.state == "transient"}
        assert 1 <= len(unknown) <= 2  # past their final dot, one per connection
        assert len(transient) >= 16  # queued behind the stalled connections
        backoff = [r for r in before.values() if r.line == 2]  # user0, waiting to retry
        assert [r.state for r in backoff] == ["transient"]
        lines = report_lines(report)
        messages = {x["message_id"]: x for x in lines if x["type"] == "message"}
        never = transient - {backoff[0].message_id}
        assert all(messages[mid]["error"].startswith("not sent") for mid in never)
        # The one waiting to retry carries its last attempt's reply.
        assert messages[backoff[0].message_id]["error"].startswith("not sent again")
        [rcpt] = [x for x in lines if x.get("recipient") == "user0@example.com"]
        assert rcpt["outcome"] == "transient" and rcpt["code"] == 451
        summary = re.search(r"failed \(transient, retry with --resume\)\s+(\d+)", child.stdout)
        assert summary is not None and int(summary.group(1)) == len(transient)
        summary = re.search(r"unknown \(may have been delivered\)\s+(\d+)", child.stdout)
        assert summary is not None and int(summary.group(1)) == len(unknown)

        child = await start(tmp_path, "resume", *common, "--resume", "--at-most-once")
        assert await finish(child) == 1, child.stderr  # the unknown ones were skipped
        assert f"{len(unknown)} with an unknown outcome: skipped" in child.stderr
    after = {r.message_id: r.state for r in records(journal)}
    assert len(after) == n
    assert {mid for mid, s in after.items() if s != "accepted"} == unknown
    counts = Counter(sink_ids(sink))
    assert set(counts.values()) == {1}  # at most once
    assert set(counts) >= set(after) - unknown  # every message never delivered was sent


# --------------------------------------------------------------------------- Postfix


def _postfix_ca(pf: PostfixInstance, tmp_path: Path) -> Path:
    path = tmp_path / "postfix-ca.pem"
    pf.ca.cert_pem.write_to_path(str(path))
    return path


async def test_against_postfix(postfix_store: PostfixInstance, tmp_path: Path) -> None:
    rows, tpl = batch(tmp_path, 25)
    cp = postfix_store.checkpoint()
    child = await start(
        tmp_path, "pf", rows, tpl, "--server", f"smtp://127.0.0.1:{postfix_store.port}",
        "--ca-file", _postfix_ca(postfix_store, tmp_path), "--yes", "--connections", "5",
    )  # fmt: skip
    assert await finish(child) == 0, child.stderr
    stored = await postfix_store.await_received(25, since=cp)
    ids = [message_id(m.raw.replace(b"\n", b"\r\n")) for m in stored]
    assert len(set(ids)) == 25
    assert sorted(m.recipients[0] for m in stored) == sorted(
        f"user{i}@example.com" for i in range(25)
    )


@pytest.mark.skipif(not POSTFIX.exists(), reason="postfix not installed")
async def test_postfix_stopped_mid_batch_then_resume(tls_ca: trustme.CA, tmp_path: Path) -> None:
    n = 120
    rows, tpl = batch(tmp_path, n)
    journal = tmp_path / "j.sqlite3"
    report = tmp_path / "r.jsonl"
    with start_postfix(tls_ca, mode="store") as pf:
        config = str(pf.config_directory)
        common = (rows, tpl, "--server", f"smtp://127.0.0.1:{pf.port}")
        common += ("--ca-file", _postfix_ca(pf, tmp_path), "--journal", journal, "--yes")
        common += ("--retries", "2", "--retry-backoff", "0.1", "--retry-max-backoff", "0.3")
        child = await start(tmp_path, "first", *common, "--rate", "40", "--connections", "4")
        await pf.await_received(20, timeout=20)
        await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [str(POSTFIX), "-c", config, "stop"], check=True, capture_output=True
            )
        )
        assert await finish(child) == 1, child.stderr
        first = records(journal)
        transient = [r for r in first if r.state == "transient"]
        assert transient, Counter(r.state for r in first)
        assert "retry with --resume" in child.stdout
        # A stopped server can cut a transaction after its final dot: unknown (R37).
        unknown = {r.message_id for r in first if r.state in ("unknown", "in-flight")}
        await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [str(POSTFIX), "-c", config, "start"], check=True, capture_output=True
            )
        )
        await trio.to_thread.run_sync(_wait_greeting, pf, 30.0)
        child = await start(tmp_path, "resume", *common, "--resume", "--report", report)
        assert await finish(child) == 0, child.stderr
        assert all(r.state == "accepted" for r in records(journal))
        # Postfix itself may deliver a queued message again after an abrupt stop (same
        # queue ID); triomail sending it twice means two transactions (two queue IDs).
        # Such a copy counts towards n, so wait on until n distinct messages are stored.
        stored = await pf.await_received(n, timeout=30)
        transactions: dict[str, set[str]] = {}
        while True:
            transactions.clear()
            for m in stored:
                mid = message_id(m.raw.replace(b"\n", b"\r\n"))
                transactions.setdefault(mid, set()).add(m.queue_id)
            if len(transactions) >= n or len(stored) >= 2 * n:
                break
            stored = await pf.await_received(len(stored) + 1, timeout=30)
        assert len(transactions) == n
        assert {mid for mid, q in transactions.items() if len(q) > 1} <= unknown
        resent = {x["message_id"] for x in report_lines(report) if x["type"] == "message"}
        assert not resent & {r.message_id for r in first if r.state == "accepted"}


async def test_report_reaches_the_disk_while_the_batch_runs(tmp_path: Path) -> None:
    """Report lines are written every progress tick: kill -9 loses at most a second."""
    rows, tpl = batch(tmp_path, 400)
    report = tmp_path / "r.jsonl"
    async with SMTPSink(faults=[Fault(".", delay=0.02)]) as sink:
        common = (rows, tpl, *sink_options(sink, tmp_path))
        common += ("--journal", tmp_path / "j.sqlite3", "--connections", "2", "--yes")
        child = await start(tmp_path, "first", *common, "--report", report)
        await wait_until(lambda: sink.received >= 30)
        await trio.sleep(1.5)  # more than a tick (1 s when stderr is not a terminal)
        accepted = sink.received
        child.proc.kill()
        assert await finish(child) == -signal.SIGKILL
    # Complete lines only: the kill may cut the last one.
    lines = report.read_text(encoding="utf-8").split("\n")[:-1]
    written = [x for x in map(json.loads, lines) if x["type"] == "message"]
    assert accepted >= 30 and len(written) >= 20
    assert all(x["outcome"] == "accepted" for x in written)
