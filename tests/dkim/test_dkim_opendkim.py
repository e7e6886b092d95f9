"""DKIMSigner's signatures, checked by OpenDKIM's libopendkim (C, the common milter).

Two ways in, both offline:

* ``opendkim -t FILE`` (Debian package ``opendkim``) runs the milter's verification on a
  message file. Its ``TestPublicKeys`` setting names a file of ``name record`` lines that
  replaces DNS, and with ``-vv`` it prints the Authentication-Results field it would add,
  one ``dkim=pass``/``dkim=fail`` per signature. This is the check that runs.
* ``opendkim-testmsg`` (package ``opendkim-tools``) has no key option for verifying: it
  asks DNS through the system resolver (``/etc/resolv.conf``, port 53). The test gives it
  one: a private mount and network namespace (``unshare``, as root) in which
  ``/etc/resolv.conf`` names 127.0.0.1 and helpers.dns_server answers on port 53. Debian
  12's build (2.11.0~beta2) refuses every input in ``dkim_chunk()`` with "Syntax error",
  even a two-line unsigned message in signing mode, so the test probes for that and skips.

``.ci/run`` installs both packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cases import MESSAGES
from helpers.dns_server import txt

from triomail._core.dkim import DKIMMultiSigner, DKIMSigner

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
TESTS_DIR = Path(__file__).resolve().parent.parent

needs_opendkim = pytest.mark.skipif(
    not os.access(OPENDKIM, os.X_OK),
    reason="opendkim not installed (Debian package `opendkim`; .ci/run installs it)",
)


def opendkim_verdicts(tmp_path: Path, message: bytes, *signers: DKIMSigner) -> list[str]:
    """The ``dkim=`` result of each signature, as ``opendkim -t`` reports them."""
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{s.dns_name} {s.dns_record()}\n" for s in signers))
    config = tmp_path / "opendkim.conf"
    config.write_text(f"Mode v\nSyslog no\nAlwaysAddARHeader yes\nTestPublicKeys {keys}\n")
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    done = subprocess.run(
        [OPENDKIM, "-x", str(config), "-vv", "-t", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    results = done.stdout.partition("hname='Authentication-Results'")[2]
    return re.findall(r"\bdkim=(\w+)", results)


@needs_opendkim
@pytest.mark.parametrize("name", MESSAGES)
def test_opendkim_verifies_both_signatures(
    name: str, tmp_path: Path, rsa_signer: DKIMSigner, ed_signer: DKIMSigner
) -> None:
    message = MESSAGES[name]
    signed = DKIMMultiSigner(rsa_signer, ed_signer).sign(message) + message
    assert opendkim_verdicts(tmp_path, signed, rsa_signer, ed_signer) == ["pass", "pass"]


@needs_opendkim
@pytest.mark.parametrize(
    ("old", "new"),
    [(b"Hello Bob", b"Hello Eve"), (b"Subject: Hello", b"Subject: Hellp")],
)
def test_opendkim_rejects_tampering(
    old: bytes, new: bytes, tmp_path: Path, rsa_signer: DKIMSigner, ed_signer: DKIMSigner
) -> None:
    message = MESSAGES["plain"]
    signatures = DKIMMultiSigner(rsa_signer, ed_signer).sign(message)
    tampered = signatures + message.replace(old, new)
    assert opendkim_verdicts(tmp_path, tampered, rsa_signer, ed_signer) == ["fail", "fail"]


def _testmsg_skip_reason() -> str | None:
    if not os.access(TESTMSG, os.X_OK):
        return "opendkim-testmsg not installed (Debian package `opendkim-tools`)"
    if not (shutil.which("unshare") and shutil.which("ip")) or os.geteuid() != 0:
        return "opendkim-testmsg verifies through DNS on port 53: needs root, unshare and ip"
    probe = subprocess.run(
        [TESTMSG], input=b"From: a@example.com\r\n\r\nx\r\n", capture_output=True, timeout=30
    )
    if b"dkim_chunk(): Syntax error" in probe.stderr:
        return (
            "this opendkim-testmsg refuses every message in dkim_chunk() (Syntax error), "
            "even an unsigned two-line one: a bug of Debian's 2.11.0~beta2 build"
        )
    return None


def verify_with_testmsg(tmp_path: Path, message: bytes, signer: DKIMSigner) -> int:
    """opendkim-testmsg's exit status for ``message``, its key served by loopback DNS."""
    records = tmp_path / "records.json"
    records.write_text(json.dumps([[signer.dns_name + ".", "TXT", [txt(signer.dns_record())]]]))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    script = (
        f"ip link set lo up && mount --bind {resolv} /etc/resolv.conf && exec {sys.executable}"
        f" -m helpers.dns_server {records} --port 53 --stdin {path} -- {TESTMSG}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--net", "--", "sh", "-c", script],
        cwd=TESTS_DIR,
        capture_output=True,
        timeout=60,
    )
    return done.returncode


def test_opendkim_testmsg(tmp_path: Path, rsa_signer: DKIMSigner) -> None:
    reason = _testmsg_skip_reason()
    if reason:
        pytest.skip(reason)
    message = MESSAGES["plain"]
    assert verify_with_testmsg(tmp_path, rsa_signer.sign(message) + message, rsa_signer) == 0
    tampered = rsa_signer.sign(message) + message.replace(b"Bob", b"Eve")
    assert verify_with_testmsg(tmp_path, tampered, rsa_signer) != 0
