"""`triomail send` through a few 421s completes promptly (issue 13, item 3).

200 rows over 10 connections, four 421 replies to the final dot: before the fix the
batch sat for the pool's 30 s idle timeout while progress showed ``retrying 0``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from triomail.testing import Fault, SMTPSink

ROWS = 200
#: Generous, and still well under the 30 s stall.
PROMPTLY = 25.0


async def test_send_with_a_few_421s_completes_promptly(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "email,name\n" + "".join(f"user{i}@example.com,User {i}\n" for i in range(ROWS)),
        encoding="utf-8",
    )
    template = tmp_path / "t.txt"
    template.write_text(
        "TO: {{name}} <{{email}}>\nSUBJECT: Hi\nFROM: s@example.com\n\nHi {{name}}\n",
        encoding="utf-8",
    )
    async with SMTPSink(faults=[Fault(".", code=421, times=4)]) as sink:
        assert sink.ca is not None
        ca = tmp_path / "ca.pem"
        sink.ca.cert_pem.write_to_path(str(ca))
        argv = [
            sys.executable, "-m", "triomail", "send", str(rows), str(template), "--server", f"smtp://{sink.host}:{sink.port}",
            "--ca-file", str(ca), "--yes", "--connections", "10",
            "--journal", str(tmp_path / "j"),
        ]  # fmt: skip
        # A process of its own: the deadline's cancellation ends it.
        with trio.fail_after(PROMPTLY):
            done = await trio.run_process(argv, stdout=subprocess.DEVNULL, check=False)
        delivered = sorted(m.rcpt_to[0] for m in sink.messages)
    assert done.returncode == 0
    assert delivered == sorted(f"user{i}@example.com" for i in range(ROWS))
