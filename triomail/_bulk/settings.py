"""The settings of one ``triomail send`` run: defaults < config file < command line.

Theory of operation
-------------------
:class:`SendSettings` is the one list of settings: its fields are the long options'
destinations (:mod:`.command` declares the options with their help) and the keys a
``--config FILE.toml`` may hold (``[send]`` table or top level; ``-`` or ``_``). A config
value is checked against the field's type; a path is taken relative to the config
file. Passwords are refused in files: they come from ``TRIOMAIL_PASSWORD`` or a prompt.

Anything wrong here, or later before the first message, is :class:`CannotRun`: one line
on stderr and exit status 2 (``EXIT_CANNOT_RUN``).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "CHECKS",
    "DEFAULT_LEASE",
    "EXIT_OK",
    "JOURNAL_URL_SCHEMES",
    "RENDER_MODES",
    "CannotRun",
    "SendSettings",
    "is_url",
    "journal_target",
    "settings_from",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2
EXIT_INTERRUPTED = 130

#: --render: where messages are rendered.
RENDER_MODES = ("auto", "process", "inline")


#: ``--report -``: the report goes to standard output.
STDOUT = Path("-")


def _number(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    """A checker of one numeric setting: the command line's ``type``, the config's check."""

    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            bound = f"{kind(low)} to {kind(high)}" if high < math.inf else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    check.__name__ = kind.__name__  # argparse names the type in its error message
    return check


#: Every numeric setting's range, for the command line and a config file alike. The
#: bounds stop a typo (connections = 1e20) long before memory or the kernel would.
CHECKS: dict[str, Callable[[str], Any]] = {
    "limit": _number(int, 1, math.inf),
    "show": _number(int, 0, 1_000_000),
    "connections": _number(int, 1, 10_000),
    "rate": _number(float, 1e-6, 1e6),
    "max_per_connection": _number(int, 1, math.inf),
    "retries": _number(int, 0, 1_000),
    "retry_backoff": _number(float, 1e-3, 86_400),
    "retry_max_backoff": _number(float, 1e-3, 86_400),
    "progress_interval": _number(float, 1e-3, 86_400),
    # -- the shared journal (issue 15) --
    "lease": _number(float, 0.1, 86_400),
}
#: Descriptors kept free for the journal, the report, the render process and TLS.
_RESERVED_FILES = 64


#: --lease: seconds a worker of a shared journal holds a row it does not renew.
DEFAULT_LEASE = 60.0
#: The URL schemes of a shared (PostgreSQL) journal; anything else is a file path.
JOURNAL_URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: object) -> bool:
    """Is this ``--journal`` value a database URL (not a file path)?"""
    return isinstance(target, str) and target.startswith(JOURNAL_URL_SCHEMES)


def journal_target(text: str) -> Path | str:
    """``--journal``'s type: a ``postgresql://`` URL stays text, anything else is a path."""
    return text if is_url(text) else Path(text)


class CannotRun(Exception):
    """Exit 2 with this one-line message."""


@dataclass
class SendSettings:
    """The merged settings of one run (defaults < config file < command line)."""

    recipients: Path
    template: Path
    server: str | None = None
    sink: Path | None = None
    ca_file: Path | None = None
    attachments_dir: Path | None = None
    encoding: str | None = None
    dry_run: bool = False
    limit: int | None = None
    yes: bool = False
    show: int = 1
    connections: int = 10
    rate: float | None = None
    max_per_connection: int | None = None
    retries: int = 4
    retry_backoff: float = 1.0
    retry_max_backoff: float = 300.0
    report: Path | None = None
    journal: Path | str | None = None  # a path, or a postgresql:// URL
    resume: bool = False
    at_most_once: bool = False
    progress_interval: float = 5.0
    render: str = "auto"
    # -- the shared journal (issue 15) --
    lease: float = DEFAULT_LEASE

    def render_in_process(self) -> bool:
        """Render in a second process? (--render, the CPU count; never for a dry run)."""
        if self.dry_run or self.render == "inline":
            return False
        if os.name != "posix":  # the pipe is read with trio's wait_readable on its fd
            if self.render == "process":
                raise CannotRun("--render process needs a POSIX system; use --render inline")
            return False
        return self.render == "process" or (os.cpu_count() or 1) > 1


#: The TOML types a config value may have, by the field's annotation (a TOML integer
#: is a fine float; a path is a string).
_TOML_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "int | None": (int,),
    "float": (int, float),
    "float | None": (int, float),
    "str": (str,),
    "str | None": (str,),
    "Path | None": (str,),
    "Path | str | None": (str,),
}
#: Every setting but the two positional arguments can come from a config file.
_CONFIG_TYPES = {
    f.name: _TOML_TYPES[str(f.type)]
    for f in dataclasses.fields(SendSettings)
    if f.name not in ("recipients", "template")
}
_PATHS = {f.name for f in dataclasses.fields(SendSettings) if str(f.type).startswith("Path")}


def _load_config(path: Path) -> dict[str, Any]:
    import tomllib  # only when a config file is given

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CannotRun(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CannotRun(f"config {path}: {exc}") from None
    section = data.get("send", data)
    if not isinstance(section, dict):
        raise CannotRun(f"config {path}: [send] must be a table")
    out: dict[str, Any] = {}
    for raw_key, value in section.items():
        key = raw_key.replace("-", "_")
        if key == "send" and section is data:
            continue
        if key == "password":
            raise CannotRun(
                f"config {path}: passwords are not read from files; set TRIOMAIL_PASSWORD"
            )
        types = _CONFIG_TYPES.get(key)
        if types is None:
            raise CannotRun(f"config {path}: unknown setting {raw_key!r}")
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise CannotRun(f"config {path}: {raw_key} has the wrong type")
        if key in _PATHS and not is_url(value):
            value = (path.parent / Path(str(value)).expanduser()).resolve()
        check = CHECKS.get(key)
        if check is not None:
            try:
                value = check(str(value))
            except argparse.ArgumentTypeError as exc:
                raise CannotRun(f"config {path}: {raw_key} {exc}") from None
        if key == "render" and value not in RENDER_MODES:
            raise CannotRun(f"config {path}: render must be one of {', '.join(RENDER_MODES)}")
        out[key] = value
    return out


def settings_from(args: argparse.Namespace) -> SendSettings:
    """The settings of the parsed command line (and its ``--config``), checked together."""
    settings = SendSettings(recipients=args.recipients, template=args.template)
    if args.config is not None:
        for key, value in _load_config(args.config).items():
            setattr(settings, key, value)
    for f in dataclasses.fields(SendSettings):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(settings, f.name, value)
    _check_open_files(settings.connections)
    if settings.limit == 0:
        settings.limit = None  # --no-limit (--limit itself takes 1 or more)
    if settings.sink is not None and settings.server is not None and not settings.dry_run:
        raise CannotRun("give --server or --sink, not both")
    if settings.server is None and settings.sink is None and not settings.dry_run:
        raise CannotRun("no server: give --server URL, --config FILE.toml or --sink DIR")
    if settings.encoding is not None:
        try:
            codecs.lookup(settings.encoding)
        except LookupError:
            raise CannotRun(f"unknown encoding {settings.encoding!r}") from None
    report = settings.report
    fresh = not settings.resume and not settings.dry_run
    if fresh and report is not None and report != STDOUT and _non_empty(report):
        # A report is the record of a run: never replaced without a word (--resume appends).
        raise CannotRun(
            f"--report {report} exists; remove it, name another file, or add --resume "
            "to append to it"
        )
    if settings.at_most_once and not settings.resume:
        raise CannotRun("--at-most-once only applies with --resume")
    if settings.resume and settings.journal is None and settings.sink is not None:
        raise CannotRun("--resume with --sink needs --journal (the default journal is in memory)")
    return settings


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _check_open_files(connections: int) -> None:
    """Refuse more connections than the open-file limit leaves room for (one each)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    most = max(1, soft - _RESERVED_FILES)
    if connections > most:
        raise CannotRun(
            f"--connections {connections} is more than the open-file limit allows ({soft}, "
            f"so at most {most}); raise it with ulimit -n or give fewer connections"
        )
