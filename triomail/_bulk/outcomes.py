"""What becomes of each row: the journal, the progress counters and the JSONL report.

Theory of operation
-------------------
Every row ends up here exactly once: as a note of the planner (:mod:`.planner`: a bad
row, a duplicate, a row ``--at-most-once`` skips), or as the pool's result for its
message (:meth:`Outcomes.settle`). Each is recorded three ways: in the journal (the
truth ``--resume`` reads; batched commits, :mod:`.journal`), in the progress counters
(:mod:`.progress`) and, with ``--report``, as JSON lines (buffered, written in batches
and at least once per progress tick, so a killed run loses at most a tick of them).

A message the pool reports as transient after an earlier attempt lost the reply to
its final dot may have been delivered (R38): it is recorded as *unknown*, so that
``--resume`` sends it again with the same Message-ID, or skips it with
``--at-most-once``. Recipients with a final outcome are remembered (``done``) so
that a message sent again goes only to the others.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._core.reply import Reply
from .._core.results import Outcome, SendResult
from .brake import Brake
from .journal import BaseJournal, State
from .planner import ChunkPlan, Suppressed
from .progress import Display, Progress
from .recipients import BadRow, Row
from .suppression import SuppressionFile, address_level

__all__ = ["MAX_PRINTED_ERRORS", "Outcomes", "Tag"]

#: Bad rows printed on stderr before the rest are only counted (all are in --report).
MAX_PRINTED_ERRORS = 50
#: Report lines buffered before they are written.
REPORT_BATCH = 256

_ACCEPTED = Outcome.ACCEPTED
_TRANSIENT = Outcome.TRANSIENT
_PERMANENT = Outcome.PERMANENT
_UNKNOWN = Outcome.UNKNOWN
_FINAL = (_ACCEPTED, _PERMANENT)
_ACCEPTED_ONLY = (_ACCEPTED,)
#: How the client's own refusals begin (``local_failure`` and ``refused_locally`` in
#: :mod:`triomail._core.results`): the message never reached a server.
_LOCAL = ("not sent: ", "refused locally: ")


def refused_locally(result: SendResult) -> bool:
    """True for a permanent refusal by the client itself (SIZE, SMTPUTF8, 8BITMIME...):
    the journal records it ``refused``, checked again by --resume (issue 13, item 7)."""
    error = result.error
    return not result.mail_accepted and error is not None and error.startswith(_LOCAL)


#: One JSON object as one line (``json.dumps`` would build an encoder per call).
_json_line = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class Tag:
    """What the command keeps about a message while the pool has it (``SendResult.tag``)."""

    key: str
    line: int
    message_id: str
    done: tuple[str, ...]
    started: float = 0.0
    #: The state an earlier run left the message in (``--resume``), if any.
    previous: str | None = None


def _deciding_reply(result: SendResult, outcome: Outcome) -> Reply | None:
    """The reply that decided the message: a refused recipient's, not DATA's 554.

    When no recipient was accepted, the server answers DATA with "554 no valid
    recipients" (RFC 2920 §3.1), which says nothing of why: the first recipient reply
    with the message's outcome (its 451 or 550) is the one to report.
    """
    reply = result.reply
    recipients = result.recipients
    if outcome is _ACCEPTED or not recipients:
        return reply
    if any(r.outcome is _ACCEPTED for r in recipients):
        return reply
    for r in recipients:
        if r.reply is not None and r.outcome is outcome:
            return r.reply
    return reply


class Outcomes:
    """Records rows and results; :attr:`outstanding` holds the messages the pool has."""

    def __init__(
        self,
        journal: BaseJournal,
        progress: Progress,
        display: Display,
        recipients: Path,
        report_path: Path | None = None,
        *,
        content: str = "",
        suppress_to: SuppressionFile | None = None,
        brake: Brake | None = None,
    ) -> None:
        self.journal = journal
        #: The template's digest, recorded with rows that are never claimed (suppressed).
        self.content = content
        #: --suppress-to: where address-level permanent refusals are appended.
        self.suppress_to = suppress_to
        #: The policy brake, told every recipient's outcome.
        self.brake = brake
        self.progress = progress
        self.display = display
        self.recipients = recipients
        #: Handed to the pool, no result yet, by key.
        self.outstanding: dict[str, Tag] = {}
        #: Retries that the results seen so far took (attempts beyond the first).
        self.retries_done = 0
        self.report: IO[str] | None = None
        self.report_path = report_path
        self._report_lines: list[str] = []
        self._errors_printed = 0
        self._unprinted = 0
        #: Each bad-row error printed once, with how often it came again.
        self._repeats: dict[str, int] = {}

    # -- the planner's notes ------------------------------------------------------

    def planned(self, plan: ChunkPlan) -> None:
        """Record what the planner decided not to send, in file order."""
        p = self.progress
        skipped: list[tuple[str, int, str, str]] = []
        suppressed: list[tuple[str, int, str, str]] = []
        for note in plan.notes:
            if isinstance(note, BadRow):
                self.bad_row(note.line, note.error)
                continue
            if isinstance(note, Suppressed):
                row = note.row
                suppressed.append((row.key, row.line, self.content, note.message_id))
                p.suppressed += 1
                self._not_sent(row, note.message_id, "suppressed", recipients=list(note.recipients))
                continue
            row, record = note.row, note.record
            skipped.append((row.key, row.line, record.content, record.message_id))
            p.unknown += 1
            self._not_sent(row, record.message_id, "unknown", skipped="at-most-once")
        p.earlier += plan.earlier
        p.earlier_failed += plan.earlier_refused
        if skipped:
            self.journal.mark(skipped, "unknown")
        if suppressed:
            self.journal.mark(suppressed, "suppressed")

    def _not_sent(self, row: Row, message_id: str, outcome: str, **extra: object) -> None:
        """The report line of a row the planner kept from the pool."""
        self.write(
            {
                "type": "message",
                "line": row.line,
                "key": row.key,
                "message_id": message_id,
                "outcome": outcome,
                **extra,
                "time": _iso(time.time()),
            }
        )

    def bad_row(self, line: int, error: str) -> None:
        """A row that is not sent: counted, printed (the first few), reported.

        The same error again (a misspelt column fails every row) is not printed again:
        :meth:`failure_lines` folds the repeats into one line with their count.
        """
        self.progress.skipped += 1
        repeats = self._repeats.get(error)
        if repeats is not None:
            self._repeats[error] = repeats + 1
        else:
            self._repeats[error] = 0
            self._name(f"{self.recipients}:{line}: skipped: {error}")
        self.write({"type": "bad_row", "line": line, "error": error, "time": _iso(time.time())})

    def _name(self, text: str) -> None:
        """Print one failed or skipped row on stderr, the first MAX_PRINTED_ERRORS."""
        if self._errors_printed < MAX_PRINTED_ERRORS:
            self.display.message(text)
        else:
            self._unprinted += 1
        self._errors_printed += 1

    def failure_lines(self) -> list[str]:
        """What the rows named above left out: folded repeats, the rest, the report."""
        out = [
            f"{self.recipients}: {count:,} more row(s) skipped with the same error: {error}"
            for error, count in self._repeats.items()
            if count
        ]
        if self._unprinted:
            out.append(f"{self._unprinted:,} more failed or skipped row(s) not listed here")
        if self._errors_printed:
            out.append(
                f"every failed and skipped row is in the report: {self.report_path}"
                if self.report_path is not None
                else "run with --report FILE.jsonl for every failed and skipped row"
            )
        return out

    # -- the pool's results -------------------------------------------------------

    def settle(self, result: SendResult, *, note: str | None = None) -> None:
        """Record the pool's result for one of our messages."""
        tag = result.tag
        if type(tag) is not Tag:
            return
        self.outstanding.pop(tag.key, None)
        attempts = result.attempts
        if attempts > 1:
            self.retries_done += attempts - 1
        recipients = result.recipients
        reply = result.reply
        p = self.progress
        if len(recipients) == 1 and recipients[0].outcome is _ACCEPTED:
            # The common case, kept short: one recipient, accepted.
            p.accepted += 1
            counts = p.recipients
            counts["accepted"] = counts.get("accepted", 0) + 1
            if self.brake is not None:
                self.brake.accepted()
            if reply is not None:
                lines = reply.lines
                line = lines[0] if len(lines) == 1 else "\n".join(lines)
                self.journal.record_outcome(
                    tag.key, "accepted", attempts, reply.code, reply.enhanced_code, line, None
                )
            else:
                self.journal.record_outcome(tag.key, "accepted", attempts, None, None, None, None)
            if self.report is not None:
                self._report(result, tag, _ACCEPTED, False, note)
            return
        outcome = result.outcome
        downgraded = outcome is _TRANSIENT and result.earlier_unknown
        if downgraded:
            # An earlier attempt lost the reply to its final dot, a later one failed
            # before it: the message may have been delivered (R38).
            outcome = _UNKNOWN
        done: tuple[str, ...] | None = None
        if outcome not in _FINAL or outcome is _PERMANENT:
            # Only a message sent again needs to know who not to send it to: those with
            # a final outcome, or for a refused one (--retry-refused) those who have it.
            kept = _ACCEPTED_ONLY if outcome is _PERMANENT else _FINAL
            settled = [r.recipient for r in recipients if r.outcome in kept]
            done = tuple(dict.fromkeys([*tag.done, *settled])) or None
        reply = _deciding_reply(result, outcome)
        code = enhanced = text = None
        if reply is not None:
            code = reply.code
            enhanced = reply.enhanced_code
            text = "\n".join(reply.lines)
        elif result.error:
            text = result.error
        state: State = outcome.value
        if outcome is _PERMANENT and refused_locally(result):
            state = "refused"
        self.journal.record_outcome(tag.key, state, attempts, code, enhanced, text, done)
        if outcome is not _ACCEPTED:
            why = f"{code} {' '.join((text or '').split())}" if code else (text or "no reply")
            self._name(f"{self.recipients}:{tag.line}: {outcome.value}: {why[:200]}")
        if outcome is _ACCEPTED:
            p.accepted += 1
        elif outcome is _PERMANENT:
            p.failed += 1
        elif outcome is _TRANSIENT:
            p.deferred += 1
        else:
            p.unknown += 1
        if self.brake is not None:
            self.brake.observe(recipients)
        counts = p.recipients
        refusals = p.refusals
        for r in recipients:
            value = "unknown" if downgraded and r.outcome is _TRANSIENT else r.outcome.value
            counts[value] = counts.get(value, 0) + 1
            if r.outcome is _ACCEPTED or r.reply is None:
                continue
            refusal = r.reply.enhanced_code or str(r.reply.code)
            refusals[refusal] = refusals.get(refusal, 0) + 1
            if (
                self.suppress_to is not None
                and r.outcome is _PERMANENT
                and address_level(r.reply.enhanced_code)
            ):
                self.suppress_to.add(r.recipient)
        if self.report is not None:
            self._report(result, tag, outcome, downgraded, note)

    # -- the report ---------------------------------------------------------------

    def _report(
        self, result: SendResult, tag: Tag, outcome: Outcome, downgraded: bool, note: str | None
    ) -> None:
        """The JSONL report's lines for one message and its recipients."""
        finished = time.time()
        reply = _deciding_reply(result, outcome)
        code = enhanced = text = None
        if reply is not None:
            code = reply.code
            enhanced = reply.enhanced_code
            text = reply.text
        started = _iso(tag.started or finished)
        ended = _iso(finished)
        message: dict[str, Any] = {
            "type": "message",
            "line": tag.line,
            "key": tag.key,
            "message_id": tag.message_id,
            "outcome": outcome.value,
            "attempts": result.attempts,
            "code": code,
            "enhanced_code": enhanced,
            "text": text,
            "error": result.error,
            "sender": result.sender,
            "recipients": [r.recipient for r in result.recipients],
            "started": started,
            "finished": ended,
        }
        if tag.previous is not None:
            message["previous"] = "unknown" if tag.previous == "in-flight" else tag.previous
        if note:
            message["note"] = note
        self.write(message)
        for r in result.recipients:
            r_reply = r.reply
            if (
                r_reply is reply and reply is not None
            ):  # the same reply decided the message (its text is known)
                r_code, r_enhanced, r_text = code, enhanced, text
            elif r_reply is not None:
                r_code, r_enhanced, r_text = r_reply.code, r_reply.enhanced_code, r_reply.text
            else:
                r_code = r_enhanced = r_text = None
            r_outcome = r.outcome
            self.write(
                {
                    "type": "recipient",
                    "line": tag.line,
                    "message_id": tag.message_id,
                    "recipient": r.recipient,
                    "outcome": "unknown"
                    if downgraded and r_outcome is _TRANSIENT
                    else r_outcome.value,
                    "code": r_code,
                    "enhanced_code": r_enhanced,
                    "text": r_text,
                    "attempts": result.attempts,
                    "started": started,
                    "finished": ended,
                }
            )

    def write(self, obj: dict[str, Any]) -> None:
        """One report line (buffered; nothing without --report)."""
        if self.report is not None:
            lines = self._report_lines
            lines.append(_json_line(obj))
            if len(lines) >= REPORT_BATCH:
                self._write_lines()

    def _write_lines(self) -> None:
        lines = self._report_lines
        if lines and self.report is not None:
            lines.append("")
            self.report.write("\n".join(lines))
            lines.clear()

    def flush_report(self) -> None:
        """Write the buffered report lines and flush the file."""
        if self.report is not None:
            self._write_lines()
            self.report.flush()
