"""A recipients file and a template for the journal's end-to-end tests.

Row ``i`` is ``user{i}@example.com`` on line ``i + 2``, so a test tells rows apart by
the recipient a capture server saw.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TEMPLATE", "campaign_files"]

TEMPLATE = """\
TO: {{name}} <{{email}}>
SUBJECT: Hello {{name}}
FROM: Sender <sender@example.com>

Hi {{name}}, your number is {{number}}.
"""


def campaign_files(directory: Path, n: int) -> tuple[Path, Path]:
    """``rows.csv`` with ``n`` rows and ``template.txt`` in ``directory``."""
    rows = directory / "rows.csv"
    lines = ["email,name,number"] + [f"user{i}@example.com,User {i},{i}" for i in range(n)]
    rows.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tpl = directory / "template.txt"
    tpl.write_text(TEMPLATE, encoding="utf-8")
    return rows, tpl
