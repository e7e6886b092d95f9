"""``triomail send --pipelining`` (issue 17): checked like every choice, and it reaches the
pool: against a server that closes the connection on anything pipelined behind an end
of data, ``within`` sends every message and the default ``cross`` cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from triomail._cli import main
from triomail.testing import Fault, SMTPSink

TEMPLATE = "TO: {{email}}\nFROM: s@example.com\nSUBJECT: {{n}}\n\nHi {{n}}\n"
N = 20


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rows = tmp_path / "rows.csv"
    rows.write_text("email,n\n" + "".join(f"u{i}@example.com,{i}\n" for i in range(N)))
    tpl = tmp_path / "t.txt"
    tpl.write_text(TEMPLATE)
    return rows, tpl


def test_an_unknown_mode_is_a_usage_error(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["send", *map(str, files), "--dry-run", "--pipelining", "fast"])
    assert exit_info.value.code == 2
    assert "--pipelining: must be one of cross, within, off, not 'fast'" in capsys.readouterr().err


def test_an_unknown_mode_in_a_config_file_is_one_line(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[send]\npipelining = "fast"\n')
    code = main(["send", *map(str, files), "--dry-run", "--config", str(config)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"triomail send: error: config {config}: pipelining must be one of cross, within, off, not 'fast'"
    )


@pytest.mark.parametrize("mode", ["within", None])
async def test_the_mode_reaches_the_pool(
    files: tuple[Path, Path], tmp_path: Path, mode: str | None
) -> None:
    chosen = ["--pipelining", mode] if mode else []
    async with SMTPSink(
        tls=False, hide_extensions=["CHUNKING"], faults=[Fault(".", forbid_pipelined=True)]
    ) as sink:
        argv = [
            "send", *map(str, files), "--server", f"smtp+plain://{sink.host}:{sink.port}",
            "--connections", "1", "--retries", "0", "--yes", "--journal", str(tmp_path / "j"), *chosen,
        ]  # fmt: skip
        code = await trio.to_thread.run_sync(lambda: main(argv))
    if mode == "within":
        assert (code, len(sink.messages)) == (0, N)
    else:  # cross: the end of data with an envelope behind it is refused, and so on
        assert code == 1
        assert len(sink.messages) < N
