"""``triomail send`` at a terminal: the password prompt and the confirmation.

The CLI runs as a child process whose stdin, stdout and stderr are a pseudo-terminal;
the test types into it like a user, while the capture server runs in the test's trio
loop. The password must be read with echo off and never appear on the terminal.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from triomail.testing import SMTPSink

TEMPLATE = """\
TO: {{email}}
SUBJECT: Hello {{name}}
FROM: Sender <sender@example.com>

Hi {{name}}.
"""

PASSWORD = "s3cret-Passw0rd"


def _files(tmp_path: Path, n: int, sink: SMTPSink) -> tuple[Path, Path, Path]:
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "email,name\n" + "".join(f"user{i}@example.com,User {i}\n" for i in range(n)),
        encoding="utf-8",
    )
    template = tmp_path / "template.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    ca = tmp_path / "ca.pem"
    assert sink.ca is not None
    sink.ca.cert_pem.write_to_path(str(ca))
    return rows, template, ca


class Terminal:
    """A child process on a pseudo-terminal, driven by blocking reads with a deadline."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k != "TRIOMAIL_PASSWORD"}
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.output = b""

    def expect(self, text: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal; it shows {self.output!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {text!r}: {self.output!r}")
                self.output += chunk

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        while True:  # what is left on the terminal
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                break
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        os.close(self.master)
        return code


def _argv(rows: Path, template: Path, ca: Path, sink: SMTPSink, journal: Path) -> list[str]:
    return [
        sys.executable, "-m", "triomail", "send", str(rows), str(template),
        "--server", f"smtp://ann@{sink.host}:{sink.port}", "--ca-file", str(ca),
        "--journal", str(journal),
    ]  # fmt: skip


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_password_prompt_without_echo_then_confirmation(tmp_path: Path, answer: str) -> None:
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        rows, template, ca = _files(tmp_path, 6, sink)  # more than a handful: confirm
        terminal = Terminal(_argv(rows, template, ca, sink, tmp_path / "j"), tmp_path)

        def converse() -> int:
            terminal.expect(b"password for ann on 127.0.0.1: ")
            terminal.type(PASSWORD)
            terminal.expect(f"through 127.0.0.1:{sink.port}? [y/N] ".encode())
            terminal.type(answer)
            return terminal.finish()

        code = await trio.to_thread.run_sync(converse)
        shown = terminal.output.decode("utf-8", "replace")
        assert f"[y/N] {answer}" in shown  # the terminal echoes what is typed ...
        assert PASSWORD not in shown  # ... except the password (R36: getpass, echo off)
        if answer == "y":
            assert code == 0, shown
            assert sink.received == 6
            assert all(m.authenticated_as == "ann" and m.tls for m in sink.messages)
        else:
            assert code == 2, shown
            assert "not confirmed; nothing was sent" in shown
            assert sink.received == 0


async def test_a_wrong_password_typed_at_the_prompt_exits_2(tmp_path: Path) -> None:
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        rows, template, ca = _files(tmp_path, 2, sink)  # a handful: no confirmation
        terminal = Terminal(_argv(rows, template, ca, sink, tmp_path / "j"), tmp_path)

        def converse() -> int:
            terminal.expect(b"password for ann on 127.0.0.1: ")
            terminal.type("wrong")
            return terminal.finish()

        code = await trio.to_thread.run_sync(converse)
        shown = terminal.output.decode("utf-8", "replace")
        assert code == 2, shown
        assert "authentication failed" in shown
        assert "Traceback" not in shown
        assert sink.received == 0


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_every_real_send_from_a_terminal_asks_first(tmp_path: Path, answer: str) -> None:
    """Even two messages (issue 13, item 11): the count, a sample recipient, the server."""
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        rows, template, ca = _files(tmp_path, 2, sink)
        terminal = Terminal(_argv(rows, template, ca, sink, tmp_path / "j"), tmp_path)

        def converse() -> int:
            terminal.expect(b"password for ann on 127.0.0.1: ")
            terminal.type(PASSWORD)
            question = (
                f"Send 2 message(s) (first to user0@example.com) through "
                f"127.0.0.1:{sink.port}? [y/N] "
            )
            terminal.expect(question.encode())
            terminal.type(answer)
            return terminal.finish()

        code = await trio.to_thread.run_sync(converse)
        shown = terminal.output.decode("utf-8", "replace")
        assert code == (0 if answer == "y" else 2), shown
        assert sink.received == (2 if answer == "y" else 0)


async def test_yes_sends_from_a_terminal_without_asking(tmp_path: Path) -> None:
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        rows, template, ca = _files(tmp_path, 2, sink)
        argv = [*_argv(rows, template, ca, sink, tmp_path / "j"), "--yes"]
        terminal = Terminal(argv, tmp_path)

        def converse() -> int:
            terminal.expect(b"password for ann on 127.0.0.1: ")
            terminal.type(PASSWORD)
            return terminal.finish()

        code = await trio.to_thread.run_sync(converse)
        shown = terminal.output.decode("utf-8", "replace")
        assert code == 0, shown
        assert "[y/N]" not in shown
        assert sink.received == 2


async def test_ctrl_c_at_the_question_sends_nothing(tmp_path: Path) -> None:
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        rows, template, ca = _files(tmp_path, 2, sink)
        terminal = Terminal(_argv(rows, template, ca, sink, tmp_path / "j"), tmp_path)

        def converse() -> int:
            terminal.expect(b"password for ann on 127.0.0.1: ")
            terminal.type(PASSWORD)
            terminal.expect(b"[y/N] ")
            terminal.proc.send_signal(signal.SIGINT)
            return terminal.finish(timeout=15)

        code = await trio.to_thread.run_sync(converse)
        shown = terminal.output.decode("utf-8", "replace")
        assert code == 130, shown
        assert "Traceback" not in shown
        assert sink.received == 0
