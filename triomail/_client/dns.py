"""DNS preflight for a sending domain: SPF, DMARC and the DKIM key, looked up from Trio.

Theory of operation
-------------------
Gmail, Yahoo (February 2024) and Microsoft (May 2025) refuse bulk mail from a domain
without SPF, DKIM and a DMARC record; a sender can check all three before its first
message. :func:`check_dns` asks three TXT questions concurrently and judges each answer:

* **SPF** (RFC 7208): exactly one TXT record at the domain whose text starts with
  ``v=spf1`` (§4.5: none is "none", two are a permerror), and every term of it a known
  mechanism or a modifier (§4.6.1, §5, §6). The strings of one record are concatenated
  first (§3.3). More than 10 DNS-querying terms at the top level is reported (§4.6.4).
* **DMARC** (RFC 7489 §6.6.3): exactly one record at ``_dmarc.<domain>`` starting with
  ``v=DMARC1``, with a ``p=`` of none, quarantine or reject. The fall-back to the
  organisational domain needs the public-suffix list and is not tried: the report says so.
* **DKIM** (RFC 6376 §3.6.1): the key record at ``<selector>._domainkey.<domain>`` with
  a non-empty ``p=`` (empty means revoked), equal to the signing key's ``p=`` when given
  (:attr:`DKIMSigner.public_key <triomail._core.dkim.DKIMSigner.public_key>`).

The lookups go through dnspython's async resolver, which detects Trio through sniffio and
runs natively on it; pass a configured ``dns.asyncresolver.Resolver`` to choose the name
servers (tests point one at a loopback server). A non-ASCII domain is asked as A-labels
(IDNA 2008). Nothing here raises for a DNS failure: a timeout or SERVFAIL becomes an
``error`` line in the report.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import trio

from .._core.idna2008 import ascii_domain

__all__ = ["DNSCheck", "DNSReport", "check_dns", "format_report"]

OK, MISSING, INVALID, MISMATCH, ERROR = "ok", "missing", "invalid", "mismatch", "error"

_SPF_TERM = re.compile(
    r"(?:[-+~?]?(?:all|include:\S+|exists:\S+|(?:a|mx)(?::[^/\s]+)?(?:/\d+)?(?://\d+)?"
    r"|ptr(?::\S+)?|ip4:[\d.]+(?:/\d+)?|ip6:[0-9A-Fa-f:.]+(?:/\d+)?)"
    r"|[A-Za-z][\w.-]*=\S*)\Z",
    re.IGNORECASE,
)
_SPF_LOOKUPS = re.compile(r"[-+~?]?(?:include|a|mx|ptr|exists)\b|redirect=", re.IGNORECASE)
_SPF_LOOKUP_LIMIT = 10  # RFC 7208 §4.6.4
_DMARC_POLICIES = ("none", "quarantine", "reject")

#: Judges one record's text: (status, detail).
_Judge = Callable[[str], tuple[str, str]]


@dataclass(frozen=True, slots=True)
class DNSCheck:
    """One record's verdict: ``status`` is ok, missing, invalid, mismatch or error."""

    name: str  # the DNS name asked
    status: str
    record: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class DNSReport:
    """The preflight of one sending domain; ``dkim`` is ``None`` when no selector was given."""

    domain: str
    spf: DNSCheck
    dmarc: DNSCheck
    dmarc_policy: str | None
    dkim: DNSCheck | None

    @property
    def ok(self) -> bool:
        return all(check.ok for _, check in self.checks())

    def checks(self) -> list[tuple[str, DNSCheck]]:
        found = [("SPF", self.spf), ("DMARC", self.dmarc)]
        return [*found, ("DKIM", self.dkim)] if self.dkim is not None else found


async def check_dns(
    from_domain: str,
    dkim_selector: str | None = None,
    dkim_public_key: str | None = None,
    resolver: dns.asyncresolver.Resolver | None = None,
) -> DNSReport:
    """Look up and judge the SPF, DMARC and (with a selector) DKIM records of ``from_domain``.

    ``dkim_public_key`` is the ``p=`` value the published key must equal (base64; white
    space ignored). Raises :class:`ValueError` only for a domain that is not one.
    """
    domain = ascii_domain(from_domain.rstrip("."))
    resolver = resolver if resolver is not None else dns.asyncresolver.Resolver()
    names = {"spf": domain, "dmarc": f"_dmarc.{domain}"}
    if dkim_selector is not None:
        names["dkim"] = f"{ascii_domain(dkim_selector)}._domainkey.{domain}"
    answers: dict[str, list[str] | DNSCheck] = {}

    async def lookup(key: str) -> None:
        answers[key] = await _txt(resolver, names[key])

    async with trio.open_nursery() as nursery:
        for key in names:
            nursery.start_soon(lookup, key)
    spf = _judge(names["spf"], answers["spf"], "v=spf1", _spf)
    dmarc = _judge(names["dmarc"], answers["dmarc"], "v=DMARC1", _dmarc)
    policy = _tags(dmarc.record)["p"].lower() if dmarc.ok else None
    dkim = None
    if "dkim" in names:
        expected = None if dkim_public_key is None else "".join(dkim_public_key.split())
        dkim = _judge(names["dkim"], answers["dkim"], "", lambda r: _dkim(r, expected))
    return DNSReport(domain, spf, dmarc, policy, dkim)


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str] | DNSCheck:
    """The TXT records at ``name`` (each one's strings joined), or the failure as a check."""
    try:
        answer = await resolver.resolve(name, dns.rdatatype.TXT, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:  # timeout, SERVFAIL from every server...
        return DNSCheck(name, ERROR, detail=f"lookup failed: {exc}")
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]


def _judge(
    name: str,
    answer: list[str] | DNSCheck,
    version: str,
    judge: _Judge,
) -> DNSCheck:
    """Pick the record starting with ``version`` (all for an empty prefix) and judge it."""
    if isinstance(answer, DNSCheck):
        return answer
    if version:
        # The version tag ends at a space (SPF, RFC 7208 §4.5) or a ";" (DMARC, RFC 7489 §6.4).
        size = len(version)
        answer = [r for r in answer if r[:size].lower() == version.lower() and r[size:][:1] in "; "]
    if not answer:
        what = f"no {version} record" if version else "no key record"
        return DNSCheck(name, MISSING, detail=what)
    if len(answer) > 1:
        return DNSCheck(name, INVALID, answer[0], f"{len(answer)} records; there must be one")
    status, detail = judge(answer[0])
    return DNSCheck(name, status, answer[0], detail)


def _spf(record: str) -> tuple[str, str]:
    terms = record.split()[1:]
    bad = [term for term in terms if not _SPF_TERM.match(term)]
    if bad:
        return INVALID, f"unknown term {bad[0]!r} (RFC 7208 §4.6.1)"
    lookups = sum(1 for term in terms if _SPF_LOOKUPS.match(term))
    if lookups > _SPF_LOOKUP_LIMIT:
        return INVALID, f"{lookups} DNS-querying terms; the limit is {_SPF_LOOKUP_LIMIT}"
    ends = next((t for t in terms if t.lower().lstrip("-+~?") == "all"), None)
    if ends is None:
        redirect = next((t for t in terms if t.lower().startswith("redirect=")), None)
        return OK, redirect or "no 'all' term: unlisted hosts are neutral"
    return OK, f"ends with {ends}"


def _dmarc(record: str) -> tuple[str, str]:
    tags = _tags(record)
    policy = tags.get("p")
    if policy is None:
        return INVALID, "no p= tag (RFC 7489 §6.3)"
    if policy.lower() not in _DMARC_POLICIES:
        return INVALID, f"p={policy}: not one of {', '.join(_DMARC_POLICIES)}"
    return OK, f"p={policy.lower()}" + (f", sp={tags['sp']}" if "sp" in tags else "")


def _dkim(record: str, expected: str | None) -> tuple[str, str]:
    tags = _tags(record)
    if tags.get("v", "DKIM1") != "DKIM1":
        return INVALID, f"v={tags['v']}: not DKIM1 (RFC 6376 §3.6.1)"
    if "p" not in tags:
        return INVALID, "no p= tag"
    published = "".join(tags["p"].split())
    if not published:
        return INVALID, "empty p=: the key is revoked"
    kind = tags.get("k", "rsa")
    if expected is not None and published != expected:
        return MISMATCH, f"k={kind} key differs from the signing key"
    return OK, f"k={kind} key" + (" matches the signing key" if expected else " published")


def _tags(record: str | None) -> dict[str, str]:
    """A tag=value list (RFC 6376 §3.2, RFC 7489 §6.4): names as given, values stripped."""
    tags: dict[str, str] = {}
    for item in (record or "").split(";"):
        name, eq, value = item.partition("=")
        if eq:
            tags.setdefault(name.strip(), value.strip())
    return tags


def format_report(report: DNSReport) -> str:
    """The report as aligned text lines, one per check, for ``triomail check-dns``."""
    lines = [f"DNS preflight for {report.domain}: {'ok' if report.ok else 'PROBLEMS'}"]
    for label, check in report.checks():
        lines.append(f"  {label:<6} {check.status:<8} {check.name}: {check.detail}")
        if check.record is not None:
            lines.append(f"  {'':<6} {'':<8} {check.record}")
    if report.dmarc.status == MISSING:
        lines.append("  (the DMARC fall-back to the organisational domain was not checked)")
    return "\n".join(lines)
