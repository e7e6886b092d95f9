"""Secrets for ``triomail send``: from the environment or a prompt, never the command line.

A command line is visible to every user of the machine (``ps``, ``/proc/PID/cmdline``)
and kept in shell history; a config file is copied around. So the SMTP password and a
DKIM key's passphrase come from an environment variable, or from a prompt on the
terminal when there is one.
"""

from __future__ import annotations

import getpass
import os
import sys

from .settings import CannotRun

__all__ = ["read_secret"]


def read_secret(variable: str, prompt: str, what: str) -> str:
    """``$variable`` if set, else ask on the terminal; :class:`CannotRun` without one."""
    value = os.environ.get(variable)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise CannotRun(f"no {what}: set {variable} (no terminal to prompt on)")
    return getpass.getpass(prompt)
