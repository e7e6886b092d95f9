"""Where ``triomail send``'s settings come from besides the command line.

Theory of operation
-------------------
Each source gives a plain ``{field: value}`` layer, every value checked by the one
function :func:`checked` (the command line's own checks, :data:`.settings.CHECKS`), so a
value is refused with the same words wherever it was written. From weakest to strongest:

1. ``mailmerge_server.conf`` in the current directory, mailmerge's own file (its
   ``[smtp_server]`` ``host``, ``port``, ``security``, ``username`` and ``ratelimit``):
   used only when nothing else names a server, so that a mailmerge user's directory
   works as it is;
2. a TOML config file: ``--config FILE`` (or ``TRIOMAIL_CONFIG``), else the first of
   ``./triomail.toml`` and ``$XDG_CONFIG_HOME/triomail/config.toml`` (``~/.config``
   when unset) that exists, the places a user looks first (XDG Base Directory
   Specification);
3. the environment: ``TRIOMAIL_<OPTION>`` for every long option (``--dry-run`` is
   ``TRIOMAIL_DRY_RUN``), as a script or a container sets them;
4. the command line, which wins (:func:`.settings.settings_from`).

Passwords are never read from a file or from ``TRIOMAIL_<OPTION>``: ``TRIOMAIL_PASSWORD``
(not an option), ``--password-command`` or a prompt.
"""

from __future__ import annotations

import argparse
import configparser
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_PLACES",
    "ENV_PREFIX",
    "MAILMERGE_CONFIG",
    "checked",
    "discover_config",
    "env_name",
    "from_environment",
    "load_toml",
    "mailmerge_server",
]

#: Every option's environment variable is this prefix and its name in capitals.
ENV_PREFIX = "TRIOMAIL_"
#: mailmerge's server file, read from the current directory as mailmerge does.
MAILMERGE_CONFIG = Path("mailmerge_server.conf")
#: Where a config file is looked for when none is named, first found wins ({xdg}:
#: $XDG_CONFIG_HOME, else ~/.config).
CONFIG_PLACES = ("./triomail.toml", "{xdg}/triomail/config.toml")
#: How a yes/no setting may be written in the environment.
_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(dest: str) -> str:
    """``connections`` -> ``TRIOMAIL_CONNECTIONS``."""
    return ENV_PREFIX + dest.upper()


def checked(
    name: str,
    value: object,
    kind: str,
    check: Callable[[str], Any] | None,
    where: str,
    base: Path,
) -> Any:
    """``value`` for the setting ``name`` (as written; its field's annotation is
    ``kind``), checked, or ValueError with the one line to show. ``base``: what a
    relative path is relative to."""
    if kind == "bool":
        if isinstance(value, str):
            text = value.strip().lower()
            if text not in _YES + _NO:
                raise ValueError(f"{where}: {name} must be yes or no, not {value!r}")
            value = text in _YES
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} has the wrong type")
        return value
    if kind.startswith("list"):
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items) or not items:
            raise ValueError(f"{where}: {name} must be a string or a list of strings")
        if kind.startswith("list[Path]"):
            return [(base / Path(item).expanduser()).resolve() for item in items]
        return items
    numeric = kind.startswith(("int", "float"))
    allowed: tuple[type, ...] = (str,)
    if numeric:  # a TOML integer is a fine float; a float is no int (connections = 1e20)
        allowed = (str, int) if kind.startswith("int") else (str, int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{where}: {name} has the wrong type")
    if kind.startswith("Path"):
        if "str" in kind and "://" in str(value):  # a path or a URL (--journal)
            return value
        return (base / Path(str(value)).expanduser()).resolve()
    if check is not None:
        try:
            return check(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{where}: {name} {exc}") from None
    if numeric:  # a number without a range of its own (a string from the environment)
        try:
            return int(str(value)) if kind.startswith("int") else float(str(value))
        except ValueError:
            raise ValueError(f"{where}: {name} not a number: {value!r}") from None
    return value


def load_toml(path: Path) -> dict[str, Any]:
    """The ``[send]`` table (or the top level) of a TOML file, unchecked; ValueError."""
    import tomllib  # only when a config file is read

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {path}: {exc}") from None
    section = data.get("send", data)
    if not isinstance(section, dict):
        raise ValueError(f"config {path}: [send] must be a table")
    if section is data:
        section = {k: v for k, v in data.items() if k != "send"}
    return section


def discover_config(environ: Mapping[str, str]) -> Path | None:
    """The config file to read when none is named: see :data:`CONFIG_PLACES`."""
    named = environ.get(env_name("config"))
    if named:
        return Path(named).expanduser()
    xdg = environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    for place in CONFIG_PLACES:
        path = Path(place.format(xdg=xdg))
        if path.is_file():
            return path
    return None


def from_environment(environ: Mapping[str, str], fields: Mapping[str, str]) -> dict[str, str]:
    """``{variable: text}`` for each ``TRIOMAIL_<OPTION>`` set and not empty, of the settable
    ``fields`` (``TRIOMAIL_CONFIG`` is read by :func:`discover_config`); checked by the
    caller with :func:`checked`."""
    names = [env_name(name) for name in fields]
    # An empty variable is an unset one, as shells and container files mean it.
    return {name: environ[name] for name in names if environ.get(name)}


def mailmerge_server(path: Path) -> dict[str, Any]:
    """``server`` (a URL) and ``rate`` from mailmerge's ``[smtp_server]``; ValueError.

    ``security``: ``SSL/TLS`` is implicit TLS (``smtps://``), ``STARTTLS`` is
    ``smtp://``, ``PLAIN`` and none (``Never``) are ``smtp+plain://``; ``XOAUTH`` is
    STARTTLS with the secret used as an OAuth 2.0 token (``?auth=xoauth2``).
    ``ratelimit`` is messages per minute (0: none).
    """
    parser = configparser.ConfigParser()
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
        host = parser.get("smtp_server", "host")
        port = parser.getint("smtp_server", "port")
        security = parser.get("smtp_server", "security", fallback="Never")
        username = parser.get("smtp_server", "username", fallback=None)
        ratelimit = parser.getint("smtp_server", "ratelimit", fallback=0)
    except (OSError, UnicodeDecodeError, configparser.Error, ValueError) as exc:
        raise ValueError(f"{path}: {' '.join(str(exc).split())}") from None
    schemes = {
        "SSL/TLS": "smtps",
        "STARTTLS": "smtp",
        "XOAUTH": "smtp",
        "PLAIN": "smtp+plain",
        "Never": "smtp+plain",
    }
    scheme = schemes.get(security)
    if scheme is None:
        raise ValueError(f"{path}: unknown security {security!r}; use one of {sorted(schemes)}")
    user = f"{username}@" if username else ""
    url = f"{scheme}://{user}{host}:{port}" + ("?auth=xoauth2" if security == "XOAUTH" else "")
    layer: dict[str, Any] = {"server": [url]}
    if ratelimit > 0:
        layer["rate"] = ratelimit / 60
    return layer
