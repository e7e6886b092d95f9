"""Outcomes of a send: per recipient, as values rather than exceptions (R37, R41).

Every :class:`SendResult` the client makes comes from a function here:
:func:`transaction_result` for a transaction the server answered, :func:`local_failure`
for a message the client's own checks refused before MAIL, and :func:`never_started`
for a message that never left because the connection ended first.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SMTPSendError
from .frozen import fast_constructor
from .prepare import PreparedMessage
from .reply import Reply

__all__ = [
    "Outcome",
    "RecipientResult",
    "SendResult",
    "local_failure",
    "never_started",
    "new_recipient_result",
    "new_send_result",
    "transaction_result",
]


class Outcome(enum.Enum):
    """What became of one recipient (R37)."""

    #: 250 to the final dot (or the last BDAT chunk).
    ACCEPTED = "accepted"
    #: 4xx, or the connection was lost before the final dot: safe to retry.
    TRANSIENT = "transient"
    #: 5xx: do not retry.
    PERMANENT = "permanent"
    #: Lost after the final dot and before its reply: it may have been delivered.
    UNKNOWN = "unknown"


def outcome_of(reply: Reply) -> Outcome:
    """The outcome a reply code means (RFC 5321 §4.2.1; 552 to RCPT is temporary, §4.5.3.1.10)."""
    if reply.code < 400:
        return Outcome.ACCEPTED
    if reply.code < 500:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient's outcome and the reply that decided it (``None`` if no reply came)."""

    recipient: str
    outcome: Outcome
    reply: Reply | None

    @property
    def code(self) -> int | None:
        return None if self.reply is None else self.reply.code

    @property
    def enhanced_code(self) -> str | None:
        return None if self.reply is None else self.reply.enhanced_code

    @property
    def text(self) -> str:
        return "" if self.reply is None else self.reply.text


_SEVERITY = (Outcome.UNKNOWN, Outcome.TRANSIENT, Outcome.PERMANENT)
_ACCEPTED_ONLY = frozenset((Outcome.ACCEPTED,))
_OUTCOME = operator.attrgetter("outcome")


@dataclass(frozen=True, slots=True)
class SendResult:
    """The result of one transaction: every recipient's outcome, never silently dropped."""

    sender: str
    recipients: tuple[RecipientResult, ...]
    #: The reply that ended the transaction: to the final dot, or the refusal.
    reply: Reply | None = None
    message_id: str | None = None
    #: Why no server reply decided the outcome (connection lost, timeout, local check).
    error: str | None = None
    #: The caller's own label for the message (``prepare(..., tag=...)``), passed through.
    tag: object = None
    #: How many transactions the message took (the pool retries transient failures).
    attempts: int = 1
    #: True once MAIL was accepted: before that nothing was started on the server (R45).
    mail_accepted: bool = False
    #: True if an earlier attempt ended unknown (R37): that copy may have been delivered,
    #: so an accepted resend (same Message-ID, R38) may be a duplicate.
    earlier_unknown: bool = False

    @property
    def ok(self) -> bool:
        """True if every recipient was accepted."""
        return _ACCEPTED_ONLY.issuperset(map(_OUTCOME, self.recipients))  # C-level loop

    @property
    def outcome(self) -> Outcome:
        """The overall outcome: accepted only if all were, else unknown > transient > permanent."""
        present = {r.outcome for r in self.recipients}
        for outcome in _SEVERITY:
            if outcome in present:
                return outcome
        return Outcome.ACCEPTED

    def by_outcome(self, outcome: Outcome) -> list[str]:
        """The recipients that ended with ``outcome``."""
        return [r.recipient for r in self.recipients if r.outcome is outcome]

    @property
    def accepted(self) -> list[str]:
        return self.by_outcome(Outcome.ACCEPTED)

    def raise_for_status(self) -> None:
        """Raise :class:`SMTPSendError` unless every recipient was accepted."""
        if not self.ok:
            failed = ", ".join(
                f"{r.recipient}: {r.outcome.value}" + (f" ({r.reply})" if r.reply else "")
                for r in self.recipients
                if r.outcome is not Outcome.ACCEPTED
            )
            suffix = f" [{self.error}]" if self.error else ""
            raise SMTPSendError(f"not accepted: {failed}{suffix}")


# Per-message hot paths build results with these (same arguments; see ._frozen).
new_recipient_result = fast_constructor(RecipientResult)
new_send_result = fast_constructor(SendResult)


def transaction_result(
    prepared: PreparedMessage,
    replies: Sequence[Reply | None],
    outcome: Outcome,
    reply: Reply | None,
    error: str | None,
    mail_accepted: bool,
) -> SendResult:
    """The result of one transaction: a refused recipient keeps its own reply (R41); the
    others (``replies[i]`` positive or ``None``) get ``outcome`` and ``reply``."""
    recipients = prepared.recipients
    if len(recipients) != len(replies):
        raise ValueError("one reply slot per recipient")
    per = []
    for i, recipient in enumerate(recipients):
        own = replies[i]
        if own is not None and not own.is_positive:
            per.append(new_recipient_result(recipient, outcome_of(own), own))
        else:
            per.append(new_recipient_result(recipient, outcome, reply))
    return new_send_result(
        prepared.sender,
        tuple(per),
        reply,
        prepared.message_id,
        error,
        prepared.tag,
        1,
        mail_accepted,
    )


def local_failure(prepared: PreparedMessage, code: int, enhanced: str, text: str) -> SendResult:
    """A message refused before MAIL by the client's own checks: nothing was written."""
    reply = Reply.from_lines(code, (f"{enhanced} {text}",))
    return SendResult(
        prepared.sender,
        tuple(RecipientResult(r, outcome_of(reply), reply) for r in prepared.recipients),
        reply,
        prepared.message_id,
        error=f"not sent: {text}",
        tag=prepared.tag,
    )


def never_started(prepared: PreparedMessage, reason: str) -> SendResult:
    """A message whose MAIL was never written: the connection ended first (transient)."""
    return SendResult(
        prepared.sender,
        tuple(RecipientResult(r, Outcome.TRANSIENT, None) for r in prepared.recipients),
        None,
        prepared.message_id,
        f"not sent: never started, the connection ended first ({reason})",
        tag=prepared.tag,
    )
