"""``triomail sink`` as a subprocess: first line gives the port, one line per message,
``.eml`` files, clean exit on SIGINT/SIGTERM; and the dispatcher in-process."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from triomail._cli import main

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: Hello CLI\r\n\r\n.dot\r\nbody\r\n"


class Running:
    """A ``triomail sink`` subprocess whose stdout is read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.pending = bytearray()

    async def line(self) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(10):
            while b"\n" not in self.pending:
                data = await self.process.stdout.receive_some()
                if not data:
                    raise EOFError(f"stdout closed; got {bytes(self.pending)!r}")
                self.pending += data
        end = self.pending.index(b"\n")
        text = self.pending[:end].decode()
        del self.pending[: end + 1]
        return text

    async def stop(self, signum: int) -> tuple[int, str]:
        self.process.send_signal(signum)
        assert self.process.stderr is not None
        errors = bytearray()
        with trio.fail_after(10):
            while data := await self.process.stderr.receive_some():
                errors += data
            code = await self.process.wait()
        return code, errors.decode()


@asynccontextmanager
async def sink_process(*args: str) -> AsyncIterator[tuple[Running, int]]:
    command = [sys.executable, "-m", "triomail", "sink", "--port", "0", *args]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        running = Running(process)
        try:
            first = await running.line()
            assert first.startswith("listening on 127.0.0.1:"), first
            yield running, int(first.rsplit(":", 1)[1])
        finally:
            if process.returncode is None:
                process.kill()


async def test_sink_command_prints_stores_and_stops_on_sigint(tmp_path: Path) -> None:
    out = tmp_path / "mail"
    async with sink_process("--no-tls", "--out", str(out)) as (running, port):
        assert await running.line() == f"writing messages to {out}"

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.net", "c@example.net"], MESSAGE)

        await trio.to_thread.run_sync(send)
        assert await running.line() == (
            f"from=<a@example.org> to=<b@example.net>,<c@example.net> size={len(MESSAGE)} "
            "subject='Hello CLI'"
        )
        code, errors = await running.stop(signal.SIGINT)
    assert code == 0
    assert "Traceback" not in errors
    assert errors.strip() == "stopped after 1 message(s)"
    [eml] = out.glob("*.eml")
    assert eml.read_bytes() == MESSAGE  # smtplib stuffed ".dot", the sink un-stuffed it


async def test_sink_command_with_starttls_and_auth(tmp_path: Path) -> None:
    async with sink_process("--tls", "--auth", "user:pa:ss") as (running, port):
        ca_line = await running.line()
        assert ca_line.startswith("STARTTLS on; CA certificate: ")
        ca_file = ca_line.split(": ", 1)[1]
        assert await running.line() == "AUTH PLAIN LOGIN for: user"
        context = ssl.create_default_context(cafile=ca_file)

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.starttls(context=context)
                client.login("user", "pa:ss")
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)

        await trio.to_thread.run_sync(send)
        assert (await running.line()).startswith("from=<a@example.org> to=<b@example.net>")
        code, errors = await running.stop(signal.SIGTERM)
    assert (code, "Traceback" in errors) == (0, False)


async def test_sink_command_implicit_tls(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    async with sink_process("--implicit-tls", "--ca-file", str(ca_file)) as (running, port):
        assert await running.line() == f"implicit TLS on; CA certificate: {ca_file}"
        context = ssl.create_default_context(cafile=str(ca_file))

        def send() -> None:
            with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)

        await trio.to_thread.run_sync(send)
        assert (await running.line()).startswith("from=<a@example.org>")
        code, _ = await running.stop(signal.SIGINT)
    assert code == 0
    assert ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "sink" in capsys.readouterr().err


def test_bad_auth_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sink", "--auth", "no-colon"])
    assert info.value.code == 2
    assert "expected USER:PASS" in capsys.readouterr().err


def test_port_in_use_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["sink", "--no-tls", "--port", str(port)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("triomail sink: ")
    assert "Traceback" not in error


def _talk(port: int, *writes: bytes) -> tuple[bytes, bool]:
    """Write each of ``writes`` (after the greeting, then after each reply group); the
    last reply group, and whether the server then closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = bytearray()

        def read_replies() -> bool:
            # A reply group ends with a line whose fourth octet is a space.
            while not re.search(rb"(^|\n)\d{3} [^\n]*\r\n$", bytes(got)):
                data = s.recv(65536)
                if not data:
                    return False
                got.extend(data)
            return True

        read_replies()
        for data in writes:
            s.sendall(data)
            del got[:]
            if not read_replies():
                break
        s.settimeout(1.0)
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        return bytes(got), closed


@pytest.mark.parametrize(
    ("flags", "last"),
    [
        ((), (b"554 5.5.0 Error: SMTP protocol synchronization\r\n", True)),
        (("--no-forbid-unauth-pipelining",), (b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n", False)),
    ],
)
async def test_sink_command_forbids_unauthorised_pipelining_unless_told(
    flags: tuple[str, ...], last: tuple[bytes, bool]
) -> None:
    async with sink_process("--no-tls", *flags) as (running, port):
        got = await trio.to_thread.run_sync(_talk, port, b"EHLO c.test\r\n", b"NOOP\r\nNOOP\r\n")
        await running.stop(signal.SIGTERM)
    assert got == last


async def test_sink_command_refuses_pipelining_after_data_as_haraka_does() -> None:
    envelope = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    async with sink_process("--no-tls", "--refuse-pipelined-after-data") as (running, port):
        got, closed = await trio.to_thread.run_sync(
            _talk, port, b"EHLO c.test\r\n", envelope, b"Subject: s\r\n\r\nx\r\n.\r\n" + envelope
        )
        await running.line()  # the message, printed
        await running.stop(signal.SIGTERM)
    refused = b"503 5.5.0 Bad sequence of commands - pipelined after end of DATA\r\n"
    assert got.startswith(b"250 2.0.0 Ok: queued")
    assert got.endswith(refused * 3)
    assert not closed
