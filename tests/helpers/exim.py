"""A private Exim for the interop contract suite.

Debian's ``exim4-daemon-light`` cannot be installed next to Postfix (both are the
system's ``mail-transport-agent``), so ``.ci/interop-servers.sh`` unpacks it with
``dpkg -x`` into ``INTEROP_ROOT/root`` (plus ``libidn12``, the one library it needs that
bookworm does not bring, found through ``LD_LIBRARY_PATH``) and creates the
``Debian-exim`` user its binary looks up by compiled-in name.

:func:`start_exim` runs that binary as a foreground daemon (``-bdf``) with ``-C`` and a
configuration of its own: spool, log and pid file in a fresh temporary directory, one
loopback listener, STARTTLS with a certificate from the session CA, AUTH PLAIN/LOGIN
after TLS, PIPELINING, CHUNKING, 8BITMIME and SMTPUTF8 advertised. ``queue_only`` keeps
every accepted message in the private spool: nothing is delivered anywhere. The ledger
is Exim's own mainlog: one ``<=`` line per accepted message, with ``id=<Message-ID>``.
The RCPT ACL refuses ``REFUSED_DOMAIN`` with 550.

No 421 cue: an ACL cannot make Exim answer 421 *and* close. ``defer`` with a ``421``
message sends the 421 and keeps reading (with a pipelined BDAT behind it, Exim then
accepted the message for its other recipient while the client, told 421, reported it
transient); ``drop`` closes, but only after a 5xx.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import trustme

from helpers.mta import (
    HOST,
    INTEROP_ROOT,
    REFUSED_DOMAIN,
    Daemon,
    ServerError,
    Target,
    private_directory,
    read_text,
    write_leaf,
)
from helpers.postfix import free_loopback_port

EXIM = INTEROP_ROOT / "root" / "usr" / "sbin" / "exim4"
LIBRARY_PATH = INTEROP_ROOT / "root" / "usr" / "lib" / "x86_64-linux-gnu"
USER, PASSWORD = "triomail", "interop-secret"
#: A ``<=`` (message received) line of the mainlog, and the Message-ID it logs.
_RECEIVED_RE = re.compile(r"^\S+ \S+ \S+ <= .*? id=(\S+)", re.M)

_CONFIG = """\
primary_hostname = exim.triomail.test
spool_directory = @root@/spool
log_file_path = @root@/log/%slog
pid_file_path = @root@/exim.pid
daemon_smtp_ports = @port@
local_interfaces = @host@
queue_only = true
tls_advertise_hosts = *
tls_certificate = @root@/cert.pem
tls_privatekey = @root@/key.pem
auth_advertise_hosts = ${if def:tls_in_cipher {*}{}}
pipelining_advertise_hosts = *
chunking_advertise_hosts = *
smtputf8_advertise_hosts = *
accept_8bitmime = true
message_size_limit = 10M
host_lookup =
rfc1413_hosts =
keep_environment =
smtp_accept_max = 50
smtp_accept_queue_per_connection = 0
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  deny  domains = @refused@
        message = 550 5.1.2 refused by the test configuration
  accept

begin routers
blackhole:
  driver = redirect
  data = :blackhole:

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and {{eq{$auth2}{@user@}}{eq{$auth3}{@password@}}}}
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and {{eq{$auth1}{@user@}}{eq{$auth2}{@password@}}}}
"""


def exim_version() -> str | None:
    """``Exim 4.96`` (what ``-bV`` says), or ``None`` if the binary is missing."""
    if not EXIM.exists():
        return None
    proc = subprocess.run(
        [str(EXIM), "-C", "/dev/null", "-bV"],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_LIBRARY_PATH": str(LIBRARY_PATH)},
        stdin=subprocess.DEVNULL,
        check=False,
        timeout=30,
    )
    match = re.search(r"Exim version (\S+)", proc.stdout)
    return f"Exim {match.group(1)}" if match else None


@contextlib.contextmanager
def start_exim(ca: trustme.CA, *, startup_timeout: float = 30.0) -> Iterator[Target]:
    """Run a private Exim daemon for the duration of the ``with`` block."""
    version = exim_version()
    if version is None:
        raise ServerError(f"{EXIM} is missing or does not run (.ci/interop-servers.sh)")
    with private_directory("exim") as root:
        for sub in ("spool", "log"):
            (root / sub).mkdir()
            shutil.chown(root / sub, user="Debian-exim")  # Exim receives as Debian-exim
        write_leaf(ca, root / "key.pem", root / "cert.pem")
        for pem in ("key.pem", "cert.pem"):
            shutil.chown(root / pem, user="Debian-exim")
        port = free_loopback_port()
        config = root / "exim.conf"
        text = _CONFIG
        for key, value in {
            "root": str(root),
            "port": str(port),
            "host": HOST,
            "refused": REFUSED_DOMAIN,
            "user": USER,
            "password": PASSWORD,
        }.items():
            text = text.replace(f"@{key}@", value)
        config.write_text(text)
        mainlog = root / "log" / "mainlog"
        daemon = Daemon(
            [str(EXIM), "-C", str(config), "-bdf"],
            port=port,
            log_path=root / "stderr.log",
            env={"LD_LIBRARY_PATH": str(LIBRARY_PATH)},
        )
        with daemon.running(startup_timeout):
            yield Target(
                name="exim",
                version=version,
                host=HOST,
                port=port,
                ledger=lambda: _RECEIVED_RE.findall(read_text(mainlog)),
                ca=ca,
                auth=(USER, PASSWORD),
                cue_421=False,  # see the module docs
                log=lambda: read_text(mainlog) + read_text(root / "log" / "paniclog"),
            )
