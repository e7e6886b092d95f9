"""What a DKIM signature costs per message: ``python -m bench.dkim [--sizes 2048,5120]``.

For each body size it times, per message (the best of ``--rounds`` rounds of
``--messages`` messages, so that a busy neighbour on the machine inflates nothing):

* ``split+bh``: splitting the header section and the relaxed body hash alone;
* ``rsa-2048`` / ``ed25519``: a whole :meth:`DKIMSigner.sign` (canonicalisation, hashes,
  folding, the signature);
* ``rsa+ed25519``: both signatures through one :class:`DKIMMultiSigner` (one body hash);
* ``crypto rsa`` / ``crypto ed``: the bare ``cryptography`` signing call, for reference;
* ``dkimpy rsa``: dkimpy's own ``dkim.sign`` when dkimpy is installed (pure-Python RSA).

``--instructions`` counts instructions instead, under ``valgrind --tool=callgrind``: each
case runs twice in a child, with ``--small`` and ``--large`` messages, and the difference
is divided by the difference in messages, so start-up, imports and key loading cancel out.
That figure does not move with the load of the machine (the keys are fixed PEM files).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from bench._common import message
from triomail._core.dkim import DKIMMultiSigner, DKIMSigner, SplitMessage, load_private_key

EXTRA_HEADERS = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://example.com/unsubscribe/0123456789abcdef>,\r\n"
    b" <mailto:unsubscribe@example.com?subject=0123456789abcdef>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
)
SLOW = {"dkimpy rsa"}  # run a tenth as many times


def cases(size: int, rsa_pem: bytes, ed_pem: bytes) -> dict[str, Callable[[], object]]:
    """The timed operations on a message with ``size`` octets of body."""
    rsa_key = load_private_key(rsa_pem)
    ed_key = load_private_key(ed_pem)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)
    rsa_signer = DKIMSigner("example.com", "rsa", rsa_key)
    ed_signer = DKIMSigner("example.com", "ed", ed_key)
    both = DKIMMultiSigner(rsa_signer, ed_signer)
    data = EXTRA_HEADERS + message(size)
    digest = hashlib.sha256(b"x").digest()
    found: dict[str, Callable[[], object]] = {
        "split+bh": lambda: SplitMessage(data).body_hash(),
        "rsa-2048": lambda: rsa_signer.sign(data),
        "ed25519": lambda: ed_signer.sign(data),
        "rsa+ed25519": lambda: both.sign(data),
        "crypto rsa": lambda: rsa_key.sign(digest, padding.PKCS1v15(), hashes.SHA256()),
        "crypto ed": lambda: ed_key.sign(digest),
    }
    try:
        import dkim as dkimpy
    except ImportError:
        return found
    found["dkimpy rsa"] = lambda: dkimpy.sign(data, b"rsa", b"example.com", rsa_pem)
    return found


def per_message(work: Callable[[], object], messages: int, rounds: int) -> float:
    """Best seconds per call over ``rounds`` rounds of ``messages`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(messages):
            work()
        best = min(best, (time.perf_counter() - start) / messages)
    return best


def instructions(keys: Path, size: int, case: str, messages: int) -> int:
    """Instructions (Ir) of a child that runs ``case`` ``messages`` times under callgrind."""
    out = keys / "callgrind.out"
    done = subprocess.run(
        [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, "-m", "bench.dkim", "--keys", str(keys), "--sizes", str(size),
            "--only", case, "--messages", str(messages), "--rounds", "1",
        ],
        capture_output=True, text=True, timeout=1800,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{case} under callgrind failed:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,5120", help="body octets, comma-separated")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--instructions", action="store_true", help="count under callgrind")
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=300)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)  # for the children
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        keys = args.keys or Path(tmp)
        if args.keys is None:
            pkcs8 = serialization.PrivateFormat.PKCS8
            plain = serialization.NoEncryption()
            pem = serialization.Encoding.PEM
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            ed_key = ed25519.Ed25519PrivateKey.generate()
            (keys / "rsa.pem").write_bytes(rsa_key.private_bytes(pem, pkcs8, plain))
            (keys / "ed.pem").write_bytes(ed_key.private_bytes(pem, pkcs8, plain))
        rsa_pem, ed_pem = (keys / "rsa.pem").read_bytes(), (keys / "ed.pem").read_bytes()
        for size in (int(s) for s in args.sizes.split(",")):
            found = cases(size, rsa_pem, ed_pem)
            if args.only:
                per_message(found[args.only], args.messages, args.rounds)
                return
            octets = len(EXTRA_HEADERS + message(size))
            print(f"message of {octets} octets ({size} octets of body):", flush=True)
            for name, work in found.items():
                if args.instructions:
                    small = instructions(keys, size, name, args.small)
                    large = instructions(keys, size, name, args.large)
                    count = (large - small) / (args.large - args.small)
                    print(f"  {name:<12} {count:12,.0f} instructions/message", flush=True)
                else:
                    runs = args.messages // 10 if name in SLOW else args.messages
                    seconds = per_message(work, runs, args.rounds)
                    print(f"  {name:<12} {seconds * 1e6:9.1f} us/message", flush=True)


if __name__ == "__main__":
    main()
