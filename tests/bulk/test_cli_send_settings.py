"""One validation for the command line and the config file, with upper bounds (issue 13, item 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from triomail._cli import main

TEMPLATE = "TO: {{email}}\nFROM: s@example.com\n\nHi\n"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rows = tmp_path / "rows.csv"
    rows.write_text("email\na@example.com\n")
    tpl = tmp_path / "t.txt"
    tpl.write_text(TEMPLATE)
    return rows, tpl


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ("connections = 100000", "connections must be 1 to 10000"),
        ("connections = 0", "connections must be 1 to 10000"),
        ("rate = -1.0", "rate must be"),
        ("retries = 5000", "retries must be 0 to 1000"),
        ("retry-backoff = 1e300", "retry-backoff must be"),
        ("progress_interval = nan", "progress_interval must be"),
        ("connections = 1e20", "wrong type"),
    ],
)
def test_config_file_values_get_the_command_lines_checks(
    files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    why: str,
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[send]\n{setting}\n")
    code = main(["send", *map(str, files), "--dry-run", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert why in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "10001", "10000000", "nan", "x"])
def test_connections_on_the_command_line_are_bounded(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["send", *map(str, files), "--dry-run", "--connections", value])
    assert exit_info.value.code == 2
    assert "--connections" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX open-file limit")
def test_connections_are_bounded_by_the_open_file_limit(files: tuple[Path, Path]) -> None:
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256));"
        "from triomail._cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["send", *map(str, files), "--dry-run", "--connections", "500"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "open-file limit allows (256, so at most 192)" in done.stderr
    ok = ["send", *map(str, files), "--dry-run", "--connections", "100"]
    done = subprocess.run(
        [sys.executable, "-c", code, *ok], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
