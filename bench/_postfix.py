"""A private Postfix ``smtpd`` that discards every message, for the CHUNKING benchmark.

Adapted from ``tests/postfix.py`` without TLS (and so without trustme or pytest): its
own ``config_directory``, ``queue_directory`` and ``data_directory`` (on ``/dev/shm``
when it exists, so queue-file fsyncs cost nothing and the server is not the disk),
``default_transport = discard``, a free loopback port, ``in_flow_delay = 0`` (the
bench measures clients, not Postfix's flow control). Needs root, like ``postfix
start``. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench._common import POSTFIX, free_port, wait_greeting

_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _main_cf(root: Path) -> str:
    params = {
        "compatibility_level": "3.6",
        "config_directory": str(root / "etc"),
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "meta_directory": "/etc/postfix",
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "myhostname": "postfix.bench.test",
        "mydomain": "bench.test",
        "mydestination": "",
        "relay_domains": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "default_transport": "discard",
        "local_transport": "discard",
        "relay_transport": "discard",
        "virtual_transport": "discard",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtpd_peername_lookup": "no",
        "in_flow_delay": "0",
        "biff": "no",
        "smtpd_banner": "$myhostname ESMTP bench",
    }
    return "".join(f"{k} = {v}\n" for k, v in params.items())


def _instance_pids(config: Path) -> list[int]:
    needle_env = f"MAIL_CONFIG={config}".encode()
    needle_args = [b"-c", str(config).encode()]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        pairs = [argv[i : i + 2] for i in range(len(argv) - 1)]
        if needle_env in env or needle_args in pairs:
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def private_postfix() -> Iterator[int]:
    """Run a private discarding Postfix; yields its port."""
    if os.geteuid() != 0:
        raise RuntimeError("a private Postfix instance must be started as root")
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="triomail-bench-postfix-", dir=base))
    root.chmod(0o755)
    config = root / "etc"
    try:
        for d in ("etc", "queue", "data"):
            (root / d).mkdir()
        shutil.chown(root / "data", user="postfix")
        (config / "main.cf").write_text(_main_cf(root))
        port = free_port()
        (config / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{port}"))
        proc = subprocess.run(
            [str(POSTFIX), "-c", str(config), "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"postfix start failed: {proc.stdout}{proc.stderr}")
        wait_greeting(port, timeout=30)
        yield port
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [str(POSTFIX), "-c", str(config), "stop"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        time.sleep(0.2)
        for pid in _instance_pids(config):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
