"""A campaign-wide rate held in the database: ``--campaign-rate``, shared by every worker.

Theory of operation
-------------------
``--rate`` paces one worker. ``--campaign-rate R`` paces the whole campaign, however
many workers share it, with one row in the database: the campaign's *next free time*
(``triomail_campaigns.rate_next``, the generic cell rate algorithm's theoretical
arrival time). A worker that needs to send reserves a block of ``k`` messages (a tenth
of a second's worth) with one statement (:data:`RESERVE_RATE`): the block's slot starts
at the later of the next free time and now, and the next free time moves ``k / R``
seconds past it. Slots never overlap, so however the workers interleave, the campaign
sends at most ``R`` messages a second (one block ahead at most); time nobody used is
not saved up (the slot starts no earlier than now), so there is no burst after a pause.
The worker then lets the block's messages go one every ``1 / R`` seconds from the
slot's start (:meth:`CampaignRate.take`, awaited by the feed before it hands a message
to the pool). One statement per block: ten a second per worker whatever ``R``, which
costs nothing measurable next to the journal's other statements.
"""

from __future__ import annotations

from typing import Final

import trio

from .pg_async import AsyncLink

__all__ = ["BLOCK_SECONDS", "RESERVE_RATE", "CampaignRate"]

#: A block is this many seconds of the campaign's rate (one message at least).
BLOCK_SECONDS: Final = 0.1

# Reserve the next slot of ``span`` seconds; how long until it starts (may be < 0).
RESERVE_RATE: Final = """
UPDATE triomail_campaigns
SET rate_next = GREATEST(rate_next, now()) + make_interval(secs => %(span)s)
WHERE name = %(name)s
RETURNING EXTRACT(EPOCH FROM rate_next - now())::float8 - %(span)s
"""


class CampaignRate:
    """One worker's share of the campaign's rate (see the module's theory of operation)."""

    def __init__(self, link: AsyncLink, name: str, rate: float) -> None:
        self.link = link
        self.name = name
        self.interval = 1.0 / rate
        self.block = max(1, round(rate * BLOCK_SECONDS))
        self.left = 0  # messages left in the block reserved last
        self.next = 0.0  # when the next of them may go (trio's clock)

    async def take(self) -> None:
        """Return when the next message may go."""
        if not self.left:
            span = self.block * self.interval
            params = {"name": self.name, "span": span}
            ((delay,),) = await self.link.query_async(RESERVE_RATE, params)
            self.next = trio.current_time() + max(0.0, float(delay))
            self.left = self.block
        if self.next > trio.current_time():
            await trio.sleep_until(self.next)
        self.next += self.interval
        self.left -= 1
