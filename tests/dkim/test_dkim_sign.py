"""DKIMSigner's signatures, checked by dkimpy (an implementation we did not write)."""

from __future__ import annotations

import base64
import re

import dkim
import pytest
from cases import MESSAGES
from conftest import DOMAIN, dnsfunc_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triomail._core.dkim import (
    DEFAULT_HEADERS,
    DKIMMultiSigner,
    DKIMSigner,
    SplitMessage,
    load_private_key,
)


def verify_all(message: bytes, *signers: DKIMSigner) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, top first."""
    checker = dkim.DKIM(message)
    count = len(re.findall(rb"^DKIM-Signature:", message, re.M))
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(checker.verify(idx=i, dnsfunc=dnsfunc_for(*signers)))
        except dkim.ValidationError:  # dkim.verify() turns this into False; DKIM.verify raises
            verdicts.append(False)
    return verdicts


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkimpy_verifies(
    name: str, algorithm: str, rsa_signer: DKIMSigner, ed_signer: DKIMSigner
) -> None:
    signer = rsa_signer if algorithm == "rsa" else ed_signer
    message = MESSAGES[name]
    signed = signer.sign(message) + message
    assert verify_all(signed, signer) == [True]
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(signer))


@pytest.mark.parametrize("name", MESSAGES)
def test_both_signatures_verify(name: str, rsa_signer: DKIMSigner, ed_signer: DKIMSigner) -> None:
    message = MESSAGES[name]
    fields = DKIMMultiSigner(rsa_signer, ed_signer).sign(message)
    assert fields.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in fields.split(b"\r\nDKIM-Signature:")[0]
    assert verify_all(fields + message, rsa_signer, ed_signer) == [True, True]


@pytest.mark.parametrize(
    ("change", "old", "new"),
    [
        ("body", b"Hello Bob,", b"Hello Eve,"),
        ("signed header", b"Subject: Hello", b"Subject: Hellp"),
        ("second From (over-signed)", b"To: bob", b"From: eve@evil.example\r\nTo: bob"),
        ("added List-Unsubscribe-Post", b"List-Unsubscribe-Post: ", b"X-Was: "),
        ("body line added", b"bye.\r\n", b"bye.\r\nP.S.\r\n"),
    ],
)
@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_tampering_is_detected(
    change: str,
    old: bytes,
    new: bytes,
    algorithm: str,
    rsa_signer: DKIMSigner,
    ed_signer: DKIMSigner,
) -> None:
    signer = rsa_signer if algorithm == "rsa" else ed_signer
    message = MESSAGES["plain"]
    tampered = signer.sign(message) + message.replace(old, new, 1)
    assert tampered != signer.sign(message) + message
    assert verify_all(tampered, signer) == [False]


def test_wrong_published_key_fails(rsa_signer: DKIMSigner, rsa_key: rsa.RSAPrivateKey) -> None:
    other = DKIMSigner(DOMAIN, "rsa2048", rsa.generate_private_key(65537, 2048))
    message = MESSAGES["plain"]
    assert verify_all(other.sign(message) + message, rsa_signer) == [False]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Subject: Hello", b"Subject:   Hello  "),  # relaxed header: WSP collapsed, trimmed
        (b"Subject: Hello", b"subject: Hello"),  # names are case-insensitive
        (b"To: bob@example.org", b"To:\r\n bob@example.org"),  # re-folded by a relay
        (b"bye.\r\n", b"bye.  \r\n\r\n\r\n"),  # relaxed body: trailing WSP and blank lines
        (b"X-Unsigned", b"X-Unsigned"),  # unchanged, for the baseline
    ],
)
def test_relaxed_survives_relay_rewrites(old: bytes, new: bytes, rsa_signer: DKIMSigner) -> None:
    message = MESSAGES["plain"]
    signed = rsa_signer.sign(message) + message.replace(old, new)
    assert verify_all(signed, rsa_signer) == [True]


def tags(field: bytes) -> dict[str, str]:
    unfolded = re.sub(r"\s+", "", field.decode().partition(":")[2])
    return dict(tag.split("=", 1) for tag in unfolded.rstrip(";").split(";"))


def test_default_headers_cover_one_click_and_oversign_from(rsa_signer: DKIMSigner) -> None:
    signature = tags(rsa_signer.sign(MESSAGES["plain"], now=1_800_000_000))
    # Present fields in DEFAULT_HEADERS order, From once more; Cc, List-Id, Reply-To absent.
    assert signature["h"] == (
        "From:From:To:Subject:Date:Message-ID:MIME-Version:Content-Type:"
        "List-Unsubscribe:List-Unsubscribe-Post"
    )
    assert {"Cc", "List-Id", "Reply-To"} <= set(DEFAULT_HEADERS)
    assert signature["v"] == "1"
    assert signature["a"] == "rsa-sha256"
    assert signature["c"] == "relaxed/relaxed"
    assert (signature["d"], signature["s"], signature["t"]) == (DOMAIN, "rsa2048", "1800000000")
    assert "x" not in signature


def test_repeated_header_is_listed_once_per_instance(ed_signer: DKIMSigner) -> None:
    message = b"From: a@example.com\r\nTo: b@example.org\r\nTo: c@example.org\r\n\r\nx\r\n"
    assert tags(ed_signer.sign(message))["h"] == "From:From:To:To"
    assert verify_all(ed_signer.sign(message) + message, ed_signer) == [True]
    # Swapping the two To fields changes the bottom-up order the signature fixed.
    swapped = message.replace(b"b@example", b"X").replace(b"c@example", b"b@example")
    swapped = swapped.replace(b"X", b"c@example")
    assert verify_all(ed_signer.sign(message) + swapped, ed_signer) == [False]


def test_options(ed_key: ed25519.Ed25519PrivateKey) -> None:
    signer = DKIMSigner(
        "bücher.example.",
        "sel",
        ed_key,
        headers=["From", "Subject"],
        oversign=["From", "Subject"],
        timestamp=False,
        expires_in=3600,
    )
    signature = tags(signer.sign(MESSAGES["plain"], now=1000))
    assert signature["d"] == "xn--bcher-kva.example"
    assert signature["h"] == "From:From:Subject:Subject"
    assert "t" not in signature
    assert signature["x"] == "4600"
    assert verify_all(signer.sign(MESSAGES["plain"]) + MESSAGES["plain"], signer) == [True]


def test_header_names_are_listed_once(ed_key: ed25519.Ed25519PrivateKey) -> None:
    signer = DKIMSigner(DOMAIN, "ed", ed_key, headers=["From", "To", "to", "From"])
    assert signer.headers == ("From", "To")
    message = MESSAGES["plain"]
    assert tags(signer.sign(message))["h"] == "From:From:To"
    assert verify_all(signer.sign(message) + message, signer) == [True]


def test_expiry_must_be_positive(ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="positive"):
        DKIMSigner(DOMAIN, "ed", ed_key, expires_in=0)


def test_private_key_is_not_an_attribute(ed_signer: DKIMSigner) -> None:
    assert not any(
        isinstance(v, ed25519.Ed25519PrivateKey)
        for k, v in vars(ed_signer).items()
        if not k.startswith("_")
    )
    assert repr(ed_signer) == "DKIMSigner('example.com', 'ed', ed25519-sha256)"


@pytest.mark.parametrize("bad", ["", "From:", "Sub ject", "Ä"])
def test_header_names_are_checked(bad: str, ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="header field name"):
        DKIMSigner(DOMAIN, "s", ed_key, headers=["From", bad])


@pytest.mark.parametrize("name", ["plain", "long-folded-headers", "large-1MB"])
def test_folding(name: str, rsa_signer: DKIMSigner, ed_signer: DKIMSigner) -> None:
    fields = DKIMMultiSigner(rsa_signer, ed_signer).sign(MESSAGES[name])
    assert fields.endswith(b"\r\n")
    lines = fields[:-2].split(b"\r\n")
    assert all(len(line) <= 78 for line in lines), [len(line) for line in lines]
    assert all(line.startswith((b"DKIM-Signature: ", b"\t")) for line in lines)


def test_long_header_list_folds_inside_h(ed_key: ed25519.Ed25519PrivateKey) -> None:
    names = [f"X-Header-Number-{i}" for i in range(30)]
    head = b"".join(f"{n}: {i}\r\n".encode() for i, n in enumerate(names))
    message = b"From: a@example.com\r\n" + head + b"\r\nbody\r\n"
    signer = DKIMSigner(DOMAIN, "ed", ed_key, headers=["From", *names])
    field = signer.sign(message)
    assert max(len(line) for line in field.split(b"\r\n")) <= 78
    assert tags(field)["h"] == ":".join(["From", "From", *names])
    assert verify_all(field + message, signer) == [True]


def test_dns_record(rsa_signer: DKIMSigner, ed_signer: DKIMSigner) -> None:
    assert rsa_signer.dns_name == "rsa2048._domainkey.example.com"
    assert rsa_signer.dns_record() == f"v=DKIM1; k=rsa; p={rsa_signer.public_key}"
    der = base64.b64decode(rsa_signer.public_key)
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.key_size == 2048
    assert ed_signer.dns_record().startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_signer.public_key)) == 32  # RFC 8463 §4: the raw key


def test_key_sources(tmp_path: object, rsa_key: rsa.RSAPrivateKey) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    plain = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    locked = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    (tmp_path / "plain.pem").write_bytes(plain)
    (tmp_path / "locked.pem").write_bytes(locked)
    expected = DKIMSigner(DOMAIN, "s", rsa_key).public_key
    for source, passphrase in [
        (plain, None),
        (plain.decode(), None),
        (tmp_path / "plain.pem", None),
        (str(tmp_path / "plain.pem"), None),
        (locked, b"s3cret"),
        (tmp_path / "locked.pem", b"s3cret"),
    ]:
        signer = DKIMSigner(DOMAIN, "s", source, passphrase=passphrase)  # type: ignore[arg-type]
        assert signer.public_key == expected
    with pytest.raises((ValueError, TypeError)):
        load_private_key(locked, b"wrong")
    with pytest.raises(TypeError):
        load_private_key(locked)  # encrypted, no passphrase


def test_unsuitable_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="RSA or Ed25519"):
        load_private_key(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="RSA or Ed25519"):
        load_private_key(ec_pem)


def test_rsa_1024_is_the_floor() -> None:
    signer = DKIMSigner(DOMAIN, "old", rsa.generate_private_key(65537, 1024))
    message = MESSAGES["plain"]
    assert verify_all(signer.sign(message) + message, signer) == [True]


def test_split_message_shares_the_body_hash() -> None:
    split = SplitMessage(MESSAGES["plain"])
    assert split.body_hash() is split.body_hash()
    assert list(split.fields)[:2] == [b"from", b"to"]
    assert SplitMessage(b"\r\nbody only\r\n").fields == {}


def test_multi_signer_needs_a_signer() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DKIMMultiSigner()


def test_long_domain_goes_over_78_but_never_998(ed_key: ed25519.Ed25519PrivateKey) -> None:
    domain = ".".join(["d" * 63] * 3) + ".example"  # 200 octets: d= cannot be folded
    signer = DKIMSigner(domain, "s" * 63, ed_key)
    field = signer.sign(MESSAGES["plain"])
    lengths = [len(line) for line in field.split(b"\r\n")]
    assert 78 < max(lengths) < 998
    records = {f"{signer.dns_name}.".encode(): signer.dns_record().encode()}
    assert dkim.verify(field + MESSAGES["plain"], dnsfunc=lambda name, timeout=5: records[name])


_TEXT = st.text(alphabet=" \t.:;=aZ\u00e9\u2709", max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.lists(_TEXT, min_size=1, max_size=3), min_size=1, max_size=4),
    body=st.lists(_TEXT, max_size=12),
)
def test_dkimpy_verifies_any_whitespace(
    values: list[list[str]], body: list[str], ed_signer: DKIMSigner
) -> None:
    """Header values folded anywhere, bodies of WSP, dots and 8-bit text: dkimpy agrees."""
    fold = "\r\n "
    head = "".join(
        f"{name}: {fold.join(parts)}\r\n"
        for name, parts in zip(["Subject", "To", "Cc", "Reply-To"], values, strict=False)
    )
    text = "From: a@example.com\r\n" + head + "\r\n" + "".join(f"{line}\r\n" for line in body)
    message = text.encode()
    assert verify_all(ed_signer.sign(message) + message, ed_signer) == [True]


@pytest.mark.parametrize("names", [["From"], [f"X-Long-Header-Name-{i}" for i in range(20)]])
@pytest.mark.parametrize("domain", ["example.com", ".".join(["d" * 63] * 3)])
def test_signature_field_canonical_form_without_regex(names: list[str], domain: str) -> None:
    """The shortcut for the field's relaxed form agrees with the general canonicaliser."""
    from triomail._core.dkim import _append, _fold, _relaxed_header, _relaxed_signature_field

    lines = _fold(["DKIM-Signature:"], ["v=1", f"d={domain}", "h=" + ":".join(names), "bh=x"])
    _append(lines, "b=", " ")
    field = "\r\n".join(lines).encode()
    assert _relaxed_signature_field(lines) == _relaxed_header(field)[:-2]
