"""check_dns against a DNS server on loopback (helpers.dns_server), never the network."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import dns.asyncresolver
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from helpers.dns_server import DNSServer, Records, txt

from triomail._client.dns import DNSReport, check_dns, format_report
from triomail._core.dkim import DKIMSigner

DOMAIN = "example.com"
SPF = "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 include:_spf.example.net mx -all"
DMARC = "v=DMARC1; p=reject; rua=mailto:dmarc@example.com; adkim=s"

RSA_SIGNER = DKIMSigner(DOMAIN, "s2048", rsa.generate_private_key(65537, 2048))
ED_SIGNER = DKIMSigner(DOMAIN, "ed", ed25519.Ed25519PrivateKey.generate())

Check = Callable[..., Awaitable[DNSReport]]


def good_records(**changes: list[str]) -> dict[tuple[str, str], list[str]]:
    records = {
        (DOMAIN, "TXT"): [txt("google-site-verification=abc"), txt(SPF)],
        (DOMAIN, "MX"): ["10 mx.example.com."],
        (f"_dmarc.{DOMAIN}", "TXT"): [txt(DMARC)],
        (RSA_SIGNER.dns_name, "TXT"): [txt(RSA_SIGNER.dns_record())],
        (ED_SIGNER.dns_name, "TXT"): [txt(ED_SIGNER.dns_record())],
    }
    for name, texts in changes.items():
        key = {"spf": (DOMAIN, "TXT"), "dmarc": (f"_dmarc.{DOMAIN}", "TXT")}.get(name)
        key = key or (f"{name}._domainkey.{DOMAIN}", "TXT")
        records[key] = [txt(t) for t in texts]
        if not texts:
            del records[key]
    return records


async def start_server(
    nursery: trio.Nursery, records: Records
) -> tuple[DNSServer, dns.asyncresolver.Resolver]:
    """A loopback server for ``records`` and a resolver that asks only it."""
    server = DNSServer(records)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = await nursery.start(server.serve)
    resolver.lifetime = 5
    return server, resolver


@pytest.fixture
def serve(nursery: trio.Nursery) -> Callable[[Records], Awaitable[dns.asyncresolver.Resolver]]:
    async def start(records: Records) -> dns.asyncresolver.Resolver:
        return (await start_server(nursery, records))[1]

    return start


async def test_all_good(nursery: trio.Nursery) -> None:
    server, resolver = await start_server(nursery, good_records())
    report = await check_dns(DOMAIN, "s2048", RSA_SIGNER.public_key, resolver=resolver)
    assert report.ok, format_report(report)
    assert report.spf.record == SPF
    assert report.spf.detail == "ends with -all"
    assert report.dmarc_policy == "reject"
    assert report.dkim is not None
    assert report.dkim.record == RSA_SIGNER.dns_record()  # two 255-octet strings, joined
    assert report.dkim.detail == "k=rsa key matches the signing key"
    assert set(server.queries) == {
        ("example.com.", "TXT"),
        ("_dmarc.example.com.", "TXT"),
        ("s2048._domainkey.example.com.", "TXT"),
    }
    text = format_report(report)
    assert text.splitlines()[0] == "DNS preflight for example.com: ok"
    assert "  DKIM   ok       s2048._domainkey.example.com: k=rsa key matches" in text


async def test_ed25519_key_and_no_expected_key(
    serve: Callable[[Records], Awaitable[dns.asyncresolver.Resolver]],
) -> None:
    resolver = await serve(good_records())
    report = await check_dns(DOMAIN, "ed", ED_SIGNER.public_key, resolver=resolver)
    assert report.dkim is not None
    assert report.dkim.detail == "k=ed25519 key matches the signing key"
    report = await check_dns(DOMAIN, "ed", resolver=resolver)
    assert report.dkim is not None
    assert (report.dkim.status, report.dkim.detail) == ("ok", "k=ed25519 key published")
    report = await check_dns(DOMAIN, resolver=resolver)
    assert report.dkim is None
    assert [label for label, _ in report.checks()] == ["SPF", "DMARC"]


async def test_nothing_published(
    serve: Callable[[Records], Awaitable[dns.asyncresolver.Resolver]],
) -> None:
    resolver = await serve({("other.example", "A"): ["192.0.2.1"]})  # NXDOMAIN for ours
    report = await check_dns(DOMAIN, "s2048", RSA_SIGNER.public_key, resolver=resolver)
    assert not report.ok
    assert report.dkim is not None
    assert [c.status for _, c in report.checks()] == ["missing"] * 3
    assert report.spf.detail == "no v=spf1 record"
    assert report.dmarc_policy is None
    assert "organisational domain was not checked" in format_report(report)


@pytest.mark.parametrize(
    ("spf", "status", "detail"),
    [
        (["v=spf1 -all"], "ok", "ends with -all"),
        (["V=SPF1 a mx ~ALL"], "ok", "ends with ~ALL"),
        (["v=spf1 redirect=_spf.example.net"], "ok", "redirect=_spf.example.net"),
        (["v=spf1 a:mail.example.com/24 ptr exists:%{i}.x.example ?all"], "ok", "ends with ?all"),
        (["v=spf1 -all", "v=spf1 +all"], "invalid", "2 records; there must be one"),
        (["v=spf1 ipv4:192.0.2.1 -all"], "invalid", "unknown term 'ipv4:192.0.2.1'"),
        (["v=spf1 " + "include:x.example " * 11 + "-all"], "invalid", "11 DNS-querying terms"),
        (["v=spf10 -all"], "missing", "no v=spf1 record"),
        (["spf1 -all"], "missing", "no v=spf1 record"),
    ],
)
async def test_spf(
    spf: list[str],
    status: str,
    detail: str,
    serve: Callable[[Records], Awaitable[dns.asyncresolver.Resolver]],
) -> None:
    resolver = await serve(good_records(spf=spf))
    report = await check_dns(DOMAIN, resolver=resolver)
    assert report.spf.status == status
    assert report.spf.detail.startswith(detail)
    assert report.ok is (status == "ok")


@pytest.mark.parametrize(
    ("dmarc", "status", "policy"),
    [
        (["v=DMARC1; p=none"], "ok", "none"),
        (["v=DMARC1;p=Quarantine;sp=reject"], "ok", "quarantine"),
        (["v=DMARC1; rua=mailto:x@example.com"], "invalid", None),
        (["v=DMARC1; p=block"], "invalid", None),
        (["v=DMARC1; p=none", "v=DMARC1; p=reject"], "invalid", None),
        (["v=DMARC2; p=reject"], "missing", None),
        ([], "missing", None),
    ],
)
async def test_dmarc(
    dmarc: list[str],
    status: str,
    policy: str | None,
    serve: Callable[[Records], Awaitable[dns.asyncresolver.Resolver]],
) -> None:
    resolver = await serve(good_records(dmarc=dmarc))
    report = await check_dns(DOMAIN, resolver=resolver)
    assert (report.dmarc.status, report.dmarc_policy) == (status, policy)


@pytest.mark.parametrize(
    ("record", "status", "detail"),
    [
        ([RSA_SIGNER.dns_record()], "ok", "k=rsa key matches the signing key"),
        ([ED_SIGNER.dns_record()], "mismatch", "k=ed25519 key differs from the signing key"),
        (["v=DKIM1; k=rsa; p="], "invalid", "empty p=: the key is revoked"),
        (["v=DKIM1; k=rsa"], "invalid", "no p= tag"),
        (["v=DKIM2; p=" + RSA_SIGNER.public_key], "invalid", "v=DKIM2: not DKIM1"),
        (["p=" + RSA_SIGNER.public_key], "ok", "k=rsa key matches"),  # v= and k= optional
        ([], "missing", "no key record"),
    ],
)
async def test_dkim_key(
    record: list[str],
    status: str,
    detail: str,
    serve: Callable[[Records], Awaitable[dns.asyncresolver.Resolver]],
) -> None:
    resolver = await serve(good_records(sel=record))
    report = await check_dns(DOMAIN, "sel", RSA_SIGNER.public_key, resolver=resolver)
    assert report.dkim is not None
    assert report.dkim.status == status
    assert report.dkim.detail.startswith(detail)


async def test_idn_domain_is_asked_as_a_labels(
    serve: Callable[[Records], Awaitable[dns.asyncresolver.Resolver]],
) -> None:
    resolver = await serve({("xn--bcher-kva.example", "TXT"): [txt("v=spf1 -all")]})
    report = await check_dns("Bücher.example", resolver=resolver)
    assert report.domain == "xn--bcher-kva.example"
    assert report.spf.ok
    with pytest.raises(ValueError, match="not allowed"):
        await check_dns("☃.net", resolver=resolver)


async def test_unanswered_lookups_are_errors_not_exceptions(nursery: trio.Nursery) -> None:
    silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = silent.getsockname()[1]
    resolver.lifetime = 0.3
    with silent:
        report = await check_dns(DOMAIN, "sel", resolver=resolver)
    assert [c.status for _, c in report.checks()] == ["error"] * 3
    assert report.spf.detail.startswith("lookup failed:")
    assert not report.ok
