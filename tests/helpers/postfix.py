"""A private Postfix instance for integration tests.

:func:`start_postfix` builds a throw-away Postfix with its own ``config_directory``,
``queue_directory`` and ``data_directory`` under a fresh temporary directory, listening
on a free loopback port, and stops it again. Nothing leaves the machine: every address
class is routed either to ``discard`` or to a ``pipe`` transport named ``store`` that
writes each delivered message into a directory (``mode="store"``).

It needs ``/usr/sbin/postfix`` (Debian package ``postfix``) and root (``postfix start``
refuses otherwise). The installed system instance is neither used nor touched; it may be
running or not.

What Postfix does to a message on the way (so tests know what "intact" means):

- smtpd prepends one ``Received:`` header; nothing else is added, because
  ``local_header_rewrite_clients`` is empty (no Message-ID/Date/From invented for
  loopback clients) and ``always_add_missing_headers = no``;
- the ``pipe`` transport writes lines ending in a bare LF, not CRLF, and undoes the
  client's dot-stuffing;
- lines longer than ``line_length_limit`` (2048) are split by cleanup.

:func:`as_sent` undoes the first two, so ``as_sent(stored) == original`` for a CRLF
message with lines of at most 2048 bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio
import trustme

from helpers.certs import client_ssl_context
from helpers.greeting import read_greeting

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")

Mode = Literal["discard", "store"]

#: ``status=sent`` lines written by the discard and pipe (store) delivery agents.
_DELIVERED_RE = re.compile(
    r"postfix/(?:discard|pipe)\[\d+\]: (?P<qid>\w+): to=<(?P<rcpt>[^>]*)>.*"
    r" status=sent \((?P<text>[^)]*)\)"
)
#: Anything a delivery agent or smtpd considers broken.
_TROUBLE_RE = re.compile(
    r"status=(?:bounced|deferred)|\b(?:fatal|panic):|bad command startup|warning: process "
)

_STORE_SCRIPT = """\
#!/bin/sh
# Postfix pipe(8) transport for the test instance.
# argv: QUEUE_ID SENDER RECIPIENT... ; the message is on stdin.
umask 022
dir='{store}'
qid=$1
shift
name="$(date +%s%N).$qid.$$"
{{ printf '%s\\n' "$@"; }} > "$dir/.$name.env" || exit 75
cat > "$dir/.$name.tmp" || exit 75
mv "$dir/.$name.env" "$dir/$name.env" || exit 75
mv "$dir/.$name.tmp" "$dir/$name.eml" || exit 75
exit 0
"""

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
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
store     unix  -       n       n       -       -       pipe
  flags= user=nobody null_sender= argv={script} ${{queue_id}} ${{sender}} ${{recipient}}
"""


class PostfixError(RuntimeError):
    """The private instance failed to start, or a wait timed out (log attached)."""


@dataclass(frozen=True)
class Checkpoint:
    """A position in the instance's history; pass it as ``since=`` to count from there."""

    log_offset: int
    stored_count: int


@dataclass(frozen=True)
class StoredMessage:
    """One delivery made by the ``store`` transport (``mode="store"`` only)."""

    queue_id: str
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    raw: bytes  # exactly what pipe(8) wrote: LF line endings, Postfix's Received: first
    path: Path


def as_sent(raw: bytes) -> bytes:
    """Undo what Postfix did to a stored message: drop the first ``Received:`` header
    (with its continuation lines) and turn LF line endings back into CRLF."""
    lines = raw.split(b"\n")
    if lines and lines[0][:9].lower() == b"received:":
        i = 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
        lines = lines[i:]
    return b"\r\n".join(lines)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostfixInstance:
    """A running private Postfix. Attributes: ``host``, ``port``, ``ca``, ``mode``,
    ``directory`` (the instance root), ``config_directory``, ``store_directory``."""

    host: str = "127.0.0.1"

    def __init__(self, directory: Path, ca: trustme.CA, mode: Mode, port: int) -> None:
        self.directory = directory
        self.ca = ca
        self.mode: Mode = mode
        self.port = port
        self.config_directory = directory / "etc"
        self.queue_directory = directory / "queue"
        self.data_directory = directory / "data"
        self.store_directory = directory / "store"
        self.maillog_path = directory / "maillog"

    def __repr__(self) -> str:
        return f"<PostfixInstance {self.mode} {self.host}:{self.port} in {self.directory}>"

    # -- TLS --------------------------------------------------------------------------

    def client_ssl_context(self) -> ssl.SSLContext:
        """A fresh verifying client context that trusts the instance's certificate
        (issued by ``ca`` for ``localhost`` and ``127.0.0.1``)."""
        return client_ssl_context(self.ca)

    # -- log --------------------------------------------------------------------------

    def log(self, since: Checkpoint | None = None) -> str:
        """The maillog text (from *since*, if given)."""
        try:
            data = self.maillog_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since is not None:
            data = data[since.log_offset :]
        return data.decode("utf-8", "replace")

    def checkpoint(self) -> Checkpoint:
        """Mark "now", so later counts only include what happens after this call."""
        try:
            offset = self.maillog_path.stat().st_size
        except FileNotFoundError:
            offset = 0
        return Checkpoint(log_offset=offset, stored_count=len(self._stored_names()))

    def delivered(self, since: Checkpoint | None = None) -> list[str]:
        """The ``status=sent`` log lines of the discard/store agents (one per recipient)."""
        return [m.group(0) for m in _DELIVERED_RE.finditer(self.log(since))]

    def trouble(self, since: Checkpoint | None = None) -> list[str]:
        """Log lines that mean something went wrong (bounced/deferred/fatal/panic)."""
        return [line for line in self.log(since).splitlines() if _TROUBLE_RE.search(line)]

    def wait_delivered(
        self, n: int, timeout: float = 10.0, *, since: Checkpoint | None = None
    ) -> list[str]:
        """Block until at least *n* recipients were delivered (``status=sent``) since
        *since*; return those log lines. Raises :class:`PostfixError` (with the log) on
        timeout. Blocking: from async code use :meth:`await_delivered`."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.delivered(since)
            if len(lines) >= n:
                return lines
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{self!r}: {len(lines)} of {n} deliveries after {timeout}s\n"
                    + self._log_excerpt(since)
                )
            time.sleep(0.02)

    async def await_delivered(
        self, n: int, timeout: float = 10.0, *, since: Checkpoint | None = None
    ) -> list[str]:
        """:meth:`wait_delivered` in a worker thread (real time, even under MockClock)."""
        return await trio.to_thread.run_sync(
            lambda: self.wait_delivered(n, timeout, since=since), abandon_on_cancel=True
        )

    # -- stored messages ----------------------------------------------------------------

    def _stored_names(self) -> list[str]:
        if self.mode != "store":
            return []
        return sorted(p.name for p in self.store_directory.glob("*.eml"))

    def received(self, since: Checkpoint | None = None) -> list[StoredMessage]:
        """Messages stored by the ``store`` transport, in delivery order."""
        if self.mode != "store":
            raise PostfixError("received() needs the `postfix_store` fixture (mode='store')")
        names = self._stored_names()
        if since is not None:
            names = names[since.stored_count :]
        out = []
        for name in names:
            path = self.store_directory / name
            _stamp, qid, _pid = name[: -len(".eml")].split(".")
            env = path.with_suffix(".env").read_text("utf-8", "surrogateescape").splitlines()
            out.append(
                StoredMessage(
                    queue_id=qid,
                    sender=env[0] if env else "",
                    recipients=tuple(env[1:]),
                    raw=path.read_bytes(),
                    path=path,
                )
            )
        return out

    def received_messages(self, since: Checkpoint | None = None) -> list[bytes]:
        """The raw bytes of each stored message (see :func:`as_sent`)."""
        return [m.raw for m in self.received(since)]

    def wait_received(
        self, n: int, timeout: float = 10.0, *, since: Checkpoint | None = None
    ) -> list[StoredMessage]:
        """Block until at least *n* messages were stored since *since*."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(since)
            if len(got) >= n:
                return got
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{self!r}: {len(got)} of {n} messages stored after {timeout}s\n"
                    + self._log_excerpt(since)
                )
            time.sleep(0.02)

    async def await_received(
        self, n: int, timeout: float = 10.0, *, since: Checkpoint | None = None
    ) -> list[StoredMessage]:
        """:meth:`wait_received` in a worker thread."""
        return await trio.to_thread.run_sync(
            lambda: self.wait_received(n, timeout, since=since), abandon_on_cancel=True
        )

    # -- misc ---------------------------------------------------------------------------

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c CONFIG_DIR ARGS...`` and return its stdout."""
        return _run([str(POSTCONF), "-c", str(self.config_directory), *args]).stdout

    def _log_excerpt(self, since: Checkpoint | None = None, lines: int = 80) -> str:
        text = self.log(since).splitlines()[-lines:]
        return "--- maillog (last lines) ---\n" + "\n".join(text)


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _main_cf(root: Path, chain_file: Path, extra: Mapping[str, str], mode: Mode) -> str:
    transport = "store" if mode == "store" else "discard"
    params: dict[str, str] = {
        "compatibility_level": "3.6",
        "config_directory": str(root / "etc"),
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "meta_directory": "/etc/postfix",
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "myhostname": "postfix.triomail.test",
        "mydomain": "triomail.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "relay_domains": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "default_transport": transport,
        "local_transport": transport,
        "relay_transport": transport,
        "virtual_transport": transport,
        # Postfix refuses a bare "permit" here (smtpd dies: "specify at least one working
        # instance of: reject_unauth_destination, ..."); loopback is in mynetworks, so
        # this permits everything the tests send.
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        "smtputf8_enable": "yes",
        "message_size_limit": "1000000",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "local_header_rewrite_clients": "",
        "always_add_missing_headers": "no",
        "smtpd_peername_lookup": "no",
        "smtpd_error_sleep_time": "0",
        "in_flow_delay": "0",
        "biff": "no",
        "smtpd_banner": "$myhostname ESMTP triomail-test",
        "smtpd_tls_security_level": "may",
        "smtpd_tls_chain_files": str(chain_file),
        "smtpd_tls_loglevel": "1",
        "store_destination_concurrency_limit": "4",
    }
    params.update(extra)
    return "".join(f"{k} = {v}\n" for k, v in params.items())


def _master_pid(inst: PostfixInstance) -> int | None:
    try:
        return int((inst.queue_directory / "pid" / "master.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _instance_pids(inst: PostfixInstance) -> list[int]:
    """Processes of this instance: MAIL_CONFIG is its config dir, or ``-c CONFIG_DIR``
    is on the command line."""
    needle_env = f"MAIL_CONFIG={inst.config_directory}".encode()
    needle_args = [b"-c", str(inst.config_directory).encode()]
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


def _wait_greeting(inst: PostfixInstance, timeout: float) -> bytes:
    """Connect until smtpd sends its 220 greeting; return it. Postfix accepts
    connections before smtpd can greet (and never greets if postlogd or smtpd is broken),
    so a successful connect() is not enough."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            read_timeout = max(0.5, min(5.0, deadline - time.monotonic()))
            data = read_greeting(inst.host, inst.port, read_timeout)
            if data.startswith(b"220 "):
                return data
            last = data
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise PostfixError(f"{inst!r}: no 220 greeting within {timeout}s (last: {last!r})")


def _stop(inst: PostfixInstance, timeout: float = 20.0) -> None:
    master = _master_pid(inst)
    with contextlib.suppress(subprocess.TimeoutExpired):
        _run([str(POSTFIX), "-c", str(inst.config_directory), "stop"], timeout=timeout)
    if master is not None:
        # `postfix stop` already escalates to SIGKILL; this covers a hung stop.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and Path(f"/proc/{master}").exists():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(master, signal.SIGKILL)
    for pid in _instance_pids(inst):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start_postfix(
    ca: trustme.CA,
    *,
    mode: Mode = "discard",
    main_cf: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
    keep: bool | None = None,
    parent: str | None = None,
) -> Iterator[PostfixInstance]:
    """Run a private Postfix for the duration of the ``with`` block.

    *mode* ``"discard"`` drops every message (``status=sent`` in the log); ``"store"``
    pipes each message into ``store_directory``. *main_cf* overrides or adds
    ``main.cf`` parameters. Its directory (configuration, queue, log) is made in
    *parent* (default: the system's temporary directory) and removed afterwards unless
    *keep* (default: the ``TRIOMAIL_KEEP_POSTFIX`` environment variable is set).
    """
    if not POSTFIX.exists():
        raise PostfixError(f"{POSTFIX} is not installed")
    if os.geteuid() != 0:
        raise PostfixError("a private Postfix instance must be started as root")
    if keep is None:
        keep = bool(os.environ.get("TRIOMAIL_KEEP_POSTFIX"))
    # Not under pytest's tmp_path: its parents are 0700, and pipe(8) runs the store
    # script as `nobody`, which must traverse the path.
    root = Path(tempfile.mkdtemp(prefix="triomail-postfix-", dir=parent))
    root.chmod(0o755)
    inst = PostfixInstance(root, ca, mode, port=0)
    try:
        for d in (inst.config_directory, inst.queue_directory, inst.data_directory):
            d.mkdir()
        shutil.chown(inst.data_directory, user="postfix")
        inst.store_directory.mkdir()
        shutil.chown(inst.store_directory, user="nobody")
        script = inst.config_directory / "store.sh"
        script.write_text(_STORE_SCRIPT.format(store=inst.store_directory))
        script.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        chain = inst.config_directory / "smtpd-chain.pem"
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(chain)
        )
        chain.chmod(0o600)
        (inst.config_directory / "main.cf").write_text(_main_cf(root, chain, main_cf or {}, mode))

        last_error = ""
        for _attempt in range(3):
            inst.port = free_loopback_port()
            (inst.config_directory / "master.cf").write_text(
                _MASTER_CF.format(listen=f"{inst.host}:{inst.port}", script=script)
            )
            proc = _run(
                [str(POSTFIX), "-c", str(inst.config_directory), "start"],
                timeout=startup_timeout,
            )
            if proc.returncode == 0:
                break
            last_error = proc.stdout + proc.stderr
            _stop(inst)
            if "Address already in use" not in last_error + inst.log():
                break
        else:
            proc = None
        if proc is None or proc.returncode != 0:
            raise PostfixError(f"postfix start failed: {last_error.strip()}\n{inst._log_excerpt()}")
        try:
            _wait_greeting(inst, startup_timeout)
        except PostfixError as exc:
            raise PostfixError(f"{exc}\n{inst._log_excerpt()}") from None
        yield inst
    finally:
        _stop(inst)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
