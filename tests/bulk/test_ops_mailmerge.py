"""A mailmerge user's habits (issue 13, item 11): mailmerge_server.conf, -v, secret
commands, several servers, ``--resume N`` and ``triomail init``; against the capture
server."""

from __future__ import annotations

import base64
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from helpers.certs import server_ssl_context
from helpers.postfix import free_loopback_port

from triomail._bulk.servers import run_secret_command, servers
from triomail._bulk.settings import CannotRun, SendSettings
from triomail._cli import main
from triomail.testing import SMTPSink

PASSWORD = "s3cret-Passw0rd"


def _ca(workdir: Path, sink: SMTPSink) -> str:
    assert sink.ca is not None
    sink.ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return str(workdir / "ca.pem")


def _python(code: str) -> str:
    """A command line that runs ``code`` with this Python (no shell involved)."""
    return shlex.join([sys.executable, "-c", code])


async def test_mailmerge_server_conf_is_used_with_verbose_transcript(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIOMAIL_PASSWORD", PASSWORD)
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        (workdir / "mailmerge_server.conf").write_text(
            textwrap.dedent(f"""\
                # Mailmerge SMTP Server Config
                [smtp_server]
                host = {sink.host}
                port = {sink.port}
                security = STARTTLS
                username = ann
                ratelimit = 0
            """),
            encoding="utf-8",
        )
        argv = ["send", "rows.csv", "t.txt", "--ca-file", _ca(workdir, sink), "--yes", "-v"]
        code = await trio.to_thread.run_sync(main, argv)
        assert code == 0
        assert sink.received == 4
        assert all(m.authenticated_as == "ann" for m in sink.messages)
    err = capsys.readouterr().err
    assert "using the server in mailmerge_server.conf" in err
    assert "MAIL FROM:<s@example.com>" in err  # the transcript
    assert "AUTH PLAIN <redacted>" in err
    assert PASSWORD not in err


async def test_password_command(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with SMTPSink(auth={"ann": PASSWORD}) as sink:
        ca = _ca(workdir, sink)
        server = f"smtp://ann@{sink.host}:{sink.port}"
        command = _python(f"print({PASSWORD!r}); print('second line, ignored')")
        argv = ["send", "rows.csv", "t.txt", "--server", server, "--ca-file", ca, "--yes"]
        code = await trio.to_thread.run_sync(main, [*argv, "--password-command", command])
        assert code == 0
        assert sink.received == 4
    assert PASSWORD not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "why"),
    [
        (
            _python("import sys; print('no', file=sys.stderr); sys.exit(3)"),
            "exited with status 3: no",
        ),
        ("/no/such/program --flag", "/no/such/program: command not found"),
        (_python("pass"), "printed nothing"),
        ("'unclosed", "No closing quotation"),
    ],
)
def test_a_failing_password_command_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str, why: str
) -> None:
    argv = ["send", "rows.csv", "t.txt", "--server", "smtp://ann@127.0.0.1:1", "--yes"]
    assert main([*argv, "--password-command", command]) == 2
    err = capsys.readouterr().err
    assert "error: --password-command: " in err and why in err
    assert len(err.strip().splitlines()) == 1


async def test_oauth_token_command_gives_an_xoauth2_token_source(workdir: Path) -> None:
    settings = SendSettings(
        recipients=workdir / "rows.csv",
        template=workdir / "t.txt",
        server=["smtp://ann@mail.example:587", "smtps://ann@backup.example:465?weight=3"],
        oauth_token_command=_python("print('tok-123')"),
    )
    found = servers(settings)
    assert [(s.host, s.weight) for s in found] == [("mail.example", 1.0), ("backup.example", 3.0)]
    for server in found:
        source = server.oauth_token
        assert callable(source)
        assert await source() == "tok-123"
        assert server.password is None


def test_secret_commands_run_without_a_shell(workdir: Path) -> None:
    # A shell would expand $HOME and run the second command.
    echo = _python("import sys; print(' '.join(sys.argv[1:]))")
    assert run_secret_command(f"{echo} '$HOME' ';' rm -rf x", "--password-command") == (
        "$HOME ; rm -rf x"
    )
    with pytest.raises(CannotRun):
        run_secret_command("", "--password-command")


async def test_several_servers_fail_over(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    down = f"smtp://127.0.0.1:{free_loopback_port()}"
    async with SMTPSink() as sink:
        up = f"smtp://{sink.host}:{sink.port}?weight=2&max_connections=2"
        argv = ["send", "rows.csv", "t.txt", "--server", down, "--server", up]
        argv += ["--ca-file", _ca(workdir, sink), "--yes", "--retry-backoff", "0.05"]
        code = await trio.to_thread.run_sync(main, argv)
        assert code == 0
        assert sink.received == 4
    assert "the others are used" in capsys.readouterr().err


async def test_resume_n_as_mailmerge_spells_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with SMTPSink() as sink:
        base = ["--server", f"smtp://{sink.host}:{sink.port}", "--ca-file", _ca(workdir, sink)]
        # No journal yet: a row number cannot be honoured safely; one line says why.
        code = await trio.to_thread.run_sync(
            main, ["send", "--resume", "2", "rows.csv", "t.txt", *base]
        )
        assert code == 2
        err = capsys.readouterr().err
        assert "--resume 2: no journal" in err and "remove the first 1 row(s)" in err
        assert await trio.to_thread.run_sync(main, ["send", "rows.csv", "t.txt", *base]) == 0
        code = await trio.to_thread.run_sync(
            main, ["send", "rows.csv", "t.txt", "--resume", "2", *base]
        )
        assert code == 0
        assert sink.received == 4  # nothing twice
    assert "--resume 2: the journal" in capsys.readouterr().err


def test_init_writes_files_that_a_dry_run_accepts(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "start"]) == 0
    monkeypatch.chdir(workdir / "start")
    assert main(["send", "--dry-run", "--show", "2", "recipients.csv", "template.txt"]) == 0
    out = capsys.readouterr().out
    assert "to myself@example.com" in out and '"Smith, Bob" <bob@example.com>' in out
    monkeypatch.chdir(workdir)
    assert main(["init", "start"]) == 2  # never over a file
    assert "start/template.txt exists; nothing was written" in capsys.readouterr().err


class _XOAuth2Handler:
    """aiosmtpd handler: AUTH XOAUTH2 (RFC 7628's framing, as Gmail and Microsoft take
    it) with one valid token; every message recorded."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[str] = []
        self.messages = 0

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) != 2:
            return AuthResult(success=False, handled=False)
        fields = base64.b64decode(args[1]).decode().split("\x01")
        self.seen.append(fields[1])
        return AuthResult(success=fields == ["user=ann", f"auth=Bearer {self.token}", "", ""])

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 2.0.0 OK"


async def test_oauth_token_command_against_aiosmtpd(workdir: Path, tls_ca: trustme.CA) -> None:
    handler = _XOAuth2Handler("tok-123")
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_loopback_port(),
        tls_context=server_ssl_context(tls_ca),
        require_starttls=True,
    )
    controller.start()
    try:
        tls_ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        argv = ["send", "rows.csv", "t.txt", "--server", f"smtp://ann@127.0.0.1:{controller.port}"]
        argv += ["--ca-file", "ca.pem", "--yes", "--connections", "2"]
        argv += ["--oauth-token-command", _python("print('tok-123')")]
        assert await trio.to_thread.run_sync(main, argv) == 0
    finally:
        controller.stop()
    assert handler.messages == 4
    assert set(handler.seen) == {"auth=Bearer tok-123"}
