"""The brake: stop a campaign that the receiving side refuses for policy (sans-IO).

Theory of operation
-------------------
When a provider stops trusting a sender (no DKIM or SPF alignment, a blocklisted IP, a
reputation drop), it refuses every message with a policy code: ``550 5.7.26``
(unauthenticated), ``550 5.7.515`` (Microsoft's sender requirements), ``421 4.7.28``
(Gmail's "unusual rate of unsolicited mail"). Sending on burns the sender's reputation
further and teaches nothing: every further message is refused for the same reason.

:class:`Brake` watches the recipients' outcomes in a sliding window of the last
``WINDOW`` recipients. A recipient refused with a ``5.7.x`` or ``4.7.x`` enhanced code
(RFC 3463 §3.8: security or policy status) counts, unless its reply says it is rate
limiting (that is the pool's business: it backs off and retries). Once at least
``MIN_SEEN`` recipients are in the window and the share that counts reaches the
threshold (``--max-policy-rejections``), the brake trips once: :mod:`.run` then stops
as on a first Ctrl-C (no more rows; what is on the wire finishes; the rest stays
pending in the journal for ``--resume``) and exits with ``EXIT_BRAKE``.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable

from .._core.results import Outcome, RecipientResult

__all__ = ["MIN_SEEN", "WINDOW", "Brake", "is_policy"]

#: Recipients in the sliding window, and how many must be seen before it can trip.
WINDOW = 200
MIN_SEEN = 20
#: Reply text that marks a 4.7.x as rate limiting, not a verdict on the sender.
_RATE_LIMITING = re.compile(r"rate.?limit|throttl|too many|server busy", re.IGNORECASE)


def is_policy(recipient: RecipientResult) -> bool:
    """Was this recipient refused for policy or reputation (5.7.x, 4.7.x not rate limiting)?"""
    reply = recipient.reply
    if recipient.outcome is Outcome.ACCEPTED or reply is None:
        return False
    code = reply.enhanced_code or ""
    if code.startswith("5.7."):
        return True
    return code.startswith("4.7.") and _RATE_LIMITING.search(reply.text) is None


class Brake:
    """Trips once when the share of policy refusals in the window reaches ``threshold``."""

    def __init__(self, threshold: float, on_trip: Callable[[], None] | None = None) -> None:
        #: The share (0 to 1] of the window's recipients that trips the brake.
        self.threshold = threshold
        self.on_trip = on_trip
        self.window: deque[bool] = deque(maxlen=WINDOW)
        self.count = 0  # policy refusals in the window
        #: The policy codes seen (all of them, not only the window's), for the message.
        self.codes: Counter[str] = Counter()
        self.tripped = False

    def accepted(self) -> None:
        """One recipient accepted (the sending loop's common case, kept cheap)."""
        self._push(False)

    def observe(self, recipients: tuple[RecipientResult, ...]) -> None:
        """The recipients of one message with their outcomes."""
        for r in recipients:
            policy = is_policy(r)
            if policy:
                assert r.reply is not None
                self.codes[r.reply.enhanced_code or str(r.reply.code)] += 1
            self._push(policy)

    def _push(self, policy: bool) -> None:
        window = self.window
        if len(window) == window.maxlen and window[0]:
            self.count -= 1
        window.append(policy)
        self.count += policy
        if (
            not self.tripped
            and len(window) >= MIN_SEEN
            and self.count >= self.threshold * len(window)
        ):
            self.tripped = True
            if self.on_trip is not None:
                self.on_trip()

    def why(self) -> str:
        """One line: the share that tripped it and the codes seen."""
        codes = ", ".join(f"{code} x{n:,}" for code, n in self.codes.most_common(5))
        return (
            f"{self.count} of the last {len(self.window)} recipients were refused for policy "
            f"or reputation ({codes}), at least {self.threshold:.0%} stops sending"
        )
