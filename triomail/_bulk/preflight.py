"""The DNS preflight of a sending domain, shared by ``triomail check-dns`` and ``send``.

Theory of operation
-------------------
:func:`preflight` asks :func:`triomail._client.dns.check_dns` (dnspython on Trio) about a
domain once per DKIM selector and formats the reports; :func:`check_campaign` is
``triomail send --check-dns``: the From domain's SPF and DMARC records, and each
``--dkim-key`` at its selector and domain (RFC 6376 §3.6.2.1), checked against the key's
public half. A name server given as ``ADDRESS[:PORT]`` (:func:`name_server`) replaces the
system's: a local validating resolver, or in tests a server on loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .settings import CannotRun

if TYPE_CHECKING:
    from .deliver import DKIMKey

__all__ = ["DEFAULT_TIMEOUT", "DNS_PROBLEMS", "check_campaign", "name_server", "preflight"]

#: Seconds for all the lookups together.
DEFAULT_TIMEOUT = 10.0


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
        raise CannotRun(f"name server {text}: not ADDRESS[:PORT] (an IP address)") from None
    if number is not None and not 0 < number < 65536:
        raise CannotRun(f"name server {text}: the port must be 1 to 65535")
    return address, number


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
    try:
        import dns.asyncresolver
    except ImportError:
        raise CannotRun("DNS checks need dnspython: pip install 'triomail[dns]'") from None
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
