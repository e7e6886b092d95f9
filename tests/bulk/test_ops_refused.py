"""Messages refused locally are checked again on --resume (issue 13, item 7).

A message the client refused before sending it (larger than the server's SIZE, a UTF-8
address for a server without SMTPUTF8) never reached a server: no server said no. Once
the user changed the server (or the message), ``--resume`` must send it. A refusal by
the server stays final, unless ``--retry-refused`` asks for it to be sent again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from triomail._cli import main
from triomail.testing import Fault, SMTPSink

TEMPLATE = "TO: {{email}}\nSUBJECT: Hi\nFROM: s@example.com\n\n{{body}}\n"


def _files(tmp_path: Path, rows: list[tuple[str, str]]) -> tuple[Path, Path]:
    data = tmp_path / "rows.csv"
    data.write_text("email,body\n" + "".join(f"{e},{b}\n" for e, b in rows), encoding="utf-8")
    template = tmp_path / "t.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    return data, template


async def _send(tmp_path: Path, sink: SMTPSink, data: Path, template: Path, *args: str) -> int:
    assert sink.ca is not None
    ca = tmp_path / "ca.pem"
    sink.ca.cert_pem.write_to_path(str(ca))
    argv = ["send", str(data), str(template), *args, "--server", f"smtp://{sink.host}:{sink.port}"]
    argv += ["--ca-file", str(ca), "--yes", "--retries", "0", "--journal", str(tmp_path / "j")]
    return await trio.to_thread.run_sync(main, argv)


@pytest.mark.parametrize(
    ("first", "row"),
    [
        ({"hide_extensions": ["SMTPUTF8"]}, ("jürgen@example.com", "hello")),
        ({"max_message_size": 400}, ("big@example.com", "x" * 600)),
    ],
    ids=["smtputf8", "size"],
)
async def test_a_local_refusal_is_sent_on_resume_once_the_server_changed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    first: dict[str, object],
    row: tuple[str, str],
) -> None:
    data, template = _files(tmp_path, [("ann@example.com", "hi"), row])
    async with SMTPSink(**first) as sink:  # type: ignore[arg-type]
        assert await _send(tmp_path, sink, data, template) == 1
        assert [m.rcpt_to for m in sink.messages] == [["ann@example.com"]]
    assert "rows.csv:3: permanent" in capsys.readouterr().err
    async with SMTPSink() as sink:  # SMTPUTF8 offered, the default SIZE
        assert await _send(tmp_path, sink, data, template, "--resume") == 0
        assert [m.rcpt_to for m in sink.messages] == [[row[0]]]
    out = capsys.readouterr()
    assert "refused locally earlier" in out.out + out.err


async def test_a_server_refusal_is_final_unless_retry_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, template = _files(tmp_path, [("ann@example.com", "hi"), ("bob@example.com", "hi")])
    faults = [Fault("RCPT", code=550, text="5.1.1 No such user", recipient="bob@example.com")]
    async with SMTPSink(faults=faults) as sink:
        assert await _send(tmp_path, sink, data, template) == 1
    async with SMTPSink() as sink:  # refused earlier, not resent: still a failed batch
        assert await _send(tmp_path, sink, data, template, "--resume") == 1
        assert sink.messages == []
    async with SMTPSink() as sink:
        assert await _send(tmp_path, sink, data, template, "--resume", "--retry-refused") == 0
        assert [m.rcpt_to for m in sink.messages] == [["bob@example.com"]]
    capsys.readouterr()


async def test_retry_refused_needs_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, template = _files(tmp_path, [("ann@example.com", "hi")])
    async with SMTPSink() as sink:
        assert await _send(tmp_path, sink, data, template, "--retry-refused") == 2
    assert "--retry-refused" in capsys.readouterr().err
