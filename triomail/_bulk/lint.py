"""Lint of rendered messages: what gets a campaign rejected or junked, said before sending.

Theory of operation
-------------------
Since 2024 the large mailbox providers reject or junk bulk mail that breaks a few rules
a program can see in the message itself. :class:`Lint` looks at each rendered message
(:meth:`Lint.check`, cheap: the header section and a scan for a text part) and counts
the rows per finding; :meth:`Lint.report` prints each finding once with its count.

Errors (the message is wrong, receivers ignore or refuse it):

* ``List-Unsubscribe-Post`` without an https URI in ``List-Unsubscribe``, or with a value
  other than ``List-Unsubscribe=One-Click`` (RFC 8058 §3.1);
* an encoded word in a field whose grammar has none (RFC 2047 §5: ``Message-ID``,
  ``List-*``..., :mod:`triomail._core.structured`).

Warnings (it will likely be junked or rejected; ``--strict`` makes them errors):

* no ``List-Unsubscribe`` in a campaign of more than ``BULK_ROWS`` rows (RFC 8058, and
  the providers' bulk sender rules);
* ``From`` on a free-mail domain sent through another relay: its DMARC policy
  (RFC 7489 §6.3, ``p=reject`` for the largest) makes receivers refuse it;
* a DKIM ``d=`` not aligned with the ``From`` domain (RFC 7489 §3.1.1, relaxed: one
  is the other or a subdomain of it), so DKIM cannot pass DMARC;
* no text/plain part (an HTML-only message is a spam signal).

It runs on every row of ``--dry-run`` and on the first ``SAMPLE_ROWS`` rows before the
first real message (:mod:`.launch`); errors then exit 2 with nothing sent.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from .._core.structured import is_structured
from .recipients import BadRow, Row
from .template.rendered import Rendered, RowError

__all__ = ["BULK_ROWS", "SAMPLE_ROWS", "Lint", "lint_sample"]

#: A campaign of more rows than this should have List-Unsubscribe.
BULK_ROWS = 100
#: Rows rendered and checked before the first real message.
SAMPLE_ROWS = 100
#: Free-mail domains and the relay domains that may send their mail.
FREE_MAIL = {
    "gmail.com": ("gmail.com", "google.com", "googlemail.com"),
    "googlemail.com": ("gmail.com", "google.com", "googlemail.com"),
    "yahoo.com": ("yahoo.com", "yahoodns.net"),
    "aol.com": ("aol.com", "yahoodns.net"),
    "outlook.com": ("outlook.com", "office365.com", "hotmail.com", "live.com"),
    "hotmail.com": ("outlook.com", "office365.com", "hotmail.com", "live.com"),
    "live.com": ("outlook.com", "office365.com", "hotmail.com", "live.com"),
    "icloud.com": ("icloud.com", "me.com", "mail.me.com"),
    "me.com": ("icloud.com", "me.com"),
    "gmx.de": ("gmx.de", "gmx.net"),
    "gmx.net": ("gmx.de", "gmx.net"),
    "web.de": ("web.de",),
    "yandex.ru": ("yandex.ru", "yandex.net"),
    "mail.ru": ("mail.ru",),
    "proton.me": ("proton.me", "protonmail.ch"),
    "protonmail.com": ("proton.me", "protonmail.ch"),
}
_ADDRESS = re.compile(r"<?([^<>\s]+@([^<>\s]+?))>?\s*$")
_DKIM_D = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)")
_TEXT_PLAIN = re.compile(rb"(?im)^content-type:\s*text/plain\b")

POST_WITHOUT_HTTPS = "List-Unsubscribe-Post without an https URI in List-Unsubscribe (RFC 8058)"
POST_VALUE = "List-Unsubscribe-Post must be exactly List-Unsubscribe=One-Click (RFC 8058)"
NO_UNSUBSCRIBE = "no List-Unsubscribe header in a bulk campaign (use --unsubscribe URL)"
NO_TEXT = "no text/plain part (HTML only)"


def _fields(data: bytes) -> dict[str, list[str]]:
    """The header fields of canonical message bytes: lower-cased name -> unfolded values."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields: dict[str, list[str]] = {}
    for field in re.split(r"\r\n(?![ \t])", head):
        name, _, value = field.partition(":")
        fields.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    return fields


def _aligned(d: str, domain: str) -> bool:
    """RFC 7489 §3.1.1 relaxed alignment, approximated without the public suffix list."""
    return d == domain or domain.endswith("." + d) or d.endswith("." + domain)


class Lint:
    """Counts each finding over the rendered messages; reports them once."""

    def __init__(self, *, rows: int, relay: str | None, strict: bool) -> None:
        #: Rows in the campaign (the estimate): decides whether it is bulk.
        self.rows = rows
        #: The --server host name, if there is one.
        self.relay = relay.lower().rstrip(".") if relay else None
        self.strict = strict
        self.errors: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.checked = 0

    def check(self, message: Rendered) -> None:
        """Look at one rendered message."""
        self.checked += 1
        fields = _fields(message.data)
        unsubscribe = fields.get("list-unsubscribe")
        post = fields.get("list-unsubscribe-post")
        if post is not None:
            if not unsubscribe or "<https://" not in " ".join(unsubscribe).lower():
                self.errors[POST_WITHOUT_HTTPS] += 1
            if post != ["List-Unsubscribe=One-Click"]:
                self.errors[POST_VALUE] += 1
        if unsubscribe is None and self.rows > BULK_ROWS:
            self.warnings[NO_UNSUBSCRIBE] += 1
        for name, values in fields.items():
            if is_structured(name) and any("=?" in v for v in values):
                self.errors[f"an encoded word in {name} (RFC 2047 §5 allows none there)"] += 1
        author = _ADDRESS.search((fields.get("from") or [""])[0])
        domain = author.group(2).lower() if author else ""
        relays = FREE_MAIL.get(domain)
        relay = self.relay
        if relays and relay and not any(relay == r or relay.endswith("." + r) for r in relays):
            self.warnings[
                f"From is on {domain}, sent through {relay}: {domain}'s DMARC "
                "policy makes receivers refuse it; send from your own domain"
            ] += 1
        for signature in fields.get("dkim-signature", ()):
            d = _DKIM_D.search(signature)
            if d is not None and domain and not _aligned(d.group(1).lower(), domain):
                self.warnings[
                    f"DKIM d={d.group(1)} is not aligned with the From domain {domain} "
                    "(DMARC needs one of them to be the other or its parent)"
                ] += 1
        if _TEXT_PLAIN.search(message.data) is None:
            self.warnings[NO_TEXT] += 1

    def watch(self, render: Callable[..., Rendered]) -> Callable[..., Rendered]:
        """``render`` that checks each message it makes."""

        def render_checked(fields: Any, *, message_id: str) -> Rendered:
            message = render(fields, message_id=message_id)
            self.check(message)
            return message

        return render_checked

    def report(self, say: Callable[[str], None], *, of: str = "", clean: bool = False) -> bool:
        """Print each finding once with its count of rows; True if sending must stop.

        ``clean``: say so when there is nothing to report (a dry run).
        """
        if clean and not (self.errors or self.warnings):
            say(f"lint: no problems in {self.checked:,} message(s){of}")
        for kind, counts in (("error", self.errors), ("warning", self.warnings)):
            if kind == "warning" and self.strict:
                kind = "error (--strict)"
            for text, count in counts.items():
                # A count of 0: a finding about the campaign, not its rows (DNS).
                rows = f" [{count:,} row(s){of}]" if count else ""
                say(f"lint {kind}: {text}{rows}")
        return bool(self.errors or (self.strict and self.warnings))

    def verdict(self) -> str:
        """One line for the summary: what was checked and what was found."""
        found = sum(len(counts) for counts in (self.errors, self.warnings))
        what = f"{found} finding(s), printed before sending" if found else "no problems"
        return f"{what} in the first {self.checked:,} message(s)"


def lint_sample(
    rows: Iterable[Row | BadRow], render: Callable[..., Rendered], message_id: Callable[[str], str]
) -> int:
    """Render the first ``SAMPLE_ROWS`` rows with ``render`` (a :meth:`Lint.watch`), send
    nothing; the number of rows looked at. Rows the template refuses are left to the run,
    which reports them."""
    rows = iter(rows)
    count = 0
    try:
        for row in itertools.islice(rows, SAMPLE_ROWS):
            count += 1
            if isinstance(row, Row):
                try:
                    render(row.fields, message_id=message_id(row.key))
                except RowError:
                    continue
    finally:
        close = getattr(rows, "close", None)  # a generator holding the file open
        if close is not None:
            close()
    return count
