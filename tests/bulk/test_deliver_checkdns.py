"""``triomail check-dns`` (issue 14) against a DNS server on loopback, never the network:
SPF, DMARC, the selector's key and that it is the signing key's public half."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers.dns_server import DNSServer, txt

from triomail._bulk.preflight import name_server
from triomail._cli import main
from triomail._core.dkim import DKIMSigner

DOMAIN = "example.com"
KEY = ed25519.Ed25519PrivateKey.generate()
SIGNER = DKIMSigner(DOMAIN, "news", KEY)


def records(
    dkim: str = SIGNER.dns_record(), dmarc: bool = True
) -> dict[tuple[str, str], list[str]]:
    found = {
        (DOMAIN, "TXT"): [txt("v=spf1 ip4:192.0.2.0/24 -all")],
        (SIGNER.dns_name, "TXT"): [txt(dkim)],
    }
    if dmarc:
        found[(f"_dmarc.{DOMAIN}", "TXT")] = [txt("v=DMARC1; p=reject")]
    return found


def key_file(tmp_path: Path, key: ed25519.Ed25519PrivateKey = KEY) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def check(
    nursery: trio.Nursery, served: dict[tuple[str, str], list[str]], *args: object
) -> int:
    server = DNSServer(served)
    port = await nursery.start(server.serve)
    argv = [
        "check-dns",
        "--from",
        f"news@{DOMAIN}",
        "--resolver",
        f"127.0.0.1:{port}",
        "--timeout",
        "5",
    ]
    return await trio.to_thread.run_sync(main, [*argv, *(str(a) for a in args)])


async def test_a_domain_set_up_for_bulk_mail_passes(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await check(
        nursery, records(), "--dkim-selector", "news", "--dkim-key", key_file(tmp_path)
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith(f"DNS preflight for {DOMAIN}: ok")
    assert "matches the signing key" in out


async def test_another_key_or_no_dmarc_fails(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = key_file(tmp_path, ed25519.Ed25519PrivateKey.generate())
    assert await check(nursery, records(), "--dkim-selector", "news", "--dkim-key", other) == 1
    assert "DKIM   mismatch" in capsys.readouterr().out
    assert await check(nursery, records(dmarc=False), "--dkim-selector", "news") == 1
    assert "DMARC  missing" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--resolver", "dns.example:53"], "name server dns.example:53: not ADDRESS[:PORT]"),
        (["--dkim-key", "nothing.pem"], "--dkim-key needs --dkim-selector"),
        (["--dkim-key", "nothing.pem", "--dkim-selector", "s"], "--dkim-key nothing.pem: "),
    ],
)
def test_bad_arguments_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    assert main(["check-dns", "--from", DOMAIN, *args]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"triomail check-dns: error: {error}")


def test_name_server_forms() -> None:
    assert name_server("127.0.0.1") == ("127.0.0.1", None)
    assert name_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert name_server("::1") == ("::1", None)
    assert name_server("[::1]:5353") == ("::1", 5353)


async def test_send_check_dns_is_part_of_a_dry_run(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t.txt").write_text(f"From: news@{DOMAIN}\nTo: {{{{email}}}}\nSubject: Hi\n\nHi.\n")
    (tmp_path / "rows.csv").write_text("email\na@example.org\n")
    good, bad = DNSServer(records()), DNSServer(records(dmarc=False))
    good_port, bad_port = await nursery.start(good.serve), await nursery.start(bad.serve)
    base = [
        "send", str(tmp_path / "rows.csv"), str(tmp_path / "t.txt"), "--dry-run", "--show", "0",
        "--check-dns", "--dkim-key", str(key_file(tmp_path)), "--dkim-selector", "news",
    ]  # fmt: skip

    async def send(port: int, *more: str) -> int:
        argv = [*base, "--dns-resolver", f"127.0.0.1:{port}", *more]
        return await trio.to_thread.run_sync(main, argv)

    assert await send(good_port) == 0
    captured = capsys.readouterr()
    assert f"DNS preflight for {DOMAIN}: ok" in captured.err
    assert "matches the signing key" in captured.err
    assert "lint: no problems in 1 message(s)" in captured.err
    assert await send(bad_port) == 0
    err = capsys.readouterr().err
    assert "DMARC  missing" in err
    assert "lint warning: the DNS preflight of the sending domain found problems (above)\n" in err
    assert await send(bad_port, "--strict") == 2
