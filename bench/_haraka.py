"""A private Haraka for the throughput benchmark's Haraka row (issue 17).

It is the interop suite's Haraka (``tests/helpers/haraka.py``: installed from npm by
``.ci/interop-servers.sh`` into ``/opt/triomail-interop``, its own configuration
directory, one process on a free loopback port, ``rcpt_to.in_host_list`` with the
benchmark's recipient domain added, ``queue/discard``), in its default hardened
configuration: it refuses every command pipelined behind an end of data. STARTTLS and
AUTH are offered; no client here uses them. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from bench._common import LOCAL_HOSTNAME, PAYLOAD, RECIPIENT, SENDER, SMTP_SOURCE, run_process

_TESTS = Path(__file__).resolve().parent.parent / "tests"
#: Messages sent before any client is measured.
WARM_UP = 5000


def _helpers() -> None:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))  # the helpers package lives beside the tests


def haraka_version() -> str | None:
    """``3.3.4``, or None when Haraka is not installed."""
    _helpers()
    from helpers.haraka import haraka_version as version

    return version()


@contextlib.contextmanager
def private_haraka() -> Iterator[int]:
    """Run a private discarding Haraka; yields its port."""
    _helpers()
    import trustme
    from helpers.haraka import start_haraka
    from helpers.mta import ACCEPTED_DOMAINS

    domains = (*ACCEPTED_DOMAINS, RECIPIENT.rpartition("@")[2])
    with start_haraka(trustme.CA(), domains=domains) as target:
        _warm_up(target.port)
        yield target.port


def _warm_up(port: int) -> None:
    """Send :data:`WARM_UP` messages first: Node compiles Haraka's hot paths as they run,
    and the first client measured must not pay for that alone."""
    argv = [
        str(SMTP_SOURCE), "-d", "-s", "10", "-m", str(WARM_UP), "-l", str(PAYLOAD),
        "-M", LOCAL_HOSTNAME, "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}",
    ]  # fmt: skip
    run_process(argv, timeout=120)
