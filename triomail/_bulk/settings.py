"""The settings of one ``triomail send`` run: defaults < config file < environment <
command line.

Theory of operation
-------------------
:class:`SendSettings` is the one list of settings: its fields are the long options'
destinations (:mod:`.command` declares the options with their help), the keys a config
file may hold (``[send]`` table or top level; ``-`` or ``_``) and the ``TRIOMAIL_<OPTION>``
environment variables (:mod:`.config` finds them). Every value, wherever written, goes
through the same check (:data:`CHECKS`, the command line's ``type``); a path in a file is
taken relative to the file. Passwords are refused in files: they come from
``TRIOMAIL_PASSWORD``, ``--password-command`` or a prompt.

Anything wrong here, or later before the first message, is :class:`CannotRun`: one line
on stderr and exit status 2 (``EXIT_CANNOT_RUN``).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from .._client.options import Pipeline
from .config import (
    ENV_PREFIX,
    MAILMERGE_CONFIG,
    checked,
    discover_config,
    from_environment,
    load_toml,
    mailmerge_server,
)

__all__ = [
    "EXIT_BRAKE",
    "EXIT_CANNOT_RUN",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "CHECKS",
    "CHOICES",
    "DEFAULT_LEASE",
    "EXIT_OK",
    "JOURNAL_URL_SCHEMES",
    "PIPELINING_MODES",
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
#: The policy brake stopped the campaign (:mod:`.brake`).
EXIT_BRAKE = 3
EXIT_INTERRUPTED = 130

#: --render: where messages are rendered.
RENDER_MODES = ("auto", "process", "inline")
#: --pipelining: how connections pipeline (the modes of ``send_many``).
PIPELINING_MODES: tuple[str, ...] = get_args(Pipeline)
#: The settings that take one of a few words, for the command line and a config file.
CHOICES = {"render": RENDER_MODES, "pipelining": PIPELINING_MODES}


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


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text

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
    "render": _choice(RENDER_MODES),
    "pipelining": _choice(PIPELINING_MODES),
    "max_policy_rejections": _number(float, 0.1, 100),
    "lease": _number(float, 0.1, 86_400),
    "campaign_rate": _number(float, 1e-3, 1e6),
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
    server: list[str] | None = None
    sink: Path | None = None
    ca_file: Path | None = None
    attachments_dir: Path | None = None
    encoding: str | None = None
    dry_run: bool = False
    limit: int | None = None
    yes: bool = False
    verbose: bool = False
    password_command: str | None = None
    oauth_token_command: str | None = None
    show: int = 1
    connections: int = 10
    rate: float | None = None
    max_per_connection: int | None = None
    retries: int = 4
    retry_backoff: float = 1.0
    retry_max_backoff: float = 300.0
    # --- --pipelining (issue 17): the pool's start mode, PoolOptions.pipeline.
    pipelining: Pipeline = "cross"
    # ---
    report: Path | None = None
    journal: Path | str | None = None  # a path, or a postgresql:// URL
    resume: bool = False
    at_most_once: bool = False
    retry_refused: bool = False
    progress_interval: float = 5.0
    render: str = "auto"
    # -- deliverability (issue 14; options in command.py's DELIVER group) ------------------
    #: DKIM keys (PEM files) and their selectors, pairwise; the domain (default: From's).
    dkim_key: list[Path] | None = None
    dkim_selector: list[str] | None = None
    dkim_domain: str | None = None
    #: MAIL FROM, a template expression allowed (VERP); written as a Return-Path line.
    bounce_address: str | None = None
    #: RFC 8058 one-click URL (https) and mailto address, template expressions allowed.
    unsubscribe: str | None = None
    unsubscribe_mailto: str | None = None
    #: Lint warnings stop the run as errors do.
    strict: bool = False
    #: Addresses never mailed; where address-level permanent refusals are appended.
    exclude: Path | None = None
    suppress_to: Path | None = None
    #: The brake: percent of recent recipients refused for policy that stops sending.
    max_policy_rejections: float = 10.0
    #: Check the sending domain's SPF, DMARC and DKIM records first; with this name server.
    check_dns: bool = False
    dns_resolver: str | None = None
    # -- the shared journal (issue 15) --
    lease: float = DEFAULT_LEASE
    campaign_rate: float | None = None

    def journal_path(self) -> Path | str | None:
        """The journal: --journal (a file or a ``postgresql://`` URL), else a file next
        to the recipients file; None (in memory) with --sink, and always for a dry run,
        which never touches one."""
        if self.dry_run:
            return None
        if self.journal is None and self.sink is None:
            return self.recipients.with_name(self.recipients.name + ".journal.sqlite3")
        return self.journal

    def render_in_process(self) -> bool:
        """Render in a second process? (--render, the CPU count; never for a dry run)."""
        if self.dry_run or self.render == "inline":
            return False
        if os.name != "posix":  # the pipe is read with trio's wait_readable on its fd
            if self.render == "process":
                raise CannotRun("--render process needs a POSIX system; use --render inline")
            return False
        return self.render == "process" or (os.cpu_count() or 1) > 1


#: Every setting but the two positional arguments can come from a config file or the
#: environment: its name and its annotation (what :func:`.config.checked` checks).
SETTABLE = {
    f.name: str(f.type)
    for f in dataclasses.fields(SendSettings)
    if f.name not in ("recipients", "template")
}


def _layer(values: dict[str, Any], where: str, base: Path, prefix: str = "") -> dict[str, Any]:
    """A source's values (by name as written: ``retry-backoff``, ``TRIOMAIL_RETRIES``...)
    checked, as fields; CannotRun names the first wrong one as it was written."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = name.removeprefix(prefix).lower().replace("-", "_") if prefix else name
        key = key.replace("-", "_")
        if key == "password":
            raise CannotRun(f"{where}: passwords are not read from here; set TRIOMAIL_PASSWORD")
        kind = SETTABLE.get(key)
        if kind is None:
            raise CannotRun(f"{where}: unknown setting {name!r}")
        try:
            out[key] = checked(name, value, kind, CHECKS.get(key), where, base)
        except ValueError as exc:
            raise CannotRun(str(exc)) from None
    return out


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> SendSettings:
    """The settings of the parsed command line, checked together with the config file,
    the environment and mailmerge's server file (see :mod:`.config` for the order)."""
    environ = os.environ if environ is None else environ
    settings = SendSettings(recipients=args.recipients, template=args.template)
    layers: list[dict[str, Any]] = []
    config = args.config or discover_config(environ)
    if config is not None:
        try:
            values = load_toml(config)
        except ValueError as exc:
            raise CannotRun(str(exc)) from None
        layers.append(_layer(values, f"config {config}", config.parent))
    env = from_environment(environ, SETTABLE)
    layers.append(_layer(env, "environment", Path.cwd(), ENV_PREFIX))
    layers.append({k: v for k in SETTABLE if (v := getattr(args, k, None)) is not None})
    for layer in layers:
        for key, value in layer.items():
            setattr(settings, key, value)
    if (
        settings.server is None
        and settings.sink is None
        and not settings.dry_run
        and MAILMERGE_CONFIG.is_file()
    ):
        try:
            found = mailmerge_server(MAILMERGE_CONFIG)
        except ValueError as exc:
            raise CannotRun(str(exc)) from None
        settings.server = found["server"]
        if settings.rate is None and "rate" in found:
            settings.rate = found["rate"]
        print(f"triomail send: using the server in {MAILMERGE_CONFIG}", file=sys.stderr)
    _check_open_files(settings.connections)
    if settings.limit == 0:
        settings.limit = None  # --no-limit (--limit itself takes 1 or more)
    if settings.sink is not None and settings.server is not None and not settings.dry_run:
        raise CannotRun("give --server or --sink, not both")
    if settings.campaign_rate is not None and not is_url(settings.journal):
        raise CannotRun(
            "--campaign-rate needs a shared journal (--journal postgresql://...); "
            "one worker is paced by --rate"
        )
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
    for flag, given in (("--at-most-once", settings.at_most_once),
                        ("--retry-refused", settings.retry_refused)):  # fmt: skip
        if given and not settings.resume:
            raise CannotRun(f"{flag} only applies with --resume")
    if settings.resume and settings.journal is None and settings.sink is not None:
        raise CannotRun("--resume with --sink needs --journal (the default journal is in memory)")
    if settings.password_command and settings.oauth_token_command:
        raise CannotRun("give --password-command or --oauth-token-command, not both")
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
