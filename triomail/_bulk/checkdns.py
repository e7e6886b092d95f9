"""``triomail check-dns --from DOMAIN``: is the sending domain set up for bulk mail?

Theory of operation
-------------------
Before a campaign, a sender can check what receivers will look up: the domain's SPF
record (RFC 7208), its DMARC record (RFC 7489), and with ``--dkim-selector`` the DKIM
key record (RFC 6376 §3.6.2.1), with ``--dkim-key`` also that it is the public half of
the key ``triomail send --dkim-key`` signs with. The lookups and verdicts are the
library's (:func:`triomail._client.dns.check_dns`, dnspython on Trio); this module only
reads the options, asks, prints the report and sets the exit status: 0 all good, 1 a
record is missing, wrong or does not match, 2 the command could not run.

``triomail send --check-dns`` runs the same checks before a campaign (:mod:`.preflight`,
shared): the From domain, and each ``--dkim-key`` at its selector and domain; problems
are a lint warning (an error with ``--strict``).

``--resolver ADDRESS[:PORT]`` asks that name server instead of the system's (a local
validating resolver, or in tests a server on loopback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .command import Subcommands
from .preflight import DEFAULT_TIMEOUT, preflight
from .settings import EXIT_CANNOT_RUN, EXIT_FAILED, EXIT_OK, CannotRun

__all__ = ["register"]


def register(subparsers: Subcommands) -> None:
    """Add the ``check-dns`` subcommand."""
    p = subparsers.add_parser(
        "check-dns",
        help="check a sending domain's SPF, DMARC and DKIM records",
        description="Check a sending domain's SPF and DMARC records, and with a selector "
        "its DKIM key record (and that it matches a key file). Exit status: 0 all good, "
        "1 a record is missing, wrong or does not match, 2 the command could not run.",
    )
    p.add_argument("--from", dest="domain", required=True, metavar="DOMAIN",
                   help="the From domain (or an address at it)")  # fmt: skip
    p.add_argument("--dkim-selector", metavar="SELECTOR", help="check this DKIM key record")
    p.add_argument("--dkim-key", type=Path, metavar="PEM",
                   help="...and that it publishes this private key's public half")  # fmt: skip
    p.add_argument("--resolver", metavar="ADDRESS[:PORT]",
                   help="ask this name server (default: the system's)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"for all the lookups ({DEFAULT_TIMEOUT:g})")  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        return _check(args)
    except CannotRun as exc:
        print(f"triomail check-dns: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN


def _check(args: argparse.Namespace) -> int:
    from .._core.dkim import DKIMSigner
    from .deliver import read_key

    domain = args.domain.rpartition("@")[2]
    public = None
    if args.dkim_key is not None:
        if args.dkim_selector is None:
            raise CannotRun("--dkim-key needs --dkim-selector")
        pem = read_key(args.dkim_key, [], "--dkim-key")
        try:
            public = DKIMSigner(domain, args.dkim_selector, pem).public_key
        except ValueError as exc:
            raise CannotRun(f"--dkim-key {args.dkim_key}: {exc}") from None
    text, ok = preflight(
        domain, [(args.dkim_selector, public)], args.resolver, args.timeout, what="--from"
    )
    print(text)
    return EXIT_OK if ok else EXIT_FAILED
