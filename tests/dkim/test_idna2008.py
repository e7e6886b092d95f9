"""IDNA 2008 / UTS #46 non-transitional, where it differs from the stdlib's IDNA 2003 codec."""

from __future__ import annotations

import re

import pytest

from triomail._core.errors import LocalProtocolError
from triomail._core.idna2008 import a_label_domain, ascii_domain, idna_domain


@pytest.mark.parametrize(
    ("domain", "a_label", "idna2003"),
    [
        # Newer than Unicode 3.2: 2008 case-folds U+13F8 to U+ABB8 first.
        ("ᏸᏸ.com", "xn--gcea.com", "xn--ocea.com"),
        # Deviation characters are kept (non-transitional), not mapped away (2003 maps final sigma to sigma).
        ("straße.de", "xn--strae-oqa.de", "strasse.de"),
        ("ςigma.example", "xn--igma-fod.example", "xn--igma-kod.example"),
        # Agreement: case mapping, CJK, full-width letters, the root dot.
        ("BÜCHER.example", "xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("例子.测试", "xn--fsqu00a.xn--0zwm56d", "xn--fsqu00a.xn--0zwm56d"),
        ("\uff41\uff42\uff43.例子", "abc.xn--fsqu00a", "abc.xn--fsqu00a"),
        ("例子.测试.", "xn--fsqu00a.xn--0zwm56d.", "xn--fsqu00a.xn--0zwm56d."),
        # CONTEXTO: a middle dot between two l's (Catalan) is allowed.
        ("l·l.example", "xn--ll-0ea.example", "xn--ll-0ea.example"),
        # An RTL label that passes the bidi rule.
        ("\u0627\u0644\u0639\u0631\u0628\u064a\u0629.example", "xn--mgbcd4a2b0d2b.example", None),
        # Already A-labels: checked and passed through.
        ("xn--gcea.com", "xn--gcea.com", None),
    ],
)
def test_a_labels(domain: str, a_label: str, idna2003: str | None) -> None:
    assert a_label_domain(domain) == a_label
    if idna2003 is not None:
        assert domain.encode("idna").decode().lower() == idna2003


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("☃.net", "not allowed"),  # DISALLOWED symbol (2003 allowed it: xn--n3h.net)
        ("a\u200db.example", "Joiner"),  # CONTEXTJ: ZWJ only after a virama
        ("a\u200cb.example", "Joiner"),  # CONTEXTJ: ZWNJ likewise
        ("a·b.example", "not allowed"),  # CONTEXTO: middle dot outside l·l
        ("\u0660\u06f0.example", "not allowed"),  # CONTEXTO: Arabic-Indic digit sets mixed
        ("a\u0627.example", "direction"),  # bidi: RTL letter in an LTR label (RFC 5893 §2)
        ("\u0627a.example", "direction"),  # bidi: LTR letter in an RTL label
        ("-bücher.example", "hyphen"),  # RFC 5891 §4.2.3.1
        ("bücher-.example", "hyphen"),
        ("bü--cher.example", "hyphen"),  # 3rd and 4th position
        ("xn--zz.com", "A-label"),  # not valid Punycode
        ("bücher..example", "Empty Label"),
        ("ü" * 60 + ".example", "too long"),  # 63-octet limit applies to the A-label
        ("a_ü.example", "not allowed"),
    ],
)
def test_refused(domain: str, why: str) -> None:
    with pytest.raises(UnicodeError, match=why):
        a_label_domain(domain)
    with pytest.raises(
        LocalProtocolError, match=re.escape(f"invalid domain in {f'user@{domain}'!r}")
    ):
        idna_domain(domain, f"user@{domain}")


def test_error_is_a_value_error() -> None:
    """Callers may catch ValueError (UnicodeError is one) without importing idna."""
    with pytest.raises(ValueError):
        a_label_domain("☃.net")


def test_idna_domain_is_the_protocol_drop_in() -> None:
    assert idna_domain("straße.de", "user@straße.de") == "xn--strae-oqa.de"


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("s_2024", "s_2024"),  # DNS allows what IDNA refuses
        ("r3---sn-x.example", "r3---sn-x.example"),
        ("Example.COM", "Example.COM"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_ascii_domain_leaves_ascii_alone(name: str, wire: str) -> None:
    assert ascii_domain(name) == wire
