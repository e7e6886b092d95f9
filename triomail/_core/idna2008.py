"""International domain names as the DNS knows them today: IDNA 2008 with UTS #46 (sans-IO).

Theory of operation
-------------------
A domain with non-ASCII labels (U-labels) must become A-labels (``xn--`` Punycode,
RFC 5891 §4) wherever the peer expects ASCII: an SMTP path without SMTPUTF8 (RFC 6531
§3.2), an address header for a server without it, the ``d=`` of a DKIM signature, a DNS
query. Python's built-in ``idna`` codec implements IDNA 2003 (RFC 3490, Unicode 3.2), which
names *other* domains than registries and browsers do:

* the deviation characters ß, ς, ZWJ and ZWNJ are mapped away by 2003 (``straße`` becomes
  ``strasse``) and kept by non-transitional UTS #46 (``xn--strae-oqa``);
* characters newer than Unicode 3.2 are unassigned to 2003 (``ᏸᏸ.com`` gives the wrong
  ``xn--ocea.com``; 2008 case-folds to ``ꮸꮸ`` first and gives ``xn--gcea.com``);
* symbols such as ``☃`` are allowed by 2003 and DISALLOWED by RFC 5892.

So this module converts through the ``idna`` package (already installed as trio's
dependency) with UTS #46 mapping, non-transitional processing (UTS #46 §4, the choice
of the WHATWG URL standard), the RFC 5893 bidi rule and the RFC 5892 contextual rules
(CONTEXTJ for the joiners, CONTEXTO for the middle dot and the Arabic-Indic digits).
Hyphens are checked as RFC 5891 §4.2.3.1 says: none at the start or end of a label, and
none in the third and fourth positions unless the label is an A-label.
"""

from __future__ import annotations

import idna

from .errors import LocalProtocolError

__all__ = ["a_label_domain", "ascii_domain", "idna_domain"]


def a_label_domain(domain: str) -> str:
    """The A-label form of ``domain`` under IDNA 2008 / UTS #46, non-transitional.

    ASCII labels are lower-cased on the way (UTS #46 maps them). A trailing dot (the
    root) is kept. Raises :class:`ValueError` (``idna.IDNAError``, a :class:`UnicodeError`)
    naming the rule that refused the domain.
    """
    encoded: bytes = idna.encode(domain, uts46=True, transitional=False)
    return encoded.decode("ascii")


def ascii_domain(name: str) -> str:
    """A DNS name for a query or a DKIM tag: ASCII as given, otherwise :func:`a_label_domain`.

    ASCII names are not put through IDNA, whose label rules are narrower than DNS's: a
    selector may hold an underscore, an old label ``--`` in its third and fourth places.
    """
    return name if name.isascii() else a_label_domain(name)


def idna_domain(domain: str, address: str) -> str:
    """:func:`a_label_domain` for the domain of ``address``; raises :class:`LocalProtocolError`.

    This is the drop-in replacement of ``_core.protocol.idna_domain``: under IDNA 2008
    the deviation characters have one meaning, so no ``strict`` switch is needed.
    """
    try:
        return a_label_domain(domain)
    except UnicodeError as exc:  # idna.IDNAError and its subclasses
        raise LocalProtocolError(f"invalid domain in {address!r}: {exc}") from None
