"""Postfix ``smtpd`` as interop contract targets: as shipped, and hardened.

Both run the private instance of :mod:`helpers.postfix` in ``discard`` mode, with a
recipient access table that refuses ``REFUSED_DOMAIN`` (550) and answers the cue
recipient with 421 (Postfix closes the session after any 421 from a restriction,
access(5)). No AUTH: Postfix's SASL needs Dovecot or Cyrus, which the suite does not run.

``hardened`` adds the two parameters of Postfix's SMTP-smuggling fixes (3.7.9, 3.8.4 and
later; Debian bookworm ships 3.7.11, whose defaults are both ``no``):

- ``smtpd_forbid_unauth_pipelining = yes``: disconnect a client that sends commands
  ahead where RFC 2920 does not allow it;
- ``smtpd_forbid_bare_newline = yes`` (with no exclusions: the default excludes
  ``$mynetworks``, which holds loopback): refuse a bare LF in DATA.

The ledger joins two log lines: cleanup's ``QID: message-id=<...>`` and the discard
agent's ``QID: ... status=sent`` (one per recipient; a queue ID counts once), so a
message counts only once Postfix has accepted and "delivered" it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator

import trustme

from helpers.mta import CUE_421, REFUSED_DOMAIN, Target
from helpers.postfix import POSTCONF, PostfixInstance, start_postfix

HARDENED = {
    "smtpd_forbid_unauth_pipelining": "yes",
    "smtpd_forbid_bare_newline": "yes",
    "smtpd_forbid_bare_newline_exclusions": "",
}
_ACCESS = (
    "inline:{ "
    f"{{ {REFUSED_DOMAIN} = 550 5.1.2 refused by the test configuration }}, "
    f"{{ {CUE_421}@ = 421 4.3.0 closing on cue }} }}"
)
_MESSAGE_ID_RE = re.compile(r"postfix/cleanup\[\d+\]: (\w+): message-id=(\S*)")
_SENT_RE = re.compile(r"postfix/discard\[\d+\]: (\w+): to=.* status=sent")


def postfix_version() -> str:
    """``Postfix 3.7.11``: the installed version (``mail_version``)."""
    out = subprocess.run(
        [str(POSTCONF), "-dh", "mail_version"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    ).stdout
    return f"Postfix {out.strip()}"


def _ledger(pf: PostfixInstance) -> list[str]:
    log = pf.log()
    ids = dict(_MESSAGE_ID_RE.findall(log))
    sent = dict.fromkeys(_SENT_RE.findall(log))  # first delivery of each queue ID, in order
    return [ids.get(qid, "-") for qid in sent]


@contextlib.contextmanager
def start_postfix_target(ca: trustme.CA, *, hardened: bool) -> Iterator[Target]:
    """Run a private Postfix (see the module docs) for the ``with`` block."""
    main_cf = {"smtpd_recipient_restrictions": f"check_recipient_access {_ACCESS}"}
    if hardened:
        main_cf.update(HARDENED)
    with start_postfix(ca, mode="discard", main_cf=main_cf) as pf:
        yield Target(
            name="postfix-hardened" if hardened else "postfix",
            version=postfix_version()
            + (" (forbid_unauth_pipelining, forbid_bare_newline)" if hardened else ""),
            host=pf.host,
            port=pf.port,
            ledger=lambda: _ledger(pf),
            ca=ca,
            cue_421=True,
            log=pf.log,
        )
