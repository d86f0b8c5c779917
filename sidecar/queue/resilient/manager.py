"""ResilientQueue: Redis first; the local queue, inside the same call, when Redis cannot serve.

Routing: with Redis up, new requests go to Redis. A BackendUnavailable from Redis marks it down
(failover.py) and the same call is answered by the local queue; when Redis serves again the
local backlog moves to it (handover.py).

Invariants kept here:
- an id this daemon holds locally is answered from there, never copied to Redis;
- an enqueue that timed out on Redis is stored locally marked uncertain (on disk), so recovery
  keeps exactly one copy;
- settle ops find a request wherever it is: the local store (moving or not), then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from sidecar.errors import BackendUnavailable, InvalidState
from sidecar.models import (
    EnqueueOutcome,
    FailoverCounters,
    HealthReport,
    HealthStatus,
    QueuedRequest,
    QueueStats,
    ServingMode,
)
from sidecar.queue.base import BaseStore
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient.failover import FLAP_WINDOW_S, PROBE_SUCCESSES, Failover
from sidecar.queue.resilient.handover import Handover
from sidecar.queue.resilient.operators import ResilientOperatorSide

log = structlog.get_logger("sidecar.queue.resilient")

T = TypeVar("T")
# How long a take waits for the move of its request's batch to Redis to end: one script call,
# bounded by the Redis timeouts (about a second), so this is only reached when something is off.
MOVE_WAIT_S = 5.0


class ResilientQueue(ResilientOperatorSide, BaseStore):
    """Owns both stores; the server talks to it exactly as to a single store."""

    name = "resilient"

    def __init__(
        self,
        redis: RedisQueue,
        local: LocalQueue,
        *,
        probe_initial_s: float = 0.1,
        probe_max_s: float = 2.0,
        watch_interval_s: float = 1.0,
        migrate_batch: int = 100,
        log_repeat_s: float = 60.0,
        probe_successes: int = PROBE_SUCCESSES,
        flap_window_s: float = FLAP_WINDOW_S,
    ) -> None:
        self.redis = redis
        self.local = local
        self.failover = Failover(
            redis,
            local,
            on_up=self._redis_serves,
            probe_initial_s=probe_initial_s,
            probe_max_s=probe_max_s,
            probe_successes=probe_successes,
            flap_window_s=flap_window_s,
            watch_interval_s=watch_interval_s,
            log_repeat_s=log_repeat_s,
        )
        self.handover = Handover(redis, local, self.failover, migrate_batch=migrate_batch)

    def _redis_serves(self) -> None:
        # Redis serves (at start or after an outage): the local backlog moves to it.
        self.handover.kick()

    @property
    def redis_up(self) -> bool:
        """Whether Redis serves now (else the local store does, and a probe runs)."""
        return self.failover.up

    def redis_failed(self, exc: BackendUnavailable, op: str) -> None:
        """A call beside the queue (the limiter) met Redis unavailable: fail over as a call of
        the queue's own would (the probe notices its return)."""
        self.failover.mark_down(exc, op)

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start both stores; with Redis unreachable, start on the local queue and probe."""
        await self.local.start()  # replays the journal: the backlog of the last run is back
        await self.failover.start()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Hand what it can to Redis within timeout_s (probing a down Redis once), then stop.

        Whatever stays local, leased requests included, is in the local journal and moves to
        Redis after the next start.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not self.redis_up and self.local.queued:
            await self.failover.probe_at_stop(deadline)
        if self.redis_up and (self.local.moving or self.local.queued):
            self.handover.kick()
            with contextlib.suppress(TimeoutError):
                await self.wait_until(self.backlog_moved, max(0.0, deadline - loop.time()))
        await self.failover.stop()
        await self.handover.stop()
        left = self.local.queued + self.local.moving + self.local.processing
        if left:
            log.info("local_requests_kept", count=left, redis_up=self.redis_up)
        await self.redis.close()
        await self.local.close()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds, re-checking at each change of state."""
        await self.failover.wait_until(predicate, timeout)

    def backlog_moved(self) -> bool:
        """Redis serves and nothing waits locally to move: the outage is fully over."""
        return self.handover.done()

    # -- routing ----------------------------------------------------------------------------------

    async def enqueue(self, requests: Sequence[QueuedRequest]) -> list[EnqueueOutcome]:
        """Redis when it is up, else (or when it fails inside this call) the local queue."""
        if not self.local.empty and any(self.local.holds(r.queue_id) for r in requests):
            # An id this daemon already holds locally (being moved to Redis included) is
            # answered from there, never copied; new ones in the same batch go with it (all
            # or none), and move to Redis later.
            results = await self.local.enqueue(requests)
            self.handover.maybe_move()
            return results
        if self.redis_up:
            try:
                return await self.redis.enqueue(requests)
            except BackendUnavailable as exc:
                self.failover.mark_down(exc, "enqueue")
                # The write may still land (a frozen server runs what it received once it
                # thaws): the local store marks the ids, so recovery keeps exactly one copy.
                return await self.local.enqueue(requests, uncertain=True)
        return await self.local.enqueue(requests)

    async def dequeue(
        self, max_items: int, lease_s: float, max_bytes: int | None = None
    ) -> list[QueuedRequest]:
        """The local backlog first (it only exists because of an outage), then Redis."""
        out = await self.local.dequeue(max_items, lease_s, max_bytes)
        self.handover.maybe_move()
        # With a byte budget, Redis is asked only when the local store gave nothing: a store
        # always hands out one job, which could take the reply past the budget the local ones
        # left.
        if len(out) < max_items and self.redis_up and (max_bytes is None or not out):
            try:
                out += await self.redis.dequeue(max_items - len(out), lease_s, max_bytes)
            except BackendUnavailable as exc:
                self.failover.mark_down(exc, "dequeue")
            except Exception:
                if not out:
                    raise
                # The local leases are already taken: hand them out rather than strand them.
                log.exception("redis_dequeue_failed", local_items=len(out))
        return out

    async def extend(self, queue_id: str, lease_id: str, lease_s: float) -> QueuedRequest:
        if self.local.holds(queue_id):
            return await self.local.extend(queue_id, lease_id, lease_s)
        return await self._on_redis(
            lambda: self.redis.extend(queue_id, lease_id, lease_s), queue_id
        )

    async def complete(self, queue_id: str, lease_id: str) -> QueuedRequest:
        if self.local.holds(queue_id):
            return await self.local.complete(queue_id, lease_id)
        return await self._on_redis(lambda: self.redis.complete(queue_id, lease_id), queue_id)

    async def complete_brief(self, queue_id: str, lease_id: str) -> None:
        if self.local.holds(queue_id):
            await self.local.complete(queue_id, lease_id)
            return
        await self._on_redis(lambda: self.redis.complete_brief(queue_id, lease_id), queue_id)

    async def fail(
        self,
        queue_id: str,
        lease_id: str,
        reason: str,
        retry: bool,
        delay_s: float = 0.0,
        counts: bool = True,
    ) -> QueuedRequest:
        if self.local.holds(queue_id):
            rec = await self.local.fail(queue_id, lease_id, reason, retry, delay_s, counts)
            # Queued here again (held back or not) while Redis serves: it moves with the rest.
            self.handover.maybe_move()
            return rec
        return await self._on_redis(
            lambda: self.redis.fail(queue_id, lease_id, reason, retry, delay_s, counts), queue_id
        )

    async def cancel(self, queue_id: str) -> QueuedRequest:
        if self.local.holds(queue_id):
            return await self.local.cancel(queue_id)
        return await self._on_redis(lambda: self.redis.cancel(queue_id), queue_id)

    async def take(self, queue_id: str, lease_s: float) -> QueuedRequest | None:
        """From the store that holds it; a request in a batch being moved to Redis is taken
        once the move ends, from whichever store then has it (pending in one only)."""
        if self.local.moving_now(queue_id):
            with contextlib.suppress(TimeoutError):
                await self.wait_until(lambda: not self.local.moving_now(queue_id), MOVE_WAIT_S)
            if self.local.moving_now(queue_id):
                raise InvalidState(
                    f"request {queue_id} is being moved to Redis; take it again once the move ends",
                    {"queue_id": queue_id, "status": "queued"},
                )
        if self.local.holds(queue_id):
            return await self.local.take(queue_id, lease_s)
        return await self._on_redis(lambda: self.redis.take(queue_id, lease_s), queue_id)

    async def status(self, queue_id: str) -> QueuedRequest | None:
        if self.local.holds(queue_id):
            return await self.local.status(queue_id)
        return await self._on_redis(lambda: self.redis.status(queue_id), queue_id)

    async def wait_for_work(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(self.local.wait_for_work(timeout))]
        if self.redis_up:
            waits.append(asyncio.ensure_future(self.redis.wait_for_work(timeout)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _on_redis(self, call: Callable[[], Awaitable[T]], queue_id: str) -> T:
        """Run a call that only Redis can answer; BackendUnavailable while it is away."""
        if not self.redis_up:
            raise BackendUnavailable(
                f"redis is unavailable and request {queue_id} is not in the local queue",
                {"queue_id": queue_id, "kind": "down"},
            )
        try:
            return await call()
        except BackendUnavailable as exc:
            self.failover.mark_down(exc, "settle")
            raise

    # -- views ----------------------------------------------------------------------------------

    @property
    def mode(self) -> ServingMode:
        return ServingMode.REDIS if self.redis_up else ServingMode.LOCAL_FALLBACK

    @property
    def store_names(self) -> tuple[str, ...]:
        return (self.local.name, self.redis.name)

    async def queued_by_priority(self) -> dict[str, dict[int, int]]:
        """The local store's counts, and Redis's while it serves."""
        counts = await self.local.queued_by_priority()
        if self.redis_up:
            # Redis gone since it was last asked: the local counts still stand.
            with contextlib.suppress(BackendUnavailable):
                counts |= await self.redis.queued_by_priority()
        return counts

    def failover_counters(self) -> FailoverCounters:
        f = self.failover
        return FailoverCounters(
            failovers=f.failovers,
            recoveries=f.recoveries,
            degraded_s=f.degraded_s(),
            data_lost=len(f.data_lost),
            backlog=self.local.queued + self.local.moving,
            moved=self.handover.moved,
        )

    async def stats(self) -> QueueStats:
        """Both stores and their sum; the sum counts a moved request once (in Redis)."""
        local = await self.local.stats()
        stores = {"local": local}
        warnings = list(self.failover.data_lost)
        remote: QueueStats | None = None
        if self.redis_up:
            try:
                remote = await self.redis.stats()
            except BackendUnavailable as exc:
                self.failover.mark_down(exc, "stats")
        if remote is None:
            # The reason is the error's own message ("redis unavailable (timeout)", "redis
            # replicas did not confirm the write (0 of 1 confirmed)"...), never wrapped again.
            reason = self.failover.down_reason or "redis unavailable"
            warnings.append(f"{reason}: its counts are missing")
        else:
            stores["redis"] = remote
            warnings += remote.warnings
        parts = [local, *([remote] if remote else [])]
        return QueueStats(
            store=self.name,
            mode=self.mode,
            queued=sum(p.queued for p in parts),
            processing=sum(p.processing for p in parts),
            accepted=sum(p.accepted for p in parts) - local.moved_out,
            completed=sum(p.completed for p in parts),
            failed=sum(p.failed for p in parts),
            expired=sum(p.expired for p in parts),
            dead_letters=sum(p.dead_letters for p in parts),
            dead_letters_bytes=sum(p.dead_letters_bytes for p in parts),
            dead_letters_dropped=sum(p.dead_letters_dropped for p in parts),
            items=sum(p.items for p in parts),
            bytes=sum(p.bytes for p in parts),
            # The limits are the local store's: beside totals that include Redis they would
            # read as limits on Redis, which has none of them. Each store's own are in `stores`.
            max_items=local.max_items if remote is None else None,
            max_bytes=local.max_bytes if remote is None else None,
            usage=local.usage if remote is None else 0.0,
            breaker_open=local.breaker_open,
            rejections=local.rejections,
            oldest_queued_age_s=max(
                (p.oldest_queued_age_s for p in parts if p.oldest_queued_age_s is not None),
                default=None,
            ),
            max_expired_age_s=max(
                (p.max_expired_age_s for p in parts if p.max_expired_age_s is not None),
                default=None,
            ),
            retained=sum(p.retained for p in parts),
            retained_bytes=local.retained_bytes,
            retention_cut=local.retention_cut,
            warnings=warnings + local.warnings,
            stores=stores,
            failovers=self.failover.failovers,
            recoveries=self.failover.recoveries,
            degraded_s=self.failover.degraded_s(),
            redis_data_lost=len(self.failover.data_lost),
        )

    async def health(self) -> HealthReport:
        """ok on Redis; degraded on the local fallback, after data loss, or when unsafe."""
        reasons = list(self.failover.data_lost)
        if not self.redis_up:
            reason = self.failover.down_reason or "redis unavailable"
            reasons.insert(0, f"{reason}; serving from local queue")
        else:
            reasons += self.redis.warnings
        local = await self.local.health()
        reasons += local.reasons
        status = HealthStatus.DEGRADED if reasons else HealthStatus.OK
        return HealthReport(status=status, mode=self.mode, reasons=reasons)
