"""A private PostgreSQL cluster for tests: ``initdb`` and ``pg_ctl`` in a temporary directory.

:func:`start_postgres` makes a fresh cluster listening on a free loopback port (and on
a Unix socket in its own directory), with ``trust`` authentication for loopback, and
tears it down afterwards; the system's cluster (if any) is neither used nor touched.
The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<ver>/bin``,
the newest version found). PostgreSQL refuses to run as root, so as root the cluster
belongs to the ``postgres`` user (``nobody`` if it does not exist) and every command
runs through ``runuser``. :func:`pg_binaries` is ``None`` when PostgreSQL is not
installed: callers skip with :data:`MISSING`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["MISSING", "Cluster", "pg_binaries", "postgres", "start_postgres"]

MISSING = "PostgreSQL is not installed (Debian package postgresql)"


def pg_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` with initdb and pg_ctl, or ``None``."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    found = [d / "bin" for d in root.iterdir() if (d / "bin" / "pg_ctl").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running private cluster."""

    bin: Path
    data: Path
    port: int
    user: str | None  # run as this user (root only), else as ourselves

    @property
    def url(self) -> str:
        """The ``postgres`` database as the cluster's superuser (no password: trust)."""
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/postgres"

    @property
    def superuser(self) -> str:
        return self.user or pwd.getpwuid(os.getuid()).pw_name

    def journal(self, campaign: str) -> str:
        """A ``--journal`` URL for ``campaign``."""
        return f"{self.url}?campaign={campaign}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop (``immediate``: like a crash, connections cut) and start again."""
        self.stop("immediate")
        self.start()


@contextlib.contextmanager
def start_postgres() -> Iterator[Cluster]:
    """A private cluster, stopped and deleted afterwards."""
    binaries = pg_binaries()
    if binaries is None:
        raise RuntimeError(MISSING)
    user: str | None = None
    if os.getuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
    top = Path(tempfile.mkdtemp(prefix="triomail-pg-"))
    data = top / "data"
    data.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chmod(top, 0o755)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(binaries, data, _free_port(), user)
    try:
        cluster._run(
            "initdb", "-D", str(data), "-A", "trust", "-U", cluster.superuser,
            "--no-sync", "-E", "UTF8", "--locale", "C",
        )  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {cluster.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{data}'\nfsync = off\n"
                "max_connections = 200\nshared_buffers = 64MB\n"
            )
        cluster.start()
        try:
            yield cluster
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                cluster.stop("immediate")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """The session's private cluster (import this fixture into a test module)."""
    if pg_binaries() is None:
        pytest.skip(MISSING)
    pytest.importorskip("psycopg", reason="the postgres extra: pip install 'triomail[postgres]'")
    with start_postgres() as cluster:
        yield cluster
