"""docs/cli-reference.md, written from :data:`.command.OPTIONS` so it cannot drift.

``python -m triomail._bulk.reference > docs/cli-reference.md`` regenerates the page;
``tests/bulk/test_cli_reference.py`` fails when the page and the options differ.
Defaults come from :class:`.settings.SendSettings`; every long option is also a
``--config`` key (the option's name without its dashes).
"""

from __future__ import annotations

import sys
from typing import Any

from .command import DESCRIPTION, OPTIONS, POSITIONALS, Option, defaults
from .config import env_name

#: Environment variables ``triomail send`` reads besides one per option, and what for.
ENVIRONMENT = (
    ("TRIOMAIL_PASSWORD", "the password for AUTH (else --password-command, else a prompt)"),
    ("TRIOMAIL_CONFIG", "the config file, as --config (else ./triomail.toml, else "
     "$XDG_CONFIG_HOME/triomail/config.toml)"),
    ("XDG_CONFIG_HOME", "where the config file is looked for (default ~/.config)"),
)  # fmt: skip


def _default(option: Option, values: dict[str, Any]) -> str:
    kwargs = option.kwargs
    if kwargs.get("action") in ("store_false", "store_const"):
        return "—"
    value = values.get(option.dest)
    if value is None or value is False:
        return "—" if kwargs.get("action") != "store_true" else "off"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def cli_reference() -> str:
    """The page's Markdown."""
    values = defaults()
    out = [
        "# `triomail send` command-line reference",
        "",
        "<!-- Generated from triomail/_bulk/command.py by "
        "`python -m triomail._bulk.reference`; do not edit. -->",
        "",
        " ".join(DESCRIPTION.split()),
        "",
        "```",
        "triomail send [OPTIONS] " + " ".join(str(p.kwargs["metavar"]) for p in POSITIONALS),
        "```",
        "",
        "| Argument | Meaning |",
        "| --- | --- |",
    ]
    out += [f"| `{p.kwargs['metavar']}` | {_cell(p.kwargs['help'])} |" for p in POSITIONALS]
    group = None
    for option in OPTIONS:
        if option.group != group:
            group = option.group
            out += [
                "",
                f"## {group[0].upper()}{group[1:]}",
                "",
                "| Option | Default | Config key | Environment | Meaning |",
                "| --- | --- | --- | --- | --- |",
            ]
        metavar = option.kwargs.get("metavar")
        if "choices" in option.kwargs:
            metavar = "{" + ",".join(option.kwargs["choices"]) + "}"
        flags = ", ".join(f"`{f} {metavar}`" if metavar else f"`{f}`" for f in option.flags)
        key = option.dest if option.flags[0][2:].replace("-", "_") == option.dest else "—"
        if key == "config":
            key = "—"
        default = _default(option, values)
        env = f"`{env_name(key)}`" if key != "—" else "—"
        out.append(f"| {flags} | {default} | {f'`{key}`' if key != '—' else key} | {env} "
                   f"| {_cell(option.kwargs['help'])} |")  # fmt: skip
    out += ["", "## Environment", "", "| Variable | Meaning |", "| --- | --- |"]
    out += [f"| `{name}` | {meaning} |" for name, meaning in ENVIRONMENT]
    out += [
        "",
        "Each setting comes from, strongest first: the command line; its environment "
        "variable (yes/no settings take `yes`, `no`, `1`, `0`, `true`, `false`, `on`, "
        "`off`; `server` takes URLs separated by spaces); the config file (TOML, keys as "
        "above, optionally under `[send]`; `server` may be a list); the default. With no "
        "server from any of them, mailmerge's `mailmerge_server.conf` in the current "
        "directory is read. Every source goes through the same checks.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(cli_reference())
