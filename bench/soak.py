"""Fault-injection soak of the pool: ``python -m bench.soak [--messages N] [--rate P]``.

The capture sink answers about ``P`` of all transactions with a fault -- 421, 451, a
dropped connection (before or after a reply, or in the middle of the data), or a reply
stalled past the pool's per-message deadline -- chosen at random per transaction, and
the pool sends ``N`` messages through 20 connections. At the end every message must
have a result (zero lost), every message the pool calls accepted must be in the sink,
and every message the sink holds twice must be one whose result reports the duplicate
risk (an unknown outcome on the way, R37/R38).
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import time
from dataclasses import dataclass, field
from functools import partial

import trio

import triomail
from triomail.testing import Fault, SMTPSink

_KINDS = (
    ("MAIL", {"code": 421}),
    ("RCPT", {"code": 451}),
    ("RCPT", {"drop": "before_reply"}),
    ("DATA", {"drop": "during_data", "after_bytes": 40}),
    (".", {"drop": "before_reply"}),  # the message was stored: an unknown outcome
    (".", {"code": 451}),
    ("MAIL", {"drop": "after_reply"}),
    (".", {"delay": 3.0}),  # stalls past message_deadline
)


@dataclass
class SoakReport:
    messages: int
    faults_planned: int
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: int = 0
    accepted_missing: int = 0
    duplicates: int = 0
    unflagged_duplicates: int = 0
    retries: int = 0
    transparent_retries: int = 0
    unknown_seen: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"messages sent:            {self.messages}",
            f"faults planned:           {self.faults_planned} transactions",
            "outcomes:                 "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"retries:                  {self.retries} (+{self.transparent_retries} transparent)",
            f"unknown outcomes seen:    {self.unknown_seen}",
            f"lost messages:            {self.lost}",
            f"accepted but not stored:  {self.accepted_missing}",
            f"delivered twice:          {self.duplicates} (unflagged: {self.unflagged_duplicates})",
            f"time:                     {self.seconds:.1f} s",
        ]


def plan_faults(messages: int, share: float, seed: int) -> list[Fault]:
    rng = random.Random(seed)
    faults = []
    # Transactions are numbered by the sink across retries: plan past the first pass.
    for number in range(1, int(messages * 1.3) + 1):
        if rng.random() < share:
            command, knobs = rng.choice(_KINDS)
            faults.append(Fault(command, message=number, times=1, **knobs))  # type: ignore[arg-type]
    return faults


async def run_soak(
    messages: int = 10_000, share: float = 0.05, seed: int = 1, *, pipelined: bool = False
) -> SoakReport:
    """Run the soak; ``pipelined`` drops the per-message deadline, so workers pipeline
    batches of messages (stalls then just take their time)."""
    faults = plan_faults(messages, share, seed)
    report = SoakReport(messages, len(faults))
    started = time.perf_counter()
    async with SMTPSink(tls=False, faults=faults, max_stored=None, strict=True) as sink:
        server = triomail.Server(sink.host, sink.port, tls="none")
        policy = triomail.RetryPolicy(max_attempts=8, initial_backoff=0.01, max_backoff=0.1)
        results: dict[int, triomail.SendResult] = {}
        prepared = (
            triomail.prepare(
                f"Message-ID: <soak-{i}@triomail.test>\r\nSubject: soak {i}\r\n\r\n"
                f"message {i}\r\n".encode(),
                sender="soak@example.com",
                recipients=[f"r{i}@example.org"],
                tag=i,
            )
            for i in range(messages)
        )
        async with triomail.open_pool(
            server, connections=20, retry=policy, message_deadline=None if pipelined else 1.0
        ) as pool:
            async with pool.send_all(prepared) as stream:
                async for result in stream:
                    results[int(result.tag)] = result  # type: ignore[call-overload]
            stats = pool.statistics()
        stored = collections.Counter(str(m.message["Message-ID"]) for m in sink.messages)
    report.seconds = time.perf_counter() - started
    report.lost = messages - len(results)
    report.retries = stats.retries
    report.transparent_retries = stats.transparent_retries
    report.unknown_seen = stats.unknown_seen
    for i, result in results.items():
        report.outcomes[result.outcome.value] += 1
        key = f"<soak-{i}@triomail.test>"
        if result.ok and stored[key] == 0:
            report.accepted_missing += 1
        if stored[key] > 1:
            report.duplicates += 1
            if not result.earlier_unknown:
                report.unflagged_duplicates += 1
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=0.05, help="share of faulty transactions")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # Each lost reply is a logged warning; the summary counts them instead.
    logging.getLogger("triomail").setLevel(logging.ERROR)
    for pipelined in (False, True):
        mode = "pipelined batches" if pipelined else "one at a time, 1 s message_deadline"
        print(f"-- {mode}")
        report = trio.run(
            partial(run_soak, args.messages, args.rate, args.seed, pipelined=pipelined)
        )
        print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
