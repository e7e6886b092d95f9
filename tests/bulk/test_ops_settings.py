"""Settings from the environment, a discovered config file and mailmerge's server file,
all through the command line's checks (issue 13, items 6 and 11)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from triomail._bulk.config import checked, mailmerge_server
from triomail._cli import main


def _shown(out: str) -> int:
    return out.count(">>> message")


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("TRIOMAIL_CONNECTIONS", "0", "environment: TRIOMAIL_CONNECTIONS must be 1 to 10000"),
        ("TRIOMAIL_CONNECTIONS", "1e20", "TRIOMAIL_CONNECTIONS not a number"),
        ("TRIOMAIL_RATE", "nan", "TRIOMAIL_RATE must be"),
        ("TRIOMAIL_DRY_RUN", "perhaps", "TRIOMAIL_DRY_RUN must be yes or no"),
        ("TRIOMAIL_RENDER", "fast", "TRIOMAIL_RENDER must be one of auto, process, inline"),
    ],
)
def test_environment_values_get_the_command_lines_checks(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    why: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["send", "rows.csv", "t.txt", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert why in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_command_line_beats_environment_beats_config_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "triomail.toml").write_text("dry-run = true\nshow = 2\n", encoding="utf-8")
    assert main(["send", "rows.csv", "t.txt"]) == 0  # ./triomail.toml found: a dry run
    assert _shown(capsys.readouterr().out) == 2
    monkeypatch.setenv("TRIOMAIL_SHOW", "3")
    assert main(["send", "rows.csv", "t.txt"]) == 0
    assert _shown(capsys.readouterr().out) == 3
    assert main(["send", "rows.csv", "t.txt", "--show", "1"]) == 0
    assert _shown(capsys.readouterr().out) == 1


def test_config_in_xdg_config_home_and_triomail_config(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    xdg = workdir / "xdg" / "triomail"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text("[send]\ndry_run = true\nshow = 4\n", encoding="utf-8")
    assert main(["send", "rows.csv", "t.txt"]) == 0
    assert _shown(capsys.readouterr().out) == 4
    # ./triomail.toml comes first; TRIOMAIL_CONFIG (like --config) names another.
    (workdir / "triomail.toml").write_text("dry-run = true\nshow = 2\n", encoding="utf-8")
    assert main(["send", "rows.csv", "t.txt"]) == 0
    assert _shown(capsys.readouterr().out) == 2
    other = workdir / "other.toml"
    other.write_text("dry-run = true\nshow = 3\n", encoding="utf-8")
    monkeypatch.setenv("TRIOMAIL_CONFIG", str(other))
    assert main(["send", "rows.csv", "t.txt"]) == 0
    assert _shown(capsys.readouterr().out) == 3


def test_a_config_can_list_several_servers(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "triomail.toml").write_text(
        'server = ["smtp://a.example:587", 7]\n', encoding="utf-8"
    )
    assert main(["send", "rows.csv", "t.txt", "--yes"]) == 2
    assert "server must be a string or a list of strings" in capsys.readouterr().err


def _mailmerge_sample(directory: Path) -> Path:
    """mailmerge's own sample files, written by mailmerge itself."""
    mailmerge = Path(sys.executable).with_name("mailmerge")
    subprocess.run([str(mailmerge), "--sample"], cwd=directory, check=True, capture_output=True)
    return directory / "mailmerge_server.conf"


def test_mailmerges_sample_server_file_is_read(tmp_path: Path) -> None:
    path = _mailmerge_sample(tmp_path)
    assert mailmerge_server(path) == {"server": ["smtps://YOUR_USERNAME_HERE@smtp.gmail.com:465"]}


@pytest.mark.parametrize(
    ("security", "url"),
    [
        ("STARTTLS", "smtp://me@mail.example:25"),
        ("PLAIN", "smtp+plain://me@mail.example:25"),
        ("XOAUTH", "smtp://me@mail.example:25?auth=xoauth2"),
        ("Never", "smtp+plain://me@mail.example:25"),
    ],
)
def test_mailmerge_security_values(tmp_path: Path, security: str, url: str) -> None:
    path = tmp_path / "mailmerge_server.conf"
    path.write_text(
        textwrap.dedent(f"""\
            [smtp_server]
            host = mail.example
            port = 25
            security = {security}
            username = me
            ratelimit = 30
        """),
        encoding="utf-8",
    )
    assert mailmerge_server(path) == {"server": [url], "rate": 0.5}


def test_a_broken_mailmerge_file_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "mailmerge_server.conf").write_text("[smtp_server]\nhost = x\n", encoding="utf-8")
    assert main(["send", "rows.csv", "t.txt", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "mailmerge_server.conf: No option 'port'" in err
    assert len(err.strip().splitlines()) == 1


def test_an_empty_variable_is_unset(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIOMAIL_CONNECTIONS", "")
    monkeypatch.setenv("TRIOMAIL_SERVER", "")
    assert main(["send", "rows.csv", "t.txt", "--dry-run"]) == 0
    capsys.readouterr()


def test_a_number_without_a_range_is_still_a_number() -> None:
    """An option added without an entry in CHECKS still gets a number, not a string."""
    assert checked("TRIOMAIL_X", "12", "int | None", None, "environment", Path()) == 12
    assert checked("x", 2, "float", None, "config f", Path()) == 2.0
    with pytest.raises(ValueError, match="environment: TRIOMAIL_X not a number: 'twelve'"):
        checked("TRIOMAIL_X", "twelve", "int | None", None, "environment", Path())
