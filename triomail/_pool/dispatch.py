"""The queue between the pool's callers and its workers, and the way back for results.

Theory of operation
-------------------
Jobs (one message each) travel over one bounded memory channel (unbuffered when messages
go one at a time), so a producer runs only a little ahead of the workers: an unbounded
iterable is consumed lazily and memory stays bounded. :meth:`Dispatch.submit` hands a
job over (or fails it, not sent, after ``queue_timeout``); :meth:`Dispatch.deliver` hands
final results to their consumers, waiting for room if need be; a retry waits out its
backoff in a task of its own and queues the job again.

The ledger (:mod:`.jobs`) decides; this module and the workers (:mod:`.worker`) do the
waiting. Where a cancellation lands, the bookkeeping is plain: a result the consumer had
no room for goes to ``interrupted``, and once no worker is left, every job that was only
waiting (queued, for a connection, for a retry's backoff) gets its result there too.
"""

from __future__ import annotations

import trio

from .._core.results import SendResult
from .channels import Results
from .jobs import Job, Ledger, Retry
from .options import PoolOptions
from .servers import Servers, TokenBucket

__all__ = ["Dispatch"]

#: Jobs per worker a producer may queue ahead at most (a deeper pipeline does not
#: raise it: runs take jobs one by one).
QUEUE_PER_WORKER = 16


class Dispatch:
    """What the pool's workers share: the job queue, the ledger, the servers, the counts."""

    def __init__(self, nursery: trio.Nursery, servers: Servers, options: PoolOptions) -> None:
        self.nursery = nursery
        self.servers = servers
        self.options = options
        self.ledger = Ledger(options.retry, trio.current_time, self.idle)
        #: Set while the ledger holds no job (see :meth:`idle`).
        self.all_done = trio.Event()
        self.all_done.set()
        self.rate = TokenBucket(options.rate) if options.rate else None
        # A worker pipelines up to pipeline_depth queued messages in one run on its
        # connection (RFC 2920), taking each from the queue when it is ready to write
        # it. A per-message deadline or a rate is kept per message: one at a time then.
        one_by_one = options.message_deadline or options.rate or servers.any_rate
        self.batch_size = 1 if one_by_one else max(1, options.pipeline_depth)
        self.jobs_send, self.jobs_receive = trio.open_memory_channel[Job](self.burst)
        #: Worker tasks not ended yet.
        self.workers = 0
        #: Workers sending (or connecting to send).
        self.busy = 0
        #: Workers holding jobs while their server is down (a subset of ``busy``).
        self.waiting = 0
        self.stopped_connecting = False
        #: Cancel scopes of the connection attempts under way.
        self.connecting: set[trio.CancelScope] = set()

    @property
    def burst(self) -> int:
        """Results (and queued jobs) the workers may produce ahead of their consumer."""
        if self.batch_size == 1:
            return 0
        return self.options.connections * min(self.batch_size, QUEUE_PER_WORKER)

    def idle(self) -> None:
        """The ledger's last job finished (the ledger calls this)."""
        self.all_done.set()

    def results(self, channel: trio.MemorySendChannel[SendResult]) -> Results:
        return Results(channel, self.ledger.interrupted)

    # -------------------------------------------------------------- hand-over

    async def submit(self, job: Job, *, withdraw_if_cancelled: bool = False) -> None:
        """Hand ``job`` to the workers; wait while the queue is full. Cancelled while
        waiting, the job goes to ``interrupted`` ("not sent"), or is withdrawn (no
        result owed) with ``withdraw_if_cancelled``: the caller of ``Pool.send`` sees
        the cancellation itself."""
        ledger = self.ledger
        ledger.hand_over(job)
        if self.all_done.is_set():
            self.all_done = trio.Event()
        timeout = self.options.queue_timeout
        try:
            if timeout is None:
                try:
                    # Fill the bounded queue without a scheduling round per message, so
                    # workers find batches to pipeline; wait only when it is full.
                    self.jobs_send.send_nowait(job)
                except trio.WouldBlock:
                    await self.jobs_send.send(job)
                queue_timed_out = False
            else:
                with trio.move_on_after(timeout) as scope:
                    await self.jobs_send.send(job)
                queue_timed_out = scope.cancelled_caught
        except BaseException as exc:
            ledger.queued -= 1
            if job.final:
                pass  # recorded while it waited: no worker was left to take it
            elif isinstance(exc, trio.Cancelled) and not withdraw_if_cancelled:
                # Taken from the caller's messages (the pool, or a send_all left early,
                # was cancelled), never handed to a worker: not sent.
                ledger.abandon(job)
            else:
                ledger.withdraw(job)
            raise
        if queue_timed_out and not job.final:
            ledger.queued -= 1
            reason = (
                f"timed out after {timeout:g} s waiting for a free connection: "
                f"{self.busy} of {self.options.connections} busy, "
                f"{ledger.queued} queued, {ledger.in_flight} in flight"
            )
            await self.complete(job, job.not_sent(reason))
        elif not self.workers:
            # Queued after the last worker ended (the pool was cancelled while a
            # feeder went on without waiting): nobody will take it.
            self.abandon_held()

    def retry(self, job: Job, retry: Retry) -> None:
        self.nursery.start_soon(self._retry_later, job, retry.delay)

    def requeue(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` again at once, no attempt charged (they were not sent)."""
        for job in jobs:
            if not job.final:
                self.retry(job, Retry(0.0))

    async def _retry_later(self, job: Job, delay: float) -> None:
        # Cancelled here, the job stays held: the last worker to end records it.
        self.ledger.backoff += 1
        try:
            await trio.sleep(delay)
        finally:
            self.ledger.backoff -= 1
        self.ledger.queued += 1
        try:
            await self.jobs_send.send(job)
        except BaseException:
            self.ledger.queued -= 1
            raise

    # --------------------------------------------------------------- results

    async def settle_each(self, attempts: list[tuple[Job, SendResult]], *, final: bool) -> None:
        """Record one attempt of each job, then hand over the final results."""
        finished: list[tuple[Job, SendResult]] = []
        for job, result in attempts:
            self.settle(job, result, finished, final=final)
        await self.deliver(finished)

    def settle(
        self,
        job: Job,
        result: SendResult,
        finished: list[tuple[Job, SendResult]],
        *,
        final: bool = False,
    ) -> None:
        """Record one attempt: a final result joins ``finished``, a retry is scheduled."""
        verdict = self.ledger.record(job, result, final=final)
        if isinstance(verdict, Retry):
            self.retry(job, verdict)
        else:
            finished.append((job, verdict))

    async def deliver(self, finished: list[tuple[Job, SendResult]]) -> None:
        """Hand over final results; on cancellation, those left go to interrupted."""
        for index, (job, result) in enumerate(finished):
            try:
                await self.complete(job, result)
            except trio.Cancelled:
                for job_left, result_left in finished[index + 1 :]:
                    self.ledger.interrupt(job_left, result_left)
                raise

    async def complete(self, job: Job, result: SendResult) -> None:
        done = job.done
        if done is not None and not done.put_nowait(result):
            try:
                await done.put(result)
            except trio.Cancelled:
                self.ledger.interrupt(job, result)  # the consumer never got it
                raise
        self.ledger.delivered(job, result.outcome)

    # ----------------------------------------------------------------- ending

    def worker_ended(self) -> None:
        self.workers -= 1
        if not self.workers:
            # Nothing will be sent any more: the pool was cancelled (or closed with
            # retries pending). Whatever each worker was sending has its result by
            # now; the jobs that were only waiting get theirs.
            self.abandon_held()

    def abandon_held(self) -> None:
        """No worker is left: every job still held was only waiting (queued, for a
        connection, for a retry's backoff) and gets its result in ``interrupted``."""
        while True:
            try:
                self.jobs_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self.ledger.queued -= 1
        self.ledger.abandon_all()

    def stop_connecting(self) -> None:
        self.stopped_connecting = True
        for scope in self.connecting:
            scope.cancel()
