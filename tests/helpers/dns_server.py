"""A DNS server on loopback for tests: fixed records, answered over a trio UDP socket.

Built from dnspython's own message classes (``dns.message.make_response``,
``dns.rrset.from_text``) so that the bytes on the wire are what a real server would send:
NOERROR with answers, NOERROR without (NODATA) when the name exists with other types,
NXDOMAIN when it does not exist at all, and the TC bit when an answer does not fit the
client's UDP payload (RFC 1035 §4.2.1, RFC 6891 §6.2.3). No TCP: the tests keep answers
small, and a truncated answer is itself something a test can ask for.

Records are given as ``{(name, type): [rdata text, ...]}``; :func:`txt` quotes a long
TXT value into the 255-octet character-strings a record is made of (RFC 1035 §3.3.14).

Run as a script (``python -m helpers.dns_server RECORDS.json --port 53 -- CMD ...``) it
serves while it runs CMD and exits with CMD's status: the OpenDKIM test uses that inside
a private network namespace, where port 53 on 127.0.0.1 is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

Records = Mapping[tuple[str, str], Sequence[str]]

_TTL = 300
_PLAIN_UDP = 512  # RFC 1035 §2.3.4, without EDNS


def txt(value: str) -> str:
    """TXT rdata text for ``value``, split into quoted strings of at most 255 octets."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class DNSServer:
    """Answers queries from ``records``; :attr:`queries` logs what was asked (name, type)."""

    def __init__(self, records: Records) -> None:
        self.records: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[str]] = {}
        for (name, rdtype), texts in records.items():
            key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
            self.records[key] = list(texts)
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query datagram (``None`` for garbage, which is dropped)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        for question in query.question:
            name, rdtype = question.name, question.rdtype
            self.queries.append((name.to_text(), dns.rdatatype.to_text(rdtype)))
            texts = self.records.get((name, rdtype))
            if texts:
                rrset = dns.rrset.from_text(name, _TTL, dns.rdataclass.IN, rdtype, *texts)
                response.answer.append(rrset)
            elif not any(known == name for known, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
        limit = max(query.payload, _PLAIN_UDP) if query.edns >= 0 else _PLAIN_UDP
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[int]
    ) -> None:
        """Serve UDP on ``host:port`` until cancelled; ``task_status`` gets the port."""
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((host, port))
            self.port = sock.getsockname()[1]
            task_status.started(self.port)
            while True:
                wire, peer = await sock.recvfrom(65535)
                reply = self.answer(wire)
                if reply is not None:
                    await sock.sendto(reply, peer)


async def _run(records: Records, port: int, command: Sequence[str], stdin: bytes) -> int:
    server = DNSServer(records)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", port)
        done = await trio.run_process(command, stdin=stdin, check=False)
        nursery.cancel_scope.cancel()
    return done.returncode


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help='JSON: [["name", "TYPE", ["rdata", ...]], ...]')
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--stdin", help="file fed to the command's standard input")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(None if argv is None else list(argv))
    with open(args.records, encoding="utf-8") as file:
        records = {(name, rdtype): texts for name, rdtype, texts in json.load(file)}
    stdin = b""
    if args.stdin:
        with open(args.stdin, "rb") as file:
            stdin = file.read()
    return trio.run(_run, records, args.port, args.command, stdin)


if __name__ == "__main__":
    sys.exit(main())
