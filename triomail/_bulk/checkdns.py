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

``triomail send --check-dns`` runs the same checks before a campaign (:func:`check_campaign`):
the From domain, and each ``--dkim-key`` at its selector and domain; problems are a lint
warning (an error with ``--strict``).

``--resolver ADDRESS[:PORT]`` asks that name server instead of the system's (a local
validating resolver, or in tests a server on loopback).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .command import Subcommands
from .settings import EXIT_CANNOT_RUN, EXIT_FAILED, EXIT_OK, CannotRun

if TYPE_CHECKING:
    from .deliver import DKIMKey

__all__ = ["DNS_PROBLEMS", "check_campaign", "preflight", "register"]

#: Seconds for all the lookups together.
DEFAULT_TIMEOUT = 10.0


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


def name_server(text: str) -> tuple[str, int | None]:
    """``ADDRESS``, ``ADDRESS:PORT`` or ``[IPv6]:PORT`` as an address and a port."""
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = str(ipaddress.ip_address(host))
        number = int(port) if port else None
    except ValueError:
        raise CannotRun(f"--resolver {text}: not ADDRESS[:PORT] (an IP address)") from None
    if number is not None and not 0 < number < 65536:
        raise CannotRun(f"--resolver {text}: the port must be 1 to 65535")
    return address, number


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


def preflight(
    domain: str,
    selectors: Sequence[tuple[str | None, str | None]],
    resolver_address: str | None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    what: str = "domain",
) -> tuple[str, bool]:
    """The reports for ``domain``, one per (selector, expected public key), and whether
    all are good. ``triomail send --check-dns`` asks the same, once per DKIM key."""
    import dns.asyncresolver
    import trio

    from .._client.dns import DNSReport, check_dns, format_report

    resolver = dns.asyncresolver.Resolver(configure=resolver_address is None)
    if resolver_address is not None:
        host, port = name_server(resolver_address)
        resolver.nameservers = [host]
        if port is not None:
            resolver.port = port
    resolver.lifetime = timeout

    async def ask() -> list[DNSReport]:
        return [
            await check_dns(domain, selector, public, resolver=resolver)
            for selector, public in selectors
        ]

    try:
        reports = trio.run(ask)
    except ValueError as exc:
        raise CannotRun(f"{what} {domain}: {exc}") from None
    return "\n".join(format_report(r) for r in reports), all(r.ok for r in reports)


#: The lint finding when the DNS preflight of ``send --check-dns`` found problems.
DNS_PROBLEMS = "the DNS preflight of the sending domain found problems (above)"


def check_campaign(
    from_domain: str | None,
    keys: Sequence[DKIMKey],
    resolver_address: str | None,
    say: Callable[[str], None],
) -> bool:
    """``send --check-dns``: the From domain's records and each key's; True if all good."""
    from .._core.dkim import DKIMSigner

    if from_domain is None:
        raise CannotRun("--check-dns: the From address varies per row; use triomail check-dns")
    by_domain: dict[str, list[tuple[str | None, str | None]]] = {from_domain: []}
    for key in keys:
        public = DKIMSigner(key.domain, key.selector, key.pem).public_key
        by_domain.setdefault(key.domain, []).append((key.selector, public))
    ok = True
    for domain, selectors in by_domain.items():
        text, good = preflight(domain, selectors or [(None, None)], resolver_address)
        say(text)
        ok = ok and good
    return ok
