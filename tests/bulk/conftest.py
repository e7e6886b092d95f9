"""Fixtures of the ``triomail send`` tests.

- ``workdir``: ``tmp_path`` as the current directory, with no config file, environment
  setting or password found but the test's own (the user's ``~/.config`` and
  ``TRIOMAIL_*`` variables stay out), holding ``rows.csv`` (``email,n``: four rows) and
  ``t.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEMPLATE = "TO: {{email}}\nFROM: s@example.com\nSUBJECT: Hi {{n}}\n\nHi\n"
ROWS = 4


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "rows.csv").write_text(
        "email,n\n" + "".join(f"u{i}@example.com,{i}\n" for i in range(ROWS)), encoding="utf-8"
    )
    (tmp_path / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in os.environ:
        if name.startswith("TRIOMAIL_"):
            monkeypatch.delenv(name)
    return tmp_path
