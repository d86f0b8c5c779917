"""The hand-over: once Redis serves again, the local backlog moves to it, most urgent first
(requests held back by a fail's delay_s included, still held back in Redis until their time).

A request is pending in at most one store: the hand-over is a state of the local store (taken,
then confirmed when Redis acknowledged the batch, or returned when it failed), journaled like
every other change, so a crash at any point leaves each request local or in Redis. A returned
batch is queued locally again (dequeue, cancel and expiry work on it). Redis's enqueue ignores a
queue_id it holds, so a batch sent twice is stored once.
"""

from __future__ import annotations

import asyncio

import structlog

from sidecar.errors import BackendUnavailable
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient.failover import Failover, cancel

log = structlog.get_logger("sidecar.queue.resilient")


class Handover:
    """Moves the local backlog to Redis while Redis serves, one task at a time."""

    def __init__(
        self, redis: RedisQueue, local: LocalQueue, failover: Failover, *, migrate_batch: int
    ) -> None:
        self.redis = redis
        self.local = local
        self.failover = failover
        self.migrate_batch = migrate_batch
        self.moved = 0
        self._mover: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """Start the mover unless it runs."""
        if self._mover is None or self._mover.done():
            self._mover = asyncio.get_running_loop().create_task(self._move_backlog())

    def maybe_move(self) -> None:
        """Restart the mover when requests became queued locally again with Redis up.

        A local lease that lapses after recovery puts its request back in the local queue.
        """
        if self.failover.up and self.local.queued and (self._mover is None or self._mover.done()):
            self.kick()

    def done(self) -> bool:
        """Redis serves and nothing waits locally to move: the outage is fully over."""
        return self.failover.up and not self.local.moving and not self.local.queued

    async def stop(self) -> None:
        """End the mover; what it had taken goes back to the local queue, marked uncertain."""
        await cancel(self._mover)

    async def _move_backlog(self) -> None:
        """Move the local backlog to Redis, a batch at a time, most urgent first.

        Each batch is taken (on disk) before it is sent, then confirmed or returned: a crash
        in between leaves it local and marked uncertain, settled against Redis at the next
        start. A failed batch goes back to the local queue at once, so it can be dequeued,
        cancelled and expire on time while Redis stays down.
        """
        while self.failover.up and self.local.queued:
            batch = await self.local.take_for_handover(self.migrate_batch)
            if not batch:
                break
            ids = [r.queue_id for r in batch]
            # A request held back by a fail's delay_s stays held back in Redis until the same
            # time, with its attempts: it moves now, not once its delay has ended.
            held = self.local.held_until(ids)
            try:
                results = await self.redis.enqueue(batch, held_until=held)
            except BaseException as exc:
                # Whether Redis stored the batch is unknown (a reset or a timeout can follow
                # the write): the requests come back marked uncertain, and recovery keeps
                # exactly one copy.
                await self.local.return_handover(ids, uncertain=True)
                self.failover.changed()
                if isinstance(exc, BackendUnavailable):
                    self.failover.mark_down(exc, "migrate")
                    return
                if not isinstance(exc, Exception):
                    raise  # cancelled: stop() has what was taken back in the local queue
                # Refused for a reason that is no outage (an ACL without a command, a script
                # error): the backlog stays local and is served from there; the next change
                # of state tries again. Logged here, never left in a task nobody reads.
                error = f"{type(exc).__name__}: {exc}"
                log.error("backlog_move_failed", error=error, count=len(batch))
                return
            await self.local.confirm_handover(ids)
            self.moved += sum(1 for r in results if r.created)
            log.info("backlog_moved", count=len(batch), left=self.local.queued)
            self.failover.changed()
