"""Results the pool makes up itself, when no server reply decided a message's outcome.

Theory of operation
-------------------
Every message handed to the pool ends with exactly one :class:`SendResult` (R48), even
when it never reached a server: a connection that could not be opened, a send cut off by
a deadline or a cancellation, a message the client refused to send, a retry that never
came. Those results are built here, from the message (if it was prepared), the recipients
still due, the outcome and a reason, so that they read the same wherever they come from.
The outcome follows RFC 5321 §4.5.4.1 and R37: nothing reached the server -> transient
(safe to retry); the final dot may have gone out -> unknown; refused before sending ->
permanent.

Pure functions, no trio: they are headed for ``_core.results`` with the other result
constructors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._core.results import Outcome, RecipientResult, SendResult

if TYPE_CHECKING:
    from .._core.results import _Prepared as Prepared

__all__ = [
    "NOT_SENT",
    "NO_RECIPIENT",
    "POSSIBLE_DUPLICATE",
    "STOPPED",
    "abandoned",
    "cut_off",
    "merged",
    "not_sent",
    "refused_locally",
    "synthetic",
]

STOPPED = "not sent: the pool stopped opening connections"
NOT_SENT = "not sent: cancelled before it was sent"
NOT_RETRIED = "not sent again: cancelled before the retry"
POSSIBLE_DUPLICATE = "an earlier attempt had an unknown outcome: possible duplicate"
#: The one recipient of a result for a message that names none: "every recipient
#: accepted" is true of an empty list, so such a result would read as accepted.
NO_RECIPIENT = "(no recipient)"


def synthetic(
    prepared: Prepared | None, recipients: Sequence[str], outcome: Outcome, reason: str
) -> SendResult:
    """``outcome`` for each of ``recipients``, with no reply; sender, Message-ID and tag
    come from ``prepared`` (None: a message that could not be prepared). With no
    recipient at all, the result names :data:`NO_RECIPIENT`, so it never reads as
    accepted."""
    return SendResult(
        prepared.sender if prepared is not None else "",
        tuple(RecipientResult(r, outcome, None) for r in recipients or (NO_RECIPIENT,)),
        None,
        prepared.message_id if prepared is not None else None,
        reason,
        tag=prepared.tag if prepared is not None else None,
    )


def not_sent(prepared: Prepared | None, recipients: Sequence[str], reason: str) -> SendResult:
    """Nothing reached the server: transient for every recipient due."""
    return synthetic(prepared, recipients, Outcome.TRANSIENT, reason)


def refused_locally(
    prepared: Prepared | None, recipients: Sequence[str], reason: str
) -> SendResult:
    """The client would not send it (a local check failed): permanent."""
    return synthetic(prepared, recipients, Outcome.PERMANENT, f"refused locally: {reason}")


def cut_off(
    prepared: Prepared | None, recipients: Sequence[str], reason: str, *, final_dot_out: bool
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
    prepared: Prepared | None,
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
