"""What the interop contract suite needs from any server it runs against.

The contract suite (``tests/interop/test_contract.py``) drives one set of cases against
several real SMTP servers: Postfix, Haraka, aiosmtpd, Exim, OpenSMTPD. Each server's
helper module starts a private instance (own configuration, spool and log in a fresh
temporary directory, a free loopback port, nothing ever sent off the machine) and
describes it as a :class:`Target`:

- where it listens, whether it offers STARTTLS (with a certificate from the session's
  ``tls_ca``) and AUTH;
- a *ledger*: the Message-IDs the server itself says it accepted, read from its own log
  or a tiny counting hook, so a test can check "accepted exactly once" from the
  server's side, not the client's;
- the recipients it refuses (any address in :data:`REFUSED_DOMAIN`) and, where the
  server can be made to, a recipient (:data:`CUE_421`) it answers with 421 and a
  closed connection.

Helpers for the external daemons (Haraka, Exim, OpenSMTPD) share :class:`Daemon`: start
a command in its own process group, wait for the 220 greeting (a listening socket is
not a greeting), stop the whole group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
import trustme

from helpers.greeting import read_greeting

#: Where ``.ci/interop-servers.sh`` installs Haraka and the unpacked Debian packages.
INTEROP_ROOT = Path(os.environ.get("TRIOMAIL_INTEROP_DIR", "/opt/triomail-interop"))
#: Every server accepts recipients in these domains ...
ACCEPTED_DOMAINS = ("example.org", "example.net", "例子.测试", "xn--fsqu00a.xn--0zwm56d")
#: ... and refuses any recipient here with a 5xx (RCPT).
REFUSED_DOMAIN = "refused.test"
#: The local part of a recipient the server answers with 421 and then closes.
CUE_421 = "disconnect421"
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A private server failed to start or to answer in time (log attached)."""


@dataclass
class Target:
    """A running server as the contract suite sees it."""

    name: str
    version: str
    host: str
    port: int
    #: Reads the server's ledger: every accepted message's Message-ID, in order.
    ledger: Callable[[], list[str]]
    #: The CA that issued the STARTTLS certificate; ``None``: no STARTTLS offered.
    ca: trustme.CA | None = None
    #: ``(user, password)`` the server accepts over TLS; ``None``: no AUTH configured.
    auth: tuple[str, str] | None = None
    #: The server can be cued into a 421 by a ``CUE_421@...`` recipient.
    cue_421: bool = False
    #: The server's log, for failure reports.
    log: Callable[[], str] = lambda: ""
    #: The EHLO keywords it offers (after STARTTLS, where offered): see :func:`probe`.
    extensions: frozenset[str] = frozenset()

    def checkpoint(self) -> int:
        """How many messages the ledger holds now (pass it as ``since=``)."""
        return len(self.ledger())

    def accepted(self, since: int = 0) -> list[str]:
        """Message-IDs (without the angle brackets, which not every server logs) the
        server accepted after the checkpoint *since*."""
        return [i.strip("<>") for i in self.ledger()[since:]]

    async def settle(self, expected: int, since: int, timeout: float = 30.0) -> list[str]:
        """Wait until the ledger holds at least *expected* new entries (some servers
        record after their reply), then a little longer, so a duplicate or a message the
        client thinks refused would show up too; return the new entries."""
        deadline = trio.current_time() + timeout
        while len(self.accepted(since)) < expected:
            if trio.current_time() >= deadline:
                break
            await trio.sleep(0.05)
        await trio.sleep(0.3)
        return self.accepted(since)


def probe(target: Target) -> Target:
    """*target* with :attr:`Target.extensions` filled in from a real EHLO (after
    STARTTLS where offered), asked with the standard library's client, not triomail."""
    with smtplib.SMTP(target.host, target.port, local_hostname="probe.triomail.test") as s:
        s.ehlo()
        if target.ca is not None:
            ctx = ssl.create_default_context()
            target.ca.configure_trust(ctx)
            s.starttls(context=ctx)
            s.ehlo()
        extensions = frozenset(k.upper() for k in s.esmtp_features)
    return dataclasses.replace(target, extensions=extensions)


@contextlib.contextmanager
def private_directory(server: str) -> Iterator[Path]:
    """A fresh ``triomail-SERVER-*`` directory under the system's temporary directory,
    readable by all (servers drop to their own users), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"triomail-{server}-"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_leaf(ca: trustme.CA, key: Path, cert: Path) -> None:
    """A key and certificate for ``localhost``/``127.0.0.1`` issued by *ca*, as PEM files."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))


def read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return ""


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    """One server process (and its children) in its own process group, its output in
    ``log_path``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> bytes:
        """Start the process and return its 220 greeting."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        try:
            return self._wait_greeting(timeout)
        except ServerError:
            self.stop()
            raise

    def _wait_greeting(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                last = f"exited with {self.proc.returncode}"
                break
            try:
                data = read_greeting(HOST, self.port, 5.0)
                if data.startswith(b"220"):
                    return data
                last = data
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise ServerError(
            f"{self.argv[0]} on {HOST}:{self.port}: no 220 greeting ({last!r})\n"
            + tail(read_text(self.log_path))
        )

    @contextlib.contextmanager
    def running(self, timeout: float) -> Iterator[None]:
        """:meth:`start` (the greeting within *timeout*), then :meth:`stop` on the way out."""
        self.start(timeout)
        try:
            yield
        finally:
            self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after *timeout*."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
