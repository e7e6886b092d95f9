"""``triomail init [DIR]``: a sample template, recipients file and config to start from.

As ``mailmerge --sample`` does for a mailmerge user, it writes three files that work
together at once: ``triomail send --dry-run recipients.csv template.txt``, run in DIR,
renders both sample messages (the config found there, ``triomail.toml``, is read as
any ``triomail send`` reads it). An existing file is never replaced: the command says
which one and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .command import Subcommands

__all__ = ["SAMPLES", "register"]

_TEMPLATE = """\
TO: {{name}} <{{email}}>
SUBJECT: Hello {{name}}
FROM: My Self <myself@example.com>
CONTENT-TYPE: text/markdown

Hi **{{name}}**,

your number is {{number}}.
"""

_RECIPIENTS = """\
email,name,number
myself@example.com,My Self,17
bob@example.com,"Smith, Bob",42
"""

_CONFIG = """\
# triomail send reads this file when it is run in this directory (./triomail.toml).
# Every long option of `triomail send --help` can be set here; the command line and
# the TRIOMAIL_<OPTION> environment variables win. Passwords are never read from a file:
# use TRIOMAIL_PASSWORD, password-command or the prompt.

# The server: smtp:// is STARTTLS, smtps:// implicit TLS. Repeat it in a list to fail
# over: server = ["smtp://me@a.example.com:587", "smtp://me@b.example.com:587?weight=2"]
server = "smtp://YOUR_USERNAME@smtp.example.com:587"
# password-command = "pass show smtp/example"
connections = 4
# rate = 2.0          # messages per second at most
# report = "sent.jsonl"
"""

#: The files written, by name.
SAMPLES = {
    "template.txt": _TEMPLATE,
    "recipients.csv": _RECIPIENTS,
    "triomail.toml": _CONFIG,
}


def register(subparsers: Subcommands) -> None:
    """Add the ``init`` subcommand."""
    p = subparsers.add_parser(
        "init",
        help="write a sample template, recipients file and config to start from",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument(
        "directory", nargs="?", type=Path, default=Path("."), metavar="DIR",
        help="where to write them (created if need be; default: here)",
    )  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    taken = [name for name in SAMPLES if (directory / name).exists()]
    if taken:
        print(
            f"triomail init: error: {directory / taken[0]} exists; nothing was written "
            "(remove it or give another DIR)",
            file=sys.stderr,
        )
        return 2
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in SAMPLES.items():
            (directory / name).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"triomail init: error: {directory}: {exc.strerror}", file=sys.stderr)
        return 2
    for name in SAMPLES:
        print(f"wrote {directory / name}")
    where = "" if directory == Path(".") else f"cd {directory} && "
    print(f"edit them, then check with: {where}triomail send --dry-run recipients.csv template.txt")
    return 0
