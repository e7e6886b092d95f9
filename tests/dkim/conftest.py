"""Keys and a verifier we did not write: dkimpy, fed the test keys instead of DNS."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from triomail._core.dkim import DKIMSigner

pytest.importorskip("nacl", reason="dkimpy verifies Ed25519 with PyNaCl (the test extra)")

DOMAIN = "example.com"


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def rsa_signer(rsa_key: rsa.RSAPrivateKey) -> DKIMSigner:
    return DKIMSigner(DOMAIN, "rsa2048", rsa_key)


@pytest.fixture(scope="session")
def ed_signer(ed_key: ed25519.Ed25519PrivateKey) -> DKIMSigner:
    return DKIMSigner(DOMAIN, "ed", ed_key)


def dnsfunc_for(*signers: DKIMSigner) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` serving the signers' key records (and nothing else)."""
    records = {f"{s.dns_name}.".encode(): s.dns_record().encode() for s in signers}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc
