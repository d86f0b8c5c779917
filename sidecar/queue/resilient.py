"""ResilientQueue: Redis first; the local queue, inside the same call, when Redis cannot serve.

Routing: with Redis up, new requests go to Redis. A BackendUnavailable from Redis marks it down
at once (later calls do not wait for another timeout) and the same call is answered by the
local queue. A probe with backoff notices recovery; the local backlog then moves to Redis in
priority order, idempotently (Redis's enqueue ignores a queue_id it holds).

Invariants kept here:
- a request is pending in at most one store: the hand-over is a state of the local store
  (taken -> confirmed when Redis acknowledged the batch, or returned when it failed), journaled
  like every other change, so a crash at any point leaves each request local or in Redis; a
  returned batch is queued locally again (dequeue, cancel and expiry work on it);
- an enqueue that timed out may still land in Redis later (a frozen server runs what it had
  already received). The local store marks such requests uncertain (on disk); on recovery the
  copy that nobody has touched is dropped, so one request does not run once from each store;
- settle ops find a request wherever it is: the local store (moving or not), then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog

from sidecar.errors import BackendUnavailable
from sidecar.models import EnqueueOutcome, HealthReport, QueuedRequest, QueueStats
from sidecar.queue.base import CompleteNextOutcome, complete_then_lease
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Successful write probes in a row before Redis serves again: one small write can pass while a
# Redis at its memory limit refuses the next batch (the store then flapped many times a second).
PROBE_SUCCESSES = 2
# Failing again within this long after a recovery is a flap: the probe keeps its backoff
# instead of starting again from probe_initial_s.
FLAP_WINDOW_S = 30.0


class _Repeats:
    """At most one log line per event per interval; the next one says how many were skipped.

    Skipped lines still go out at debug level, so nothing is lost to whoever asks for it.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last < self.interval_s:
            self._skipped[event] = self._skipped.get(event, 0) + 1
            log.debug(event, **fields)
            return
        self._last[event] = now
        skipped = self._skipped.pop(event, 0)
        if skipped:
            fields["repeats_skipped"] = skipped
        getattr(log, level)(event, **fields)


class ResilientQueue:
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
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self.probe_successes = probe_successes
        self.flap_window_s = flap_window_s
        self.migrate_batch = migrate_batch
        self.watch_interval_s = watch_interval_s
        self.redis_up = False
        self.failovers = 0
        self.recoveries = 0
        self.moved = 0
        self.data_lost: list[str] = []
        self.down_reason: str | None = None
        self._degraded_since: float | None = None
        self._degraded_total = 0.0
        self._changed = asyncio.Event()
        # One reconciliation at a time: two would both see a Redis copy, one would drop the
        # local copy and the other the Redis one, and the request would be gone.
        self._reconciling = asyncio.Lock()
        self._closing = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self._mover: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # The probe's backoff, kept across a recovery so a flapping Redis is probed ever slower.
        self.probe_delay_s = probe_initial_s
        self._up_since: float | None = None
        self._repeats = _Repeats(log_repeat_s)

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start both stores; with Redis unreachable, start on the local queue and probe."""
        await self.local.start()  # replays the journal: the backlog of the last run is back
        try:
            await self.redis.start()
            await self._reconcile()
        except BackendUnavailable as exc:
            self._mark_down(exc, "start")
        except Exception:
            # An error nobody planned for while settling uncertain copies: serve locally and
            # let the probe (which retries such errors) try again, rather than not start.
            log.exception("redis_reconcile_failed")
            self._mark_down(
                BackendUnavailable("reconciliation with redis failed", {"kind": "reconcile"}),
                "start",
            )
        else:
            self.redis_up = True
            self._kick_mover()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self, timeout_s: float = 5.0) -> None:
        """Hand what it can to Redis within timeout_s (probing a down Redis once), then stop.

        Whatever stays local, leased requests included, is in the local journal and moves to
        Redis after the next start.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not self.redis_up and self.local.queued:
            await self._cancel(self._probe)  # this stop probes once itself, now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._recover_now()
        if self.redis_up and (self.local.moving or self.local.queued):
            self._kick_mover()
            with contextlib.suppress(TimeoutError):
                await self.wait_until(self.backlog_moved, max(0.0, deadline - loop.time()))
        self._closing.set()
        for task in (self._probe, self._mover, self._watcher):
            await self._cancel(task)
        left = self.local.queued + self.local.moving + self.local.processing
        if left:
            log.info("local_requests_kept", count=left, redis_up=self.redis_up)
        await self.redis.close()
        await self.local.close()

    @staticmethod
    async def _cancel(task: asyncio.Task[None] | None) -> None:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _recover_now(self) -> None:
        """One probe at shutdown: a Redis that came back a moment ago takes the backlog."""
        try:
            await self.redis.start()
            await self.redis.probe()
            lost = await self.redis.check_generation()
            if lost is not None:
                self._report_data_loss(lost)
            await self._reconcile()
        except BackendUnavailable:
            return
        except Exception:
            # The stop must go on to the final snapshot whatever this probe ran into.
            log.exception("redis_probe_at_stop_failed")
            return
        self._mark_up()

    # -- routing ----------------------------------------------------------------------------------

    async def enqueue(self, requests: Sequence[QueuedRequest]) -> list[EnqueueOutcome]:
        """Redis when it is up, else (or when it fails inside this call) the local queue."""
        if not self.local.empty and any(self.local.holds(r.queue_id) for r in requests):
            # An id this daemon already holds locally (being moved to Redis included) is
            # answered from there, never copied; new ones in the same batch go with it (all
            # or none), and move to Redis later.
            results = await self.local.enqueue(requests)
            self._maybe_move()
            return results
        if self.redis_up:
            try:
                return await self.redis.enqueue(requests)
            except BackendUnavailable as exc:
                self._mark_down(exc, "enqueue")
                # The write may still land (a frozen server runs what it received once it
                # thaws): the local store marks the ids, so recovery keeps exactly one copy.
                return await self.local.enqueue(requests, uncertain=True)
        return await self.local.enqueue(requests)

    async def dequeue(
        self, max_items: int, lease_s: float, max_bytes: int | None = None
    ) -> list[QueuedRequest]:
        """The local backlog first (it only exists because of an outage), then Redis."""
        out = await self.local.dequeue(max_items, lease_s, max_bytes)
        self._maybe_move()
        # With a byte budget, Redis is asked only when the local store gave nothing: a store
        # always hands out one job, which could take the reply past the budget the local ones
        # left.
        if len(out) < max_items and self.redis_up and (max_bytes is None or not out):
            try:
                out += await self.redis.dequeue(max_items - len(out), lease_s, max_bytes)
            except BackendUnavailable as exc:
                self._mark_down(exc, "dequeue")
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

    async def complete_next(
        self, queue_id: str, lease_id: str, max_items: int, lease_s: float, max_bytes: int | None
    ) -> CompleteNextOutcome:
        """Complete one lease and lease up to max_items more (protocol.md 8.12)."""
        return await complete_then_lease(self, queue_id, lease_id, max_items, lease_s, max_bytes)

    async def fail(
        self, queue_id: str, lease_id: str, reason: str, retry: bool, delay_s: float = 0.0
    ) -> QueuedRequest:
        if self.local.holds(queue_id):
            return await self.local.fail(queue_id, lease_id, reason, retry, delay_s)
        return await self._on_redis(
            lambda: self.redis.fail(queue_id, lease_id, reason, retry, delay_s), queue_id
        )

    async def cancel(self, queue_id: str) -> QueuedRequest:
        if self.local.holds(queue_id):
            return await self.local.cancel(queue_id)
        return await self._on_redis(lambda: self.redis.cancel(queue_id), queue_id)

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
            self._mark_down(exc, "settle")
            raise

    # -- state ------------------------------------------------------------------------------------

    def _mark_down(self, exc: BackendUnavailable, op: str) -> None:
        if not self.redis_up and self._probe is not None and not self._probe.done():
            return
        now = time.monotonic()
        if self.redis_up:
            self.failovers += 1
            flapped = self._up_since is not None and now - self._up_since < self.flap_window_s
            self.probe_delay_s = (
                min(self.probe_delay_s * 2, self.probe_max_s) if flapped else self.probe_initial_s
            )
        self.redis_up = False
        self.down_reason = exc.message
        self._degraded_since = now
        self._repeats.log("warning", "redis_down", op=op, error=exc.message,
                          failovers=self.failovers)  # fmt: skip
        self._notify_change()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds, re-checking at each change of state (tests, bench)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        # One reconciliation at a time: two would both see a Redis copy, one would drop the
        # local copy and the other the Redis one, and the request would be gone.
        self._reconciling = asyncio.Lock()

    def backlog_moved(self) -> bool:
        """Redis serves and nothing waits locally to move: the outage is fully over."""
        return self.redis_up and not self.local.moving and not self.local.queued

    def _mark_up(self) -> None:
        self.redis_up = True
        self.recoveries += 1
        self._up_since = time.monotonic()
        if self._degraded_since is not None:
            self._degraded_total += self._up_since - self._degraded_since
            self._degraded_since = None
        self.down_reason = None
        self._repeats.log("info", "redis_recovered", recoveries=self.recoveries,
                          local_backlog=self.local.queued)  # fmt: skip
        self._kick_mover()
        self._notify_change()

    async def _probe_until_up(self) -> None:
        """Probe Redis with backoff until it takes writes twice in a row; then reconcile and
        hand back to Redis. The backoff carries over from a recent flap (see _mark_down)."""
        successes = 0
        while not self._closing.is_set():
            # The confirming write follows shortly: after a long outage the backoff is at its
            # maximum, and waiting that long again would only delay the recovery.
            delay = self.probe_delay_s if successes == 0 else self.probe_initial_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
                return
            try:
                await self.redis.start()  # loads scripts when Redis was never reached
                await self.redis.probe()
                successes += 1
                if successes < self.probe_successes:
                    continue
                lost = await self.redis.check_generation()
                if lost is not None:
                    self._report_data_loss(lost)
                await self._reconcile()
            except BackendUnavailable:
                successes = 0
                self.probe_delay_s = min(self.probe_delay_s * 2, self.probe_max_s)
                continue
            except Exception:
                # Not an outage we know (a bug, or an error reply we did not expect): keep
                # probing rather than stay on the local queue for good.
                self._repeats.log("error", "redis_probe_failed", exc_info=True)
                successes = 0
                self.probe_delay_s = min(self.probe_delay_s * 2, self.probe_max_s)
                continue
            self._mark_up()
            return

    async def _watch(self) -> None:
        """While Redis serves, check its generation marker every interval.

        A Redis that restarts quickly never fails a call (the client reconnects), so only the
        marker shows that it came back without its data; the check also notices an idle outage.
        """
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.watch_interval_s)
                return
            if not self.redis_up:
                continue  # the probe is in charge until Redis answers again
            try:
                lost = await self.redis.check_generation()
            except BackendUnavailable as exc:
                self._mark_down(exc, "watch")
                continue
            if lost is not None:
                self._report_data_loss(lost)

    def _report_data_loss(self, why: str) -> None:
        message = f"redis came back without its data ({why}): requests it held are gone"
        self.data_lost.append(message)
        log.error("redis_data_lost", reason=why)
        self._notify_change()

    async def _reconcile(self) -> None:
        """Settle which copy of each uncertain enqueue is the real one, before serving again."""
        async with self._reconciling:
            await self._reconcile_each()

    async def _reconcile_each(self) -> None:
        for queue_id in self.local.uncertain_ids():
            remote = await self.redis.status(queue_id)
            if remote is not None:
                if await self.local.drop_queued(queue_id):
                    log.info("duplicate_dropped", queue_id=queue_id, kept="redis")
                    continue
                if await self.redis.discard_queued(queue_id):
                    log.info("duplicate_dropped", queue_id=queue_id, kept="local")
                else:
                    # Both copies were handed out: at-least-once delivery covers this case.
                    log.warning("duplicate_delivery_possible", queue_id=queue_id)
            await self.local.resolve_uncertain(queue_id)

    # -- migration ----------------------------------------------------------------------------

    def _kick_mover(self) -> None:
        if self._mover is None or self._mover.done():
            self._mover = asyncio.get_running_loop().create_task(self._move_backlog())

    async def _move_backlog(self) -> None:
        """Move the local backlog to Redis, a batch at a time, most urgent first.

        Each batch is taken (on disk) before it is sent, then confirmed or returned: a crash
        in between leaves it local and marked uncertain, settled against Redis at the next
        start. A failed batch goes back to the local queue at once, so it can be dequeued,
        cancelled and expire on time while Redis stays down.
        """
        while self.redis_up and self.local.queued:
            batch = await self.local.take_for_handover(self.migrate_batch)
            if not batch:
                break
            ids = [r.queue_id for r in batch]
            try:
                results = await self.redis.enqueue(batch)
            except BaseException as exc:
                # Whether Redis stored the batch is unknown (a reset or a timeout can follow
                # the write): the requests come back marked uncertain, and recovery keeps
                # exactly one copy.
                await self.local.return_handover(ids, uncertain=True)
                self._notify_change()
                if isinstance(exc, BackendUnavailable):
                    self._mark_down(exc, "migrate")
                    return
                raise
            await self.local.confirm_handover(ids)
            self.moved += sum(1 for r in results if r.created)
            log.info("backlog_moved", count=len(batch), left=self.local.queued)
            self._notify_change()

    def _maybe_move(self) -> None:
        """Restart the mover when requests became queued locally again with Redis up.

        A local lease that lapses after recovery puts its request back in the local queue.
        """
        if self.redis_up and self.local.queued and (self._mover is None or self._mover.done()):
            self._kick_mover()

    # -- views ----------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "redis" if self.redis_up else "local_fallback"

    def degraded_s(self) -> float:
        ongoing = 0.0 if self._degraded_since is None else time.monotonic() - self._degraded_since
        return round(self._degraded_total + ongoing, 3)

    async def stats(self) -> QueueStats:
        """Both stores and their sum; the sum counts a moved request once (in Redis)."""
        local = await self.local.stats()
        stores = {"local": local}
        warnings = list(self.data_lost)
        remote: QueueStats | None = None
        if self.redis_up:
            try:
                remote = await self.redis.stats()
            except BackendUnavailable as exc:
                self._mark_down(exc, "stats")
        if remote is None:
            warnings.append(f"redis unavailable ({self.down_reason}): its counts are missing")
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
            failovers=self.failovers,
            recoveries=self.recoveries,
            degraded_s=self.degraded_s(),
            redis_data_lost=len(self.data_lost),
        )

    async def health(self) -> HealthReport:
        """ok on Redis; degraded on the local fallback, after data loss, or when unsafe."""
        reasons = list(self.data_lost)
        if not self.redis_up:
            reasons.insert(0, f"redis unavailable ({self.down_reason}); serving from local queue")
        else:
            reasons += self.redis.warnings
        local = await self.local.health()
        reasons += local.reasons
        return HealthReport(status="degraded" if reasons else "ok", mode=self.mode, reasons=reasons)
