"""A private Haraka (the Node.js MTA) for the interop contract suite.

``.ci/interop-servers.sh`` installs Haraka from npm into ``INTEROP_ROOT/haraka``.
:func:`start_haraka` makes a private configuration directory (``haraka -i DIR``), then
writes into it:

- ``smtp.ini``: one listener on a free loopback port, one process (no cluster);
- ``connection.ini``: SMTPUTF8 on (Haraka advertises PIPELINING, 8BITMIME and SIZE;
  it has no CHUNKING);
- ``tls.ini`` + a key and certificate from the session CA: STARTTLS;
- ``auth_flat_file.ini``: one user for AUTH PLAIN/LOGIN (offered only after STARTTLS);
- ``host_list``: the accepted domains for ``rcpt_to.in_host_list``; every other
  recipient gets Haraka's own 550;
- a tiny plugin, ``triomail_ledger``: on RCPT it answers the cue recipient with 421
  and closes; on queue it appends the message's Message-ID to a ledger file and
  passes on to ``queue/discard``, which accepts and drops the message (with
  ``YES_REALLY_DO_DISCARD`` set).

Haraka's SMTP-smuggling hardening (GHSA-rp4q-8m6x-c43c) answers every command a client
pipelines behind the end of DATA with ``503 Bad sequence of commands - pipelined after
end of DATA``: RFC 2920 section 3.1 allows that pipelining, so triomail's ``send_many``
and pool lost every second message here until they learnt to fall back (issue 17).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import trustme

from helpers.mta import (
    ACCEPTED_DOMAINS,
    CUE_421,
    HOST,
    INTEROP_ROOT,
    Daemon,
    ServerError,
    Target,
    private_directory,
    read_text,
    write_leaf,
)
from helpers.postfix import free_loopback_port

HARAKA_HOME = INTEROP_ROOT / "haraka"
HARAKA_BIN = HARAKA_HOME / "node_modules" / ".bin" / "haraka"
USER, PASSWORD = "triomail", "interop-secret"

_PLUGIN = f"""\
// triomail_ledger: the contract suite's view of what this Haraka accepted.
const fs = require('fs')
const DSN = require('haraka-dsn')

exports.register = function () {{
    this.register_hook('rcpt', 'cue')
    this.register_hook('queue', 'ledger')
    this.register_hook('queue_outbound', 'ledger') // an authenticated (relaying) client
}}

// A DSN object overrides the code of the reply, so this is "421 ..., closing".
exports.cue = function (next, connection, params) {{
    if (params[0].user === '{CUE_421}') {{
        return next(DENYSOFTDISCONNECT, DSN.create(421, 'closing on cue', 3, 0))
    }}
    next()
}}

// Runs before queue/discard; one line per accepted message.
exports.ledger = function (next, connection) {{
    const id = (connection.transaction.header.get('Message-ID') || '-').trim()
    fs.appendFileSync(process.env.TRIOMAIL_LEDGER, id + '\\n')
    next()
}}
"""


def haraka_version() -> str | None:
    """The installed Haraka's version, or ``None`` if it is not installed."""
    package = HARAKA_HOME / "node_modules" / "Haraka" / "package.json"
    if not HARAKA_BIN.exists() or not package.exists():
        return None
    return str(json.loads(package.read_text())["version"])


def _write_config(config: Path, port: int, ca: trustme.CA, domains: Sequence[str]) -> None:
    # connection.ini as `haraka -i` wrote it (Haraka reads no defaults for a file
    # that exists), with SMTPUTF8 switched on.
    connection = config / "connection.ini"
    connection.write_text(connection.read_text().replace("[main]\n", "[main]\nsmtputf8=true\n", 1))
    files = {
        # nodes=0: one process, no cluster master between the test and the listener.
        "smtp.ini": f"[main]\nlisten={HOST}:{port}\nnodes=0\n",
        "me": "haraka.triomail.test\n",
        "host_list": "".join(f"{d}\n" for d in domains),
        "tls.ini": "[main]\nkey=tls_key.pem\ncert=tls_cert.pem\n",
        "auth_flat_file.ini": (
            f"[core]\nmethods=PLAIN,LOGIN\nconstrain_sender=false\n[users]\n{USER}={PASSWORD}\n"
        ),
        "log.ini": "[main]\nlevel=info\ntimestamps=true\n",
        "plugins": "tls\nauth/flat_file\ntriomail_ledger\nrcpt_to.in_host_list\nqueue/discard\n",
    }
    for name, text in files.items():
        (config / name).write_text(text)
    write_leaf(ca, config / "tls_key.pem", config / "tls_cert.pem")


@contextlib.contextmanager
def start_haraka(
    ca: trustme.CA, *, startup_timeout: float = 60.0, domains: Sequence[str] = ACCEPTED_DOMAINS
) -> Iterator[Target]:
    """Run a private Haraka for the duration of the ``with`` block; it accepts
    recipients in ``domains`` (the benchmark adds its own)."""
    version = haraka_version()
    if version is None:
        raise ServerError(f"Haraka is not installed in {HARAKA_HOME}")
    with private_directory("haraka") as root:
        subprocess.run(
            [str(HARAKA_BIN), "-i", str(root / "haraka")],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        (root / "haraka" / "plugins" / "triomail_ledger.js").write_text(_PLUGIN)
        ledger = root / "ledger"
        ledger.touch()
        port = free_loopback_port()
        _write_config(root / "haraka" / "config", port, ca, domains)
        log = root / "haraka.log"
        daemon = Daemon(
            [str(HARAKA_BIN), "-c", str(root / "haraka")],
            port=port,
            log_path=log,
            env={"TRIOMAIL_LEDGER": str(ledger), "YES_REALLY_DO_DISCARD": "1"},
        )
        with daemon.running(startup_timeout):
            yield Target(
                name="haraka",
                version=f"Haraka {version}",
                host=HOST,
                port=port,
                ledger=lambda: read_text(ledger).splitlines(),
                ca=ca,
                auth=(USER, PASSWORD),
                cue_421=True,
                log=lambda: read_text(log),
            )
