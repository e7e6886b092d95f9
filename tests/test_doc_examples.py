"""Every complete program in the README and the manual runs as written (issue 12).

A block that calls ``trio.run`` is a program a reader will paste: it runs here in its
own interpreter, against a capture server on loopback that plays the relay it names.
Nothing is edited in the text. What is arranged around it:

- ``trio.open_tcp_stream`` is pointed at the capture server, whatever host and port the
  example names (a ``sitecustomize`` module in a temporary directory);
- the capture server's certificate names those hosts and is issued by a private CA that
  the example's interpreter trusts through ``SSL_CERT_FILE``, so the examples' default,
  verifying TLS is exercised, not switched off;
- the server takes the examples' credentials (``ann``/``secret``; ``SMTP_PASSWORD``).

A program that starts its own capture server (the sink examples) runs the same way; it
binds loopback itself. A block that is a complete test file (its tests marked ``@pytest.mark.trio``, as a
user's own must be without ``trio_mode``) is run by pytest, with the plugin's
``smtp_sink`` fixture. Blocks that are fragments (a signature, a fixture, a fault list)
are only compiled, by ``tests/test_docs.py``.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
from pathlib import Path

import pytest
import trio
import trustme

from triomail.testing import SMTPSink

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Host names the examples use for a relay.
HOSTS = ("smtp.example.com", "mx.example.com", "relay.internal", "localhost", "127.0.0.1")

_SITECUSTOMIZE = """
import os

import trio

_port = int(os.environ["TRIOMAIL_EXAMPLE_PORT"])
_open_tcp_stream = trio.open_tcp_stream


async def _to_the_capture_server(host, port, **kwargs):
    if host in ("127.0.0.1", "localhost", "::1"):
        return await _open_tcp_stream(host, port, **kwargs)
    return await _open_tcp_stream("127.0.0.1", _port, **kwargs)


trio.open_tcp_stream = _to_the_capture_server
"""


def blocks(runnable: str) -> list[tuple[str, str]]:
    """(name, code) of each python block of the documents that contains ``runnable``."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            if runnable in block:
                found.append((f"{document.relative_to(ROOT)}[{i}]", block))
    return found


PROGRAMS = blocks("trio.run(")
TESTS = blocks("@pytest.mark.trio\n")


def test_the_readme_has_programs_to_run() -> None:
    """The collection can fail: the README's connection, pool and sink examples are in it."""
    names = [name for name, _ in PROGRAMS]
    assert sum(name.startswith("README.md") for name in names) >= 3


@pytest.mark.parametrize(("name", "code"), PROGRAMS, ids=[name for name, _ in PROGRAMS])
async def test_example_runs_as_written(name: str, code: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*HOSTS).configure_cert(server_context)
    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    async with SMTPSink(tls=True, ssl_context=server_context, auth={"ann": "secret"}) as sink:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            "SSL_CERT_FILE": str(ca_file),
            "TRIOMAIL_EXAMPLE_PORT": str(sink.port),
            "SMTP_PASSWORD": "secret",
        }
        done = await trio.run_process(
            [sys.executable, "-c", code],
            env=env,
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"{name} failed:\n{output}"
        if "SMTPSink(" not in code:  # an example that sends through "the relay"
            assert sink.received > 0, f"{name} sent nothing:\n{output}"
    # What the program says it did is what the server saw: nothing refused or lost.
    assert "Traceback" not in output


def test_the_docs_have_a_test_to_run() -> None:
    assert any(name.startswith("docs/trio-apps.md") for name, _ in TESTS)


@pytest.mark.parametrize(("name", "code"), TESTS, ids=[name for name, _ in TESTS])
async def test_example_test_passes(name: str, code: str, tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(code, encoding="utf-8")
    done = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{name} failed:\n{output}"
    assert " passed" in output and "failed" not in output
