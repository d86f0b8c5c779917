"""The one place that turns Settings into stores: local alone, or Redis with the local fallback.

The daemon serves named queues (models.QueueName), each its own store stack with every
hardening of the request queue (failover, journal, hand-over, TTL, leases): `requests`, whose
Redis keys and journal stay where they always were, and the outbox queues `deliveries` and
`pickups`, under `<REDIS_KEY_PREFIX>:<name>` in Redis and in a subfolder `<name>` of the state
folder, bounded by the OUTBOX_* settings. An outbox entry is deleted once completed or
cancelled (retention 0). Stores take hooks (sidecar.queue.hooks.StoreHooks) for what they
report, never the metrics registry itself; only the request queue reports to them, so results
waiting are never counted as requests.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from sidecar.config import Settings
from sidecar.models import QueueName
from sidecar.queue.base import Clock, QueueStore
from sidecar.queue.hooks import NO_HOOKS, StoreHooks
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.redis import RedisClient, RedisQueue, close_client, redis_client
from sidecar.queue.resilient import ResilientQueue

log = structlog.get_logger("sidecar")


def build_local_queue(
    settings: Settings,
    clock: Clock = time.time,
    *,
    journaled: bool = True,
    hooks: StoreHooks = NO_HOOKS,
    sync: Callable[[int], None] = os.fdatasync,
    outbox: QueueName | None = None,
) -> LocalQueue:
    """The bounded local store sized by the QUEUE_* settings, journaled under the state dir;
    an outbox queue's sized by the OUTBOX_* settings, journaled in its own subfolder."""
    journal = None
    folder = Path(settings.state_dir)
    if outbox is not None:
        folder = folder / outbox.value
    if journaled:
        journal = Journal(
            folder,
            fsync=settings.journal_fsync == "always",
            max_bytes=settings.journal_max_bytes,
            compact_max_bytes=settings.journal_compact_bytes,
            sync=sync,
        )
    return LocalQueue(
        max_items=settings.queue_max_size if outbox is None else settings.outbox_max_size,
        max_bytes=(
            settings.queue_max_memory_bytes if outbox is None else settings.outbox_max_memory_bytes
        ),
        high_watermark=settings.queue_high_watermark,
        low_watermark=settings.queue_low_watermark,
        retention_s=settings.retention_s if outbox is None else 0.0,
        retry_after_s=settings.queue_retry_after_s,
        max_retained=settings.queue_max_retained,
        # Dead letters stay (with their payload) in every queue, outbox ones included.
        dead_retention_s=settings.dead_retention_s,
        max_dead=settings.queue_max_dead,
        max_dead_bytes=settings.queue_max_dead_bytes,
        clock=clock,
        journal=journal,
        recover_every_s=settings.journal_recover_interval_s,
        hooks=hooks,
    )


def build_redis_queue(
    settings: Settings,
    *,
    clock: Clock = time.time,
    hooks: StoreHooks = NO_HOOKS,
    outbox: QueueName | None = None,
    client: RedisClient | None = None,
) -> RedisQueue:
    """A RedisQueue for the settings, not yet started (nothing is sent to Redis); an outbox
    queue's under `<prefix>:<name>`. With a client, it uses that one and leaves closing it to
    its owner."""
    prefix = settings.redis_key_prefix
    if outbox is not None:
        prefix = f"{prefix}:{outbox.value}"
    return RedisQueue(
        client or redis_client(settings),
        owns_client=client is None,
        # The outbox queues live on the request queue's Redis, which checks its eviction
        # policy (and reports it once, in health and logs).
        check_eviction_policy=outbox is None,
        retention_s=settings.retention_s if outbox is None else 0.0,
        dead_retention_s=settings.dead_retention_s,
        max_dead=settings.queue_max_dead,
        max_dead_bytes=settings.queue_max_dead_bytes,
        prefix=prefix,
        clock=clock,
        url_for_logs=settings.redacted_redis_url(),
        min_replicas_ack=settings.redis_min_replicas_ack,
        replicas_ack_timeout_ms=settings.redis_replicas_ack_timeout_ms,
        sweep_interval_s=settings.redis_sweep_interval_s,
        sweep_limit=settings.redis_sweep_batch,
        poll_interval_s=settings.redis_poll_interval_s,
        hooks=hooks,
    )


def build_queue(
    settings: Settings,
    *,
    hooks: StoreHooks = NO_HOOKS,
    sync: Callable[[int], None] = os.fdatasync,
    outbox: QueueName | None = None,
    client: RedisClient | None = None,
) -> tuple[QueueStore, LocalQueue]:
    """The store that serves, and the local store under it (the same object without Redis);
    the request queue's, or an outbox queue's (see build_redis_queue for client)."""
    local = build_local_queue(settings, hooks=hooks, sync=sync, outbox=outbox)
    if settings.redis_url is None:
        if outbox is None:
            log.info("local_queue_only", state_dir=settings.state_dir,
                     fsync=settings.journal_fsync)  # fmt: skip
        return local, local
    # The resilient manager starts Redis itself, so a daemon whose Redis is down at boot
    # still starts, on the local queue, and moves to Redis when it answers.
    return ResilientQueue(
        build_redis_queue(settings, hooks=hooks, outbox=outbox, client=client),
        local,
        probe_initial_s=settings.redis_probe_initial_s,
        probe_max_s=settings.redis_probe_max_s,
        probe_successes=settings.redis_probe_successes,
        flap_window_s=settings.redis_flap_window_s,
        watch_interval_s=settings.redis_watch_interval_s,
        migrate_batch=settings.redis_handover_batch,
        log_repeat_s=settings.redis_log_repeat_s,
    ), local


OUTBOX = (QueueName.DELIVERIES, QueueName.PICKUPS)


class NamedQueues:
    """The daemon's named queues, each its own store stack, started and closed together."""

    def __init__(
        self,
        stores: dict[str, QueueStore],
        locals_: dict[str, LocalQueue],
        client: RedisClient | None = None,
    ) -> None:
        """stores and locals_ by queue name (QueueName values), `requests` among them; client:
        the Redis client they share, closed last."""
        self.stores = stores
        self.locals = locals_
        self._client = client

    @property
    def requests(self) -> QueueStore:
        """The request queue (the default of every op)."""
        return self.stores[QueueName.REQUESTS]

    @property
    def outbox(self) -> dict[str, QueueStore]:
        """The outbox queues by name: results waiting for their caller."""
        return {name: s for name, s in self.stores.items() if name != QueueName.REQUESTS}

    @property
    def unkept_at_close(self) -> int:
        """Acknowledged entries of every queue that could not be kept on disk at close."""
        return sum(local.unkept_at_close for local in self.locals.values())

    async def start(self) -> None:
        """Start each store (the journals replay); a failure closes those already started.

        The request queue starts last: its replay is the last `journal_replayed` line before
        `serving`, as when it was the only queue.
        """
        started: list[QueueStore] = []
        order = [*self.outbox.values(), self.requests]
        try:
            for store in order:
                await store.start()
                started.append(store)
        except BaseException:
            for store in started:
                await store.close(0.0)
            if self._client is not None:
                await close_client(self._client)
            raise

    async def close(self, timeout_s: float) -> None:
        """Close every store at once, each handing its local backlog to Redis within
        timeout_s, then the Redis client they share."""
        await asyncio.gather(*(store.close(timeout_s) for store in self.stores.values()))
        if self._client is not None:
            await close_client(self._client)


def build_queues(
    settings: Settings,
    *,
    hooks: StoreHooks = NO_HOOKS,
    sync: Callable[[int], None] = os.fdatasync,
) -> NamedQueues:
    """Every named queue: `requests` as build_queue makes it (its keys and journal as they
    always were), and each outbox queue beside it. With Redis, one client (one pool) serves
    them all; each queue's scripts still write on a connection of their own."""
    client = None if settings.redis_url is None else redis_client(settings)
    requests, local = build_queue(settings, hooks=hooks, sync=sync, client=client)
    stores: dict[str, QueueStore] = {QueueName.REQUESTS.value: requests}
    locals_ = {QueueName.REQUESTS.value: local}
    for name in OUTBOX:
        # No hooks: what the stores count (expiries, retries...) are requests' numbers.
        store, local = build_queue(settings, sync=sync, outbox=name, client=client)
        stores[name.value] = store
        locals_[name.value] = local
    return NamedQueues(stores, locals_, client)
