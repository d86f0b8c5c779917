"""RedisQueue: the durable store shared by every host, with the contract of LocalQueue.

Every change of state is one Lua script (sidecar/queue/redis/lua/, one file per operation, with
common.lua's helpers), so a request moves exactly once even when several daemons share one
Redis. Scripts take `now` from this process's clock: every expiry, lease and retention decision
uses it, so hosts sharing a Redis need synchronised clocks (NTP). Redis's own TTL on each
request hash only collects garbage. The key layout is documented in keys.py; client
construction and error classification live in io.py, the scripts' loading in scripts.py and the
folding of concurrent calls into shared runs in fold.py, the sweeper's loop in sweep.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import structlog

from sidecar.errors import BackendUnavailable
from sidecar.models import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    REASON_TTL,
    EnqueueOutcome,
    HealthReport,
    HealthStatus,
    QueuedRequest,
    QueueStats,
    QueueStatus,
    ServingMode,
)
from sidecar.queue.base import JOB_FIXED_BYTES, BaseStore, Clock, new_lease_id
from sidecar.queue.hooks import (
    FAILED_CANCELLED,
    FAILED_EXHAUSTED,
    NO_HOOKS,
    RETRY_LEASE_EXPIRED,
    RETRY_WORKER,
    StoreHooks,
    failure_kind,
)
from sidecar.queue.redis.io import (
    RedisClient,
    check_one_slot,
    redis_errors,
)
from sidecar.queue.redis.keys import (
    RedisKeys,
    ScriptCode,
    SweepCounts,
    bounded_time,
    decode_number,
    decode_record,
    lease_end,
    pending_score,
    settled_record,
)
from sidecar.queue.redis.operators import RedisOperatorSide
from sidecar.queue.redis.scripts import ScriptRunner
from sidecar.queue.redis.sweep import sweep_forever
from sidecar.queue.redis.watch import PendingWatch, RedisWatch
from sidecar.queue.redis.wire import Arg

log = structlog.get_logger(__name__)


class RedisQueue(RedisOperatorSide, BaseStore):
    """The Redis store: requests in hashes, order and timers in sorted sets, changes in Lua."""

    name = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        retention_s: float,
        prefix: str = "sidecar",
        clock: Clock = time.time,
        sweep_interval_s: float | None = 1.0,
        sweep_limit: int = 500,
        poll_interval_s: float = 0.2,
        check_eviction_policy: bool = True,
        url_for_logs: str | None = None,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 500,
        hooks: StoreHooks = NO_HOOKS,
        functions: bool | None = None,
        owns_client: bool = True,
        dead_retention_s: float | None = None,
        max_dead: int = 10_000,
        max_dead_bytes: int = 2**62,
    ) -> None:
        """functions: run the scripts as Redis Functions (None: where the server has them).
        owns_client: False for a queue that shares another queue's client (closed by it)."""
        self.keys = RedisKeys.for_prefix(prefix)
        self._hooks = hooks
        check_one_slot(self.keys)
        self.retention_s = retention_s
        self.dead_retention_s = retention_s if dead_retention_s is None else dead_retention_s
        # ARGV[2] of every script (lua/common.lua): both retentions and the dead letters' caps.
        self._retention_arg = (
            f"{retention_s!r},{self.dead_retention_s!r},{max_dead},{max_dead_bytes}"
        )
        self._max_dead = max_dead
        self._max_dead_bytes = max_dead_bytes
        # dead_dropped as last read (None: not yet): its growth is logged.
        self._dead_dropped_seen: int | None = None
        self._redis = client
        self._watch = RedisWatch(
            client, self.keys.generation, log.bind(redis=url_for_logs, prefix=prefix),
            check_policy=check_eviction_policy,
        )  # fmt: skip
        # Operator-facing notes (health, stats), kept by the watch.
        self.warnings = self._watch.warnings
        self._runner = ScriptRunner(
            client,
            log.bind(redis=url_for_logs, prefix=prefix),
            min_replicas=min_replicas_ack,
            replicas_timeout_ms=replicas_ack_timeout_ms,
            fixed_keys=self.keys.script_keys(),
            functions=functions,
            owns_client=owns_client,
        )
        self._clock = clock
        self._sweep_interval_s = sweep_interval_s
        self._sweep_limit = sweep_limit
        self._script_keys = self.keys.script_keys()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._started = False
        self._log = log.bind(redis=url_for_logs, prefix=prefix)
        self._pending = PendingWatch(
            client, self.keys, clock, poll_interval_s, self._closing, self._log
        )

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts, check the eviction policy, mark the generation, start the sweeper.

        Raises BackendUnavailable when Redis cannot be reached; a second call does nothing.
        """
        if self._started:
            return
        with redis_errors():
            await self._runner.load_scripts()
            await self._watch.start()
        self._started = True
        if self._sweep_interval_s is not None:
            sweeping = sweep_forever(
                self, interval_s=self._sweep_interval_s, limit=self._sweep_limit,
                closing=self._closing, log=self._log,
            )  # fmt: skip
            self._sweeper = asyncio.get_running_loop().create_task(sweeping)
        self._log.info(
            "redis_queue_started", generation=self.generation, functions=self.uses_functions
        )

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the sweeper, let in-flight pipelines finish, close the connections (timeout_s:
        unused, Redis keeps what it holds)."""
        self._closing.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._pending.close()
        await self._runner.close()

    @property
    def flushes(self) -> int:
        """Pipelines sent so far (concurrent calls share one)."""
        return self._runner.flushes

    @property
    def uses_functions(self) -> bool:
        """Whether the scripts run as Redis Functions (FCALL), else as plain scripts (EVALSHA)."""
        return self._runner.uses_functions

    @property
    def script_loads(self) -> int:
        """Script load rounds so far (one at start, one per recovery from a server that lost
        them: NOSCRIPT, or a function not found)."""
        return self._runner.script_loads

    # -- the contract ---------------------------------------------------------------------------

    async def enqueue(
        self, requests: Sequence[QueuedRequest], *, held_until: Mapping[str, float] | None = None
    ) -> list[EnqueueOutcome]:
        """Store new requests all-or-none; existing queue_ids come back unchanged. Times past
        MAX_TIME_S (an infinite TTL) are stored as MAX_TIME_S; NaN raises ValueError.

        held_until: queue_id -> not_before, for requests the hand-over moves from the local
        store while a `fail` with delay_s holds them back: stored here held back until then.
        """
        if not requests:
            return []
        now = self._clock()
        args: list[Arg] = [len(requests)]
        bounded: list[float] = []  # each request's expires_at as stored
        held = held_until or {}
        for req in requests:
            payload = req.payload if req.payload is not None else b""
            created = bounded_time(req.created_at, "created_at")
            expires = bounded_time(req.expires_at, "expires_at")
            bounded.append(expires)
            # Eight values per request, the last its not_before (0: none); every call sends
            # eight, so calls folded into one run share one layout (lua/enqueue.lua).
            not_before = held.get(req.queue_id)
            until: Arg = 0 if not_before is None else bounded_time(not_before, "not_before")
            args.extend((req.queue_id, req.priority, created, expires, req.max_attempts,
                         payload, req.attempts, until))  # fmt: skip
        keys = tuple([self.keys.request_prefix + r.queue_id for r in requests])  # request()
        reply = await self._call("enqueue", now, *args, keys=keys)
        results: list[EnqueueOutcome] = []
        queued, any_created = QueueStatus.QUEUED, False
        for req, expires, (created, data) in zip(requests, bounded, reply[1], strict=True):
            if created:
                any_created = True
                payload = req.payload if req.payload is not None else b""
                rec = msgspec.structs.replace(
                    req, seq=int(data), status=queued, updated_at=now,
                    payload=payload, size_bytes=len(payload), lease_id=None,
                    lease_expires_at=None, reason=None, expires_at=expires,
                )  # fmt: skip
            else:
                rec = decode_record(data)
            results.append(EnqueueOutcome(request=rec, created=bool(created)))
        if any_created:
            self._pending.notify()
        return results

    async def dequeue(
        self, max_items: int, lease_s: float, max_bytes: int | None = None
    ) -> list[QueuedRequest]:
        """Lease up to max_items of the most urgent queued requests within max_bytes, in one call.

        The lease ids are chosen here and passed in, so a resent pipeline gets the same
        requests back instead of a second set of leases (lua/dequeue.lua).
        """
        if max_items <= 0:
            return []
        now = self._clock()
        until = lease_end(now, lease_s)
        lease_ids = [new_lease_id() for _ in range(max_items)]
        budget = -1 if max_bytes is None else max_bytes
        reply = await self._call(
            "dequeue", now, until, self._sweep_limit, budget, JOB_FIXED_BYTES, *lease_ids
        )
        out = [decode_record(pairs) for pairs in reply[1]]
        expired, requeued, failed = (int(n) for n in reply[2])
        self._count_swept(SweepCounts(expired, requeued, failed, 0))
        for rec in out:
            # Its first lease, the wait since enqueue ends here (a fail that did not count
            # takes attempts back to 0, but leaves its reason).
            if rec.attempts == 1 and rec.reason is None:
                self._hooks.first_leased(self.name, now - rec.created_at)
        return out

    async def extend(self, queue_id: str, lease_id: str, lease_s: float) -> QueuedRequest:
        """Push a live lease's end to now + lease_s (at most MAX_TIME_S)."""
        now = self._clock()
        until = lease_end(now, lease_s)
        reply = await self._call("extend", now, queue_id, lease_id, until, keys=self._req(queue_id))
        return settled_record(reply, "extend", queue_id, lease_id)

    async def complete(self, queue_id: str, lease_id: str) -> QueuedRequest:
        """Complete a leased request; a repeat with the same lease returns the completed record."""
        result = await self._complete(queue_id, lease_id, "1")
        return settled_record(result, "complete", queue_id, lease_id)

    async def complete_brief(self, queue_id: str, lease_id: str) -> None:
        """complete, without reading the record back (Redis skips the read and the reply)."""
        result = await self._complete(queue_id, lease_id, "0")
        if result[0] != ScriptCode.OK:
            settled_record(result, "complete", queue_id, lease_id)  # raises its error

    async def _complete(self, queue_id: str, lease_id: str, want: str) -> list[Any]:
        args = (queue_id, lease_id, want)
        reply = await self._call("complete", self._clock(), *args, keys=self._req(queue_id))
        result: list[Any] = reply[1][0]  # complete.lua takes a batch; concurrent calls share a run
        return result

    async def fail(
        self,
        queue_id: str,
        lease_id: str,
        reason: str,
        retry: bool,
        delay_s: float = 0.0,
        counts: bool = True,
    ) -> QueuedRequest:
        """End a lease with a failure; requeue while attempts remain and retry is asked.

        With delay_s > 0 the requeued request is not handed out before now + delay_s. With
        retry and not counts, attempts goes back by one and the request is always requeued.
        A repeat with the same lease returns the record as it is now, like complete (and gives
        nothing back a second time).
        """
        now = self._clock()
        not_before = bounded_time(now + delay_s, "not_before") if delay_s > 0 else 0.0
        args = (queue_id, lease_id, reason, "1" if retry else "0", not_before,
                "1" if counts else "0")  # fmt: skip
        reply = await self._call("fail", now, *args, keys=self._req(queue_id))
        rec = settled_record(reply, "fail", queue_id, lease_id)
        if len(reply) > 2:  # a repeat of a fail already done: nothing changed, nothing to count
            return rec
        if rec.status is QueueStatus.QUEUED:
            self._hooks.retried(self.name, RETRY_WORKER, 1)
            if not delay_s:
                self._pending.notify()
        elif rec.status is QueueStatus.FAILED:
            self._hooks.failed(self.name, failure_kind(rec.reason), 1)
        return rec

    async def cancel(self, queue_id: str) -> QueuedRequest:
        """Fail a queued request with the reason `cancelled`."""
        # A fresh token per call: the same call resent answers its result, a new one does not.
        token = uuid.uuid4().hex
        reply = await self._call("cancel", self._clock(), queue_id, token, keys=self._req(queue_id))
        rec = settled_record(reply, "cancel", queue_id, None)
        if len(reply) == 2:  # not a resent run's repeat
            self._hooks.failed(self.name, FAILED_CANCELLED, 1)
        return rec

    async def take(self, queue_id: str, lease_s: float) -> QueuedRequest | None:
        """Lease queue_id if it is queued (lua/take.lua); None when it is not. The lease id is
        chosen here, so a resent pipeline answers the lease its first run made."""
        now = self._clock()
        args = (queue_id, new_lease_id(), lease_end(now, lease_s))
        reply = await self._call("take", now, *args, keys=self._req(queue_id))
        return decode_record(reply[1]) if reply[0] == ScriptCode.OK else None

    async def status(self, queue_id: str) -> QueuedRequest | None:
        """The request as stored now (what is due applied first), or None."""
        reply = await self._call("status", self._clock(), queue_id, keys=self._req(queue_id))
        return None if reply[0] == ScriptCode.NOT_FOUND else decode_record(reply[1])

    async def stats(self) -> QueueStats:
        """The shared books of this Redis queue, after one sweep step."""
        now = self._clock()
        reply = await self._call("stats", now, self._sweep_limit)
        _, swept, queued, processing, retained, counters, oldest, dead = reply
        self._note_dead_dropped(int(dead[2]))
        self._count_swept(SweepCounts(*(int(n) for n in swept)))
        accepted, completed, failed, expired, held, worst = counters
        return QueueStats(
            store=self.name,
            queued=queued,
            processing=processing,
            accepted=int(accepted or 0),
            completed=int(completed or 0),
            failed=int(failed or 0),
            expired=int(expired or 0),
            items=queued + processing,
            bytes=int(held or 0),
            oldest_queued_age_s=None if oldest is None else max(0.0, now - float(oldest)),
            max_expired_age_s=decode_number(worst),
            retained=retained,
            warnings=list(self.warnings),
            dead_letters=int(dead[0]),
            dead_letters_bytes=int(dead[1]),
            dead_letters_dropped=int(dead[2]),
        )

    async def health(self) -> HealthReport:
        """Unhealthy when Redis does not answer, degraded when its setup is unsafe, else ok."""
        try:
            with redis_errors():
                await self._redis.ping()
        except BackendUnavailable as exc:
            return HealthReport(
                status=HealthStatus.UNHEALTHY, mode=ServingMode.REDIS, reasons=[exc.message]
            )
        if self.warnings:
            return HealthReport(
                status=HealthStatus.DEGRADED, mode=ServingMode.REDIS, reasons=list(self.warnings)
            )
        return HealthReport(status=HealthStatus.OK, mode=ServingMode.REDIS)

    async def wait_for_work(self, timeout: float) -> None:
        """Wake on an enqueue through this instance, or when Redis shows queued requests."""
        await self._pending.wait(timeout)

    async def sweep(self) -> SweepCounts:
        """One bounded sweep step: expire, reclaim lapsed leases, forget past retention."""
        reply = await self._call("sweep", self._clock(), self._sweep_limit)
        self._note_dead_dropped(int(reply[2]))
        counts = SweepCounts(*(int(n) for n in reply[1]))
        self._count_swept(counts)
        if counts.requeued:
            self._pending.notify()
        return counts

    def _note_dead_dropped(self, total: int) -> None:
        """Log the growth of dead_dropped (read by each sweep step and stats): never silently
        (QUEUE_MAX_DEAD, QUEUE_MAX_DEAD_MB), whichever script dropped the oldest."""
        seen = self._dead_dropped_seen
        if seen is not None and total > seen:
            self._log.warning(
                "dead_letters_dropped", count=total - seen, total=total,
                max_dead=self._max_dead, max_dead_bytes=self._max_dead_bytes,
            )  # fmt: skip
        self._dead_dropped_seen = total

    async def discard_queued(self, queue_id: str) -> bool:
        """Remove a queued request as if never accepted here (another store keeps it)."""
        # A fresh marker per call: the same call resent answers what it did (lua/discard.lua).
        marker = self.keys.discarded(uuid.uuid4().hex)
        keys = (self.keys.request(queue_id), marker)
        reply = await self._call("discard", self._clock(), queue_id, keys=keys)
        return bool(reply[1])

    async def probe(self) -> None:
        """One write round trip; raises BackendUnavailable unless Redis takes writes now.

        A write, not PING: a Redis out of memory or turned read-only answers PING but would
        refuse every enqueue. With min_replicas_ack, the replicas must confirm it too.
        """
        await self._runner.probe(self.keys.probe)

    async def check_generation(self) -> str | None:
        """Why this Redis lost its data since we last looked, or None (see RedisWatch)."""
        with redis_errors():
            return await self._watch.check_generation()

    @property
    def generation(self) -> str | None:
        """The marker of the data set this store last saw (None before start)."""
        return self._watch.generation

    async def queued_by_priority(self) -> dict[str, dict[int, int]]:
        """Requests waiting in line (not delayed) per priority: one ZCOUNT per band."""
        with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for p in range(PRIORITY_MIN, PRIORITY_MAX + 1):
                    lo, hi = pending_score(p, 0), pending_score(p + 1, 0)
                    pipe.zcount(self.keys.pending, lo, f"({hi}")
                counts = await pipe.execute()
        return {self.name: {p: int(n) for p, n in enumerate(counts, PRIORITY_MIN)}}

    # -- helpers ---------------------------------------------------------------------------------

    def _count_swept(self, counts: SweepCounts) -> None:
        # What this daemon's own script run moved: each change happens in exactly one run, so
        # the per-host counts of every daemon on this Redis add up to the queue's.
        if counts.expired:
            self._hooks.expired(self.name, REASON_TTL, counts.expired)
        if counts.requeued:
            self._hooks.retried(self.name, RETRY_LEASE_EXPIRED, counts.requeued)
        if counts.failed:
            self._hooks.failed(self.name, FAILED_EXHAUSTED, counts.failed)

    # -- the coalescer ---------------------------------------------------------------------------

    def run_script(
        self, script: str, *args: Arg, keys: tuple[str, ...]
    ) -> asyncio.Future[list[Any]]:
        """Run one of lua/'s scripts for a component beside the queue (the limiter) in the next
        shared pipeline; `keys` follow the eleven every script gets. The future of its reply."""
        return self._call(script, self._clock(), *args, keys=keys)

    def _req(self, queue_id: str) -> tuple[str]:
        return (self.keys.request(queue_id),)

    def _call(
        self, script: str, now: float, *args: Arg, keys: tuple[str, ...] = ()
    ) -> asyncio.Future[list[Any]]:
        """Run one script in the next shared pipeline: the future of its reply.

        KEYS are the eleven of every script, then the request hashes the call names. A plain
        function, not a coroutine: one layer less for every call to resume through.
        """
        if self._closing.is_set():
            raise BackendUnavailable("redis queue is closed", {"kind": "closed"})
        common: tuple[Arg, ...] = (bounded_time(now, "now"), self._retention_arg)
        return self._runner.call(script, self._script_keys + keys, common + args)
