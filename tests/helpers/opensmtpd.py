"""A private OpenSMTPD for the interop contract suite.

Debian's ``opensmtpd`` cannot be installed next to Postfix (both are the system's
``mail-transport-agent``), so ``.ci/interop-servers.sh`` unpacks it with ``dpkg -x`` into
``INTEROP_ROOT/root`` and creates the ``opensmtpd``/``opensmtpq`` users its binary looks
up by compiled-in name. Its other compiled-in paths -- the queue ``/var/spool/smtpd``,
the privilege-separation chroot ``/var/lib/opensmtpd/empty``, the control socket
``/run/smtpd.sock`` and the delivery helpers in ``/usr/libexec/opensmtpd`` -- are given
to it privately: :func:`start_opensmtpd` runs it under ``unshare --mount`` with a fresh
tmpfs on each of ``/var/spool``, ``/var/lib``, ``/run`` and ``/usr/libexec`` (seen by
that process tree only) and the unpacked helpers bind-mounted in place.

Configuration: one loopback listener, a builtin filter that answers the cue recipient
with 421 and disconnects, ``REFUSED_DOMAIN`` rejected (550), every other recipient
delivered through an ``mda`` action to a script that appends ``Message-ID recipient`` to
the ledger. The session limit is raised from 100 messages (``smtp limit max-mails``)
to 10,000, so that one connection can carry the contract's batches;
``test_pool_after_a_session_limit`` runs one at the default. OpenSMTPD 6.8 advertises 8BITMIME, SIZE, DSN and ENHANCEDSTATUSCODES, but
no PIPELINING, CHUNKING or SMTPUTF8, so the client sends one command at a time.

No STARTTLS: bookworm's 6.8.0p2 with OpenSSL 3 fails every handshake on the server side
(``io-error: error:0A080006:SSL routines::EVP lib``, RSA or ECDSA key alike), so the
listener is plain and no AUTH is configured (OpenSMTPD offers AUTH only over TLS).
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import trustme

from helpers.mta import (
    CUE_421,
    HOST,
    INTEROP_ROOT,
    REFUSED_DOMAIN,
    Daemon,
    ServerError,
    Target,
    private_directory,
    read_text,
)
from helpers.postfix import free_loopback_port

SMTPD = INTEROP_ROOT / "root" / "usr" / "sbin" / "smtpd"
LIBEXEC = INTEROP_ROOT / "root" / "usr" / "libexec" / "opensmtpd"

_CONFIG = """\
smtp limit max-mails {max_mails}
table vusers {{ "@" = "nobody" }}
filter "cue" phase rcpt-to match rcpt-to regex "^{cue}@" disconnect "421 closing on cue"
listen on {host} port {port} hostname opensmtpd.triomail.test filter "cue"
action "ledger" mda "{root}/ledger.sh %{{rcpt}}" virtual <vusers>
match from any for domain "{refused}" reject
match from any for any action "ledger"
"""

# The mda action's command: the message is on stdin, the recipient in $1. Headers end
# at the first empty line; only the Message-ID is kept.
_LEDGER_SH = """\
#!/bin/sh
mid=$(sed -n '/^\\r\\{{0,1\\}}$/q; s/^[Mm][Ee][Ss][Ss][Aa][Gg][Ee]-[Ii][Dd]:[[:space:]]*//p' \\
    | tr -d '\\r' | head -n 1)
printf '%s %s\\n' "${{mid:--}}" "$1" >> '{ledger}'
"""

# Runs inside the new mount namespace, as root.
_LAUNCH_SH = """\
#!/bin/sh
set -e
for dir in /var/spool /var/lib /run /usr/libexec; do
    mount -t tmpfs triomail-opensmtpd "$dir"
done
mkdir -p /var/lib/opensmtpd/empty /usr/libexec/opensmtpd
mount --bind '{libexec}' /usr/libexec/opensmtpd
exec '{smtpd}' -d -f '{config}'
"""

#: ``smtp limit max-mails`` when smtpd.conf does not set it (smtpd.conf(5)).
DEFAULT_MAX_MAILS = 100

_VERSION_RE = re.compile(r"OpenSMTPD (\S+)")


def opensmtpd_version() -> str | None:
    """``OpenSMTPD 6.8.0p2``, or ``None`` if the binary is missing."""
    if not SMTPD.exists():
        return None
    proc = subprocess.run(
        [str(SMTPD), "-h"], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    match = _VERSION_RE.search(proc.stdout + proc.stderr)
    return f"OpenSMTPD {match.group(1)}" if match else None


def _ledger(path: Path) -> list[str]:
    """One entry per message: the mda runs once per recipient, so a Message-ID counts as
    often as its most-delivered recipient got it."""
    per_recipient = collections.Counter(
        tuple(line.split(" ", 1)) for line in read_text(path).splitlines()
    )
    times: dict[str, int] = {}
    for (mid, *_rcpt), n in per_recipient.items():
        times[mid] = max(times.get(mid, 0), n)
    return [mid for mid, n in times.items() for _ in range(n)]


@contextlib.contextmanager
def start_opensmtpd(
    ca: trustme.CA, *, max_mails: int = 10_000, startup_timeout: float = 30.0
) -> Iterator[Target]:
    """Run a private OpenSMTPD for the duration of the ``with`` block (*ca* is unused:
    no STARTTLS, see the module docs). *max_mails*: messages per session
    (:data:`DEFAULT_MAX_MAILS` is what OpenSMTPD does unconfigured)."""
    version = opensmtpd_version()
    if version is None:
        raise ServerError(f"{SMTPD} is missing (.ci/interop-servers.sh)")
    if shutil.which("unshare") is None:
        raise ServerError("unshare (util-linux) is missing")
    with private_directory("opensmtpd") as root:
        ledger_dir = root / "ledger"  # the mda runs as nobody
        ledger_dir.mkdir()
        ledger_dir.chmod(0o1777)
        ledger = ledger_dir / "ledger"
        port = free_loopback_port()
        files = {
            "smtpd.conf": _CONFIG.format(
                host=HOST,
                port=port,
                root=root,
                cue=CUE_421,
                refused=REFUSED_DOMAIN,
                max_mails=max_mails,
            ),
            "ledger.sh": _LEDGER_SH.format(ledger=ledger),
            "launch.sh": _LAUNCH_SH.format(
                libexec=LIBEXEC, smtpd=SMTPD, config=root / "smtpd.conf"
            ),
        }
        for name, text in files.items():
            (root / name).write_text(text)
            (root / name).chmod(0o755 if name.endswith(".sh") else 0o644)
        log = root / "smtpd.log"
        daemon = Daemon(
            ["unshare", "--mount", "--propagation", "private", str(root / "launch.sh")],
            port=port,
            log_path=log,
        )
        with daemon.running(startup_timeout):
            yield Target(
                name="opensmtpd",
                version=version,
                host=HOST,
                port=port,
                ledger=lambda: _ledger(ledger),
                cue_421=True,
                log=lambda: read_text(log),
            )
