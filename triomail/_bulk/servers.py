"""The servers of one ``triomail send`` run, and their secrets.

Theory of operation
-------------------
Each ``--server URL`` (repeatable) is one :class:`~triomail.Server`; several make the
pool fail over between them by weight, as the library does. Three URL parameters are
the command line's own and are taken out before the library reads the URL:
``weight=N`` (share of new connections), ``max_connections=N`` and ``auth=xoauth2``
(the secret is an OAuth 2.0 token; mailmerge's ``security = XOAUTH``).

A server with a user name needs a secret, never from the command line or the URL (it
would show in ``ps`` and in shell history): ``--password-command CMD`` or
``--oauth-token-command CMD`` (run without a shell, ``shlex.split``; the first line of
its standard output), else ``TRIOMAIL_PASSWORD``, else a prompt on the terminal. An
OAuth token expires (typically after an hour), so the token command runs again for a
connection opened once the last token is :data:`TOKEN_FRESH_FOR` seconds old.

Before anything is claimed, :func:`preflight` opens and closes one connection to each
server, so refused credentials or a wrong address are one line and exit 2, not a
journal full of failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from .._client.options import default_ssl_context
from .._core.errors import SMTPAuthenticationError, SMTPError
from .._pool.pool import Server
from .secrets import read_secret
from .settings import CHECKS, CannotRun, SendSettings

__all__ = ["TOKEN_FRESH_FOR", "preflight", "run_secret_command", "servers"]

#: Seconds an OAuth token from --oauth-token-command is used before it is asked again.
TOKEN_FRESH_FOR = 300.0
#: Seconds a secret command may take.
COMMAND_TIMEOUT = 60.0
#: The URL parameters read here, with the check of their value.
_OWN_PARAMETERS = ("weight", "max_connections", "auth")


def servers(settings: SendSettings) -> list[Server]:
    """Every ``--server``, checked, with its secret (CannotRun: one line)."""
    assert settings.server is not None
    context = _ssl_context(settings.ca_file)
    secrets: dict[tuple[str, str], str] = {}
    out = []
    for url in settings.server:
        server = _server(url, context)
        if server.username:
            server = _with_secret(server, settings, secrets)
        out.append(server)
    return out


def _server(url: str, context: ssl.SSLContext | None) -> Server:
    parts = urlsplit(url)
    if parts.password is not None:
        raise CannotRun("do not put the password in the URL; set TRIOMAIL_PASSWORD instead")
    own: dict[str, object] = {}
    rest = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _OWN_PARAMETERS:
            rest.append((name, value))
        elif name == "auth":
            if value.lower() != "xoauth2":
                raise CannotRun(f"--server {url}: auth= takes only xoauth2")
            own["auth"] = "XOAUTH2"
        else:
            check = CHECKS["connections" if name == "max_connections" else "rate"]
            try:
                own[name] = check(value)
            except argparse.ArgumentTypeError as exc:
                raise CannotRun(f"--server {url}: {name} {exc}") from None
    bare = urlunsplit(parts._replace(query=urlencode(rest)))
    try:
        server = Server.from_url(bare, ssl_context=context, **own)
        _ = server.port
    except ValueError as exc:
        raise CannotRun(f"--server {url}: {exc}") from None
    return server


def _with_secret(
    server: Server, settings: SendSettings, asked: dict[tuple[str, str], str]
) -> Server:
    user = server.username or ""
    if settings.oauth_token_command:
        command = settings.oauth_token_command
        first = run_secret_command(command, "--oauth-token-command")
        return dataclasses.replace(server, oauth_token=_TokenCommand(command, first))
    if settings.password_command:
        secret = run_secret_command(settings.password_command, "--password-command")
    else:
        known = asked.get((user, server.host))
        if known is None:
            prompt = f"password for {user} on {server.host}: "
            known = read_secret("TRIOMAIL_PASSWORD", prompt, "password")
        secret = asked[(user, server.host)] = known
    if server.auth == "XOAUTH2":
        return dataclasses.replace(server, oauth_token=secret)
    return dataclasses.replace(server, password=secret)


def run_secret_command(command: str, option: str) -> str:
    """The first line ``command`` prints (run without a shell); CannotRun on failure,
    naming the option and never the output."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise CannotRun(f"{option}: {exc}") from None
    if not argv:
        raise CannotRun(f"{option}: empty command")
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise CannotRun(f"{option}: {argv[0]}: command not found") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise CannotRun(f"{option}: {argv[0]}: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CannotRun(f"{option}: {argv[0]} exited with status {done.returncode}: {why}")
    lines = done.stdout.splitlines()
    if not lines or not lines[0].strip():
        raise CannotRun(f"{option}: {argv[0]} printed nothing")
    return lines[0].strip()


class _TokenCommand:
    """An OAuth token source for the library (``oauth_token=``): the last token while
    fresh, else the command's output again (in a thread, bounded)."""

    def __init__(self, command: str, first: str) -> None:
        self.command = command
        self.token = first
        self.since = time.monotonic()

    async def __call__(self) -> str:
        if time.monotonic() - self.since >= TOKEN_FRESH_FOR:
            try:
                self.token = await trio.to_thread.run_sync(
                    run_secret_command, self.command, "--oauth-token-command"
                )
            except CannotRun as exc:  # mid-batch: the last token may still be good
                logging.getLogger("triomail").warning("%s; the last token is used", exc)
            self.since = time.monotonic()
        return self.token


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    context = default_ssl_context()
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise CannotRun(f"--ca-file {ca_file}: {exc}") from None
    return context


async def preflight(servers: list[Server]) -> None:
    """Open and close one connection to each server: refused credentials anywhere exit
    2 (a configuration error), and so does every server unreachable; one unreachable of
    several is said, and the pool fails over."""
    failures: list[str] = []
    for server in servers:
        try:
            await _try(server)
        except CannotRun as exc:
            if len(servers) == 1 or "authentication failed" in str(exc):
                raise
            failures.append(str(exc))
    if len(failures) == len(servers):
        raise CannotRun("; ".join(failures))
    for failure in failures:
        print(f"triomail send: warning: {failure}; the others are used", file=sys.stderr)


async def _try(server: Server) -> None:
    where = f"{server.host}:{server.port or '(default port)'}"
    try:
        with trio.fail_after(server.timeouts.connect + 30):
            conn = await server.open()
    except SMTPAuthenticationError as exc:
        raise CannotRun(f"authentication failed at {where}: {exc}") from None
    except SMTPError as exc:
        raise CannotRun(f"cannot use the server {where}: {exc}") from None
    except trio.TooSlowError:
        raise CannotRun(f"cannot use the server {where}: no answer") from None
    except OSError as exc:
        raise CannotRun(f"cannot connect to {where}: {exc}") from None
    await conn.aclose()
