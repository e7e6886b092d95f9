"""docs/cli-reference.md is generated from the option list, and kept in step (issue 13).

Regenerate it with ``python -m triomail._bulk.reference > docs/cli-reference.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from triomail._bulk.command import OPTIONS, defaults
from triomail._bulk.reference import cli_reference
from triomail._bulk.settings import settings_from
from triomail._cli import build_parser

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli-reference.md"


def test_the_page_is_the_generated_one() -> None:
    assert PAGE.read_text(encoding="utf-8") == cli_reference(), (
        "docs/cli-reference.md is stale: python -m triomail._bulk.reference > docs/cli-reference.md"
    )


def test_every_option_of_the_parser_is_on_the_page() -> None:
    help_text = build_parser().parse_known_args(["send", "r", "t"])[0]
    assert help_text.command == "send"
    page = cli_reference()
    for option in OPTIONS:
        for flag in option.flags:
            assert f"`{flag}" in page
    # Every setting with a default is an option's destination, and vice versa.
    assert set(defaults()) <= {o.dest for o in OPTIONS} | {"recipients", "template"}


@pytest.mark.parametrize(
    ("argv", "dry_run", "limit"),
    [
        ([], False, None),
        (["--dry-run"], True, None),
        (["--no-dry-run"], False, None),
        (["--dry-run", "--no-dry-run"], False, None),
        (["--limit", "5"], False, 5),
        (["--limit", "5", "--no-limit"], False, None),
    ],
)
def test_mailmerge_spellings_are_accepted(
    argv: list[str], dry_run: bool, limit: int | None
) -> None:
    args = build_parser().parse_args(["send", "r.csv", "t.txt", "--sink", "out", *argv])
    settings = settings_from(args)
    assert (settings.dry_run, settings.limit) == (dry_run, limit)


def test_every_setting_has_its_environment_variable_on_the_page() -> None:
    page = cli_reference()
    for option in OPTIONS:
        if option.dest in defaults() and option.flags[0][2:].replace("-", "_") == option.dest:
            assert f"`TRIOMAIL_{option.dest.upper()}`" in page, option.flags
