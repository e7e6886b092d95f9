"""The public surface, pinned (in the spirit of trio's ``test_exports.py``).

A name added to or dropped from ``triomail``'s public modules fails here, so every change
of the API is a deliberate one; public classes and functions say they live in the
package a user imports them from.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys

import pytest

import triomail
import triomail.pytest_plugin
import triomail.testing

PUBLIC = {
    "triomail": [
        "Capabilities", "DKIMMultiSigner", "DKIMSigner", "DSN", "LocalProtocolError", "Outcome", "Pool", "PoolStatistics",
        "PreparedMessage", "RecipientResult", "Reply", "ReplyParser", "ResultChannel",
        "RetryPolicy", "SMTPAuthenticationError", "SMTPCertificateError", "SMTPConnectError",
        "SMTPConnection", "SMTPDisconnected", "SMTPError", "SMTPProtocolError",
        "SMTPResponseError", "SMTPSecurityError", "SMTPSendError", "SMTPTimeoutError",
        "SendResult", "Server", "TLSMode", "Timeouts", "connect", "connect_pool",
        "default_ssl_context", "open_connection", "open_pool", "prepare", "start_pool",
        "start_session",
    ],
    "triomail.testing": ["CapturedMessage", "Drop", "Fault", "SMTPSink"],
    "triomail.pytest_plugin": ["smtp_sink", "smtp_sink_web"],
}  # fmt: skip


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_public_names_are_pinned(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in module.__all__:
        assert hasattr(module, name), name


@pytest.mark.parametrize("module_name", ["triomail", "triomail.testing"])
def test_public_objects_report_the_public_module(module_name: str) -> None:
    module = importlib.import_module(module_name)
    checked = 0
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == module_name, f"{name}: {obj.__module__}"
            checked += 1
    assert checked >= len(module.__all__) - 1  # only the TLSMode alias is neither


def test_no_private_module_leaks_into_public_repr() -> None:
    assert repr(triomail.Pool) == "<class 'triomail.Pool'>"
    assert "._" not in repr(triomail.Outcome.ACCEPTED)


def test_entry_points_are_declared() -> None:
    dist = importlib.metadata.distribution("triomail")
    points = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert points[("console_scripts", "triomail")] == "triomail._cli:main"
    assert points[("pytest11", "triomail")] == "triomail.pytest_plugin"


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "triomail", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for command in ("send", "sink"):
        assert command in done.stdout


def test_names_say_which_call_is_a_block() -> None:
    """``connect`` and ``open_pool`` are ``async with`` blocks; ``open_connection`` and
    ``start_pool`` return the object (issue 12). The first name of ``start_pool`` stays."""
    assert triomail.connect_pool is triomail.start_pool
    assert triomail.start_pool.__name__ == "start_pool"
    blocks = [triomail.connect("localhost"), triomail.open_pool("smtp+plain://127.0.0.1:1")]
    for block in blocks:  # built, never entered: nothing connects
        assert hasattr(block, "__aenter__")
    assert inspect.iscoroutinefunction(triomail.open_connection)
    assert "nursery" in inspect.signature(triomail.start_pool).parameters
