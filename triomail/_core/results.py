"""Outcomes of a send: per recipient, as values rather than exceptions (R37, R41).

Every :class:`SendResult` triomail makes comes from a function here:
:func:`transaction_result` for a transaction the server answered, :func:`local_failure`
for a message the client's own checks refused before MAIL, :func:`never_started` for a
message that never left because the connection ended first, and the pool's own
(:func:`synthetic` and the functions built on it, :func:`merged` over several attempts)
for a message whose outcome no server reply decided: a connection that could not be
opened, a send cut off by a deadline or a cancellation, a retry that never came. Every
message handed to the pool ends with exactly one result (R48); the outcome follows RFC
5321 §4.5.4.1 and R37: nothing reached the server -> transient (safe to retry); the
final dot may have gone out -> unknown; refused before sending -> permanent.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SMTPError
from .frozen import fast_constructor
from .prepare import PreparedMessage
from .reply import Reply

__all__ = [
    "NOT_SENT",
    "POSSIBLE_DUPLICATE",
    "STOPPED",
    "Outcome",
    "SMTPSendError",
    "RecipientResult",
    "SendResult",
    "abandoned",
    "cut_off",
    "local_failure",
    "merged",
    "never_started",
    "new_recipient_result",
    "new_send_result",
    "not_sent",
    "refused_locally",
    "synthetic",
    "transaction_result",
]


class Outcome(enum.StrEnum):
    """What became of one recipient (R37).

    A string enum: ``str(Outcome.ACCEPTED) == "accepted"``, and it goes into JSON as is.
    """

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
        """True if every recipient was accepted, and there was one: a result with no
        recipient (a message refused before sending) delivered nothing."""
        recipients = self.recipients
        return bool(recipients) and _ACCEPTED_ONLY.issuperset(map(_OUTCOME, recipients))

    @property
    def outcome(self) -> Outcome:
        """The overall outcome: accepted only if all were, else unknown > transient >
        permanent; permanent for a result with no recipient (nothing can deliver it)."""
        if not self.recipients:
            return Outcome.PERMANENT
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
            raise SMTPSendError(f"not accepted: {failed}{suffix}", self)


class SMTPSendError(SMTPError):
    """Raised by :meth:`SendResult.raise_for_status` when a recipient was not accepted.

    :attr:`result` is the :class:`SendResult` itself: every recipient's outcome and reply,
    so a handler can tell the refused from the accepted without parsing the message.
    """

    def __init__(self, message: str, result: SendResult) -> None:
        super().__init__(message)
        self.result = result


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
    return not_sent(
        prepared,
        prepared.recipients,
        f"not sent: never started, the connection ended first ({reason})",
    )


STOPPED = "not sent: the pool stopped opening connections"
NOT_SENT = "not sent: cancelled before it was sent"
NOT_RETRIED = "not sent again: cancelled before the retry"
POSSIBLE_DUPLICATE = "an earlier attempt had an unknown outcome: possible duplicate"


def synthetic(
    prepared: PreparedMessage | None, recipients: Sequence[str], outcome: Outcome, reason: str
) -> SendResult:
    """``outcome`` for each of ``recipients``, with no reply; sender, Message-ID and tag
    come from ``prepared`` (None: a message that could not be prepared)."""
    return SendResult(
        prepared.sender if prepared is not None else "",
        tuple(RecipientResult(r, outcome, None) for r in recipients),
        None,
        prepared.message_id if prepared is not None else None,
        reason,
        tag=prepared.tag if prepared is not None else None,
    )


def not_sent(
    prepared: PreparedMessage | None, recipients: Sequence[str], reason: str
) -> SendResult:
    """Nothing reached the server: transient for every recipient due."""
    return synthetic(prepared, recipients, Outcome.TRANSIENT, reason)


def refused_locally(
    prepared: PreparedMessage | None, recipients: Sequence[str], reason: str
) -> SendResult:
    """The client would not send it (a local check failed): permanent."""
    return synthetic(prepared, recipients, Outcome.PERMANENT, f"refused locally: {reason}")


def cut_off(
    prepared: PreparedMessage | None, recipients: Sequence[str], reason: str, *, final_dot_out: bool
) -> SendResult:
    """A send cut short: unknown once the final dot may have gone out (R37), else
    transient."""
    outcome = Outcome.UNKNOWN if final_dot_out else Outcome.TRANSIENT
    return synthetic(prepared, recipients, outcome, reason)


def merged(
    result: SendResult,
    settled: Sequence[RecipientResult],
    due: Sequence[RecipientResult],
    *,
    order: Sequence[str],
    attempts: int,
    earlier_unknown: bool,
    error: str | None = None,
) -> SendResult:
    """A message's final result over several attempts: the recipients earlier attempts
    ``settled`` and those still ``due``, in the message's ``order``, on ``result``'s
    replies; flagged if an earlier attempt may have delivered it (R38)."""
    final_recipients = [*settled, *due]
    rank = {name: i for i, name in enumerate(order)}
    final_recipients.sort(key=lambda r: rank.get(r.recipient, len(rank)))
    return dataclasses.replace(
        result,
        recipients=tuple(final_recipients),
        attempts=attempts,
        earlier_unknown=earlier_unknown,
        error=error or result.error or (POSSIBLE_DUPLICATE if earlier_unknown else None),
    )


def abandoned(
    prepared: PreparedMessage | None,
    recipients: Sequence[str],
    last: SendResult | None,
    settled: Sequence[RecipientResult],
    *,
    order: Sequence[str],
    attempts: int,
    earlier_unknown: bool,
) -> SendResult:
    """The final result of a message the pool was only holding (queued, or waiting for a
    retry's backoff) when it was cancelled: not sent if it never had an attempt (``last``
    is None), else its last attempt's replies for the recipients still due."""
    if last is None:
        return dataclasses.replace(not_sent(prepared, recipients, NOT_SENT), attempts=0)
    done = {r.recipient for r in settled}
    due = [r for r in last.recipients if r.recipient not in done]
    error = f"{NOT_RETRIED} (last attempt: {last.error})" if last.error else NOT_RETRIED
    if earlier_unknown:
        error += f"; {POSSIBLE_DUPLICATE}"
    result = merged(
        last,
        settled,
        due,
        order=order,
        attempts=attempts,
        earlier_unknown=earlier_unknown,
        error=error,
    )
    # R42's follow-up transaction is not counted, but the first one did take place.
    return result if result.attempts else dataclasses.replace(result, attempts=1)
