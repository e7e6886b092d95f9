"""A private Postfix ``smtpd`` that discards every message, for the CHUNKING benchmark.

It is the test fixtures' private Postfix (``tests/helpers/postfix.py``: its own configuration,
queue and log directories, a free loopback port, ``default_transport = discard``,
``in_flow_delay = 0``, STARTTLS offered but not used by any client here), with its
directory on ``/dev/shm`` when that exists, so queue-file fsyncs cost nothing and the
server is not the disk. Needs root, like ``postfix start``. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"


@contextlib.contextmanager
def private_postfix() -> Iterator[int]:
    """Run a private discarding Postfix; yields its port."""
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))  # the helpers package lives beside the tests
    import trustme
    from helpers.postfix import start_postfix

    parent = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with start_postfix(trustme.CA(), mode="discard", parent=parent) as instance:
        yield instance.port
