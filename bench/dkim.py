"""What a DKIM signature costs per message: ``python -m bench.dkim [--sizes 2048,5120]``.

For each body size it times, per message (the best of ``--rounds`` rounds of
``--messages`` messages, so that a busy neighbour on the machine inflates nothing):

* ``split+bh``: splitting the header section and the relaxed body hash alone;
* ``rsa-2048`` / ``ed25519``: a whole :meth:`DKIMSigner.sign` (canonicalisation, hashes,
  folding, the signature);
* ``rsa+ed25519``: both signatures through one :class:`DKIMMultiSigner` (one body hash);
* ``crypto rsa`` / ``crypto ed``: the bare ``cryptography`` signing call, for reference;
* ``dkimpy rsa``: dkimpy's own ``dkim.sign`` when dkimpy is installed (pure-Python RSA).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from bench._common import message
from triomail._core.dkim import DKIMMultiSigner, DKIMSigner, SplitMessage

EXTRA_HEADERS = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://example.com/unsubscribe/0123456789abcdef>,\r\n"
    b" <mailto:unsubscribe@example.com?subject=0123456789abcdef>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
)


def per_message(work: Callable[[], object], messages: int, rounds: int) -> float:
    """Best seconds per call over ``rounds`` rounds of ``messages`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(messages):
            work()
        best = min(best, (time.perf_counter() - start) / messages)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,5120", help="body octets, comma-separated")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_signer = DKIMSigner("example.com", "rsa", rsa_key)
    ed_signer = DKIMSigner("example.com", "ed", ed_key)
    both = DKIMMultiSigner(rsa_signer, ed_signer)
    digest = hashlib.sha256(b"x").digest()
    try:
        import dkim as dkimpy
    except ImportError:
        dkimpy = None
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )

    for size in (int(s) for s in args.sizes.split(",")):
        data = EXTRA_HEADERS + message(size)
        cases: dict[str, Callable[[], object]] = {
            "split+bh": lambda data=data: SplitMessage(data).body_hash(),
            "rsa-2048": lambda data=data: rsa_signer.sign(data),
            "ed25519": lambda data=data: ed_signer.sign(data),
            "rsa+ed25519": lambda data=data: both.sign(data),
            "crypto rsa": lambda: rsa_key.sign(digest, padding.PKCS1v15(), hashes.SHA256()),
            "crypto ed": lambda: ed_key.sign(digest),
        }
        if dkimpy is not None:
            cases["dkimpy rsa"] = lambda data=data: dkimpy.sign(data, b"rsa", b"example.com", pem)
        print(f"message of {len(data)} octets ({size} octets of body):")
        for name, work in cases.items():
            slow = name == "dkimpy rsa"
            seconds = per_message(work, args.messages // 10 if slow else args.messages, args.rounds)
            print(f"  {name:<12} {seconds * 1e6:9.1f} us/message")


if __name__ == "__main__":
    main()
