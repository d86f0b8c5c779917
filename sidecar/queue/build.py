"""The one place that turns Settings into stores: local alone, or Redis with the local fallback.

Stores take hooks (sidecar.queue.hooks.StoreHooks) for what they report, never the metrics
registry itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from sidecar.config import Settings
from sidecar.queue.base import Clock, QueueStore
from sidecar.queue.hooks import NO_HOOKS, StoreHooks
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.redis import RedisQueue, redis_client
from sidecar.queue.resilient import ResilientQueue

log = structlog.get_logger("sidecar")


def build_local_queue(
    settings: Settings,
    clock: Clock = time.time,
    *,
    journaled: bool = True,
    hooks: StoreHooks = NO_HOOKS,
    sync: Callable[[int], None] = os.fdatasync,
) -> LocalQueue:
    """The bounded local store sized by the QUEUE_* settings, journaled under the state dir."""
    journal = None
    if journaled:
        journal = Journal(
            Path(settings.state_dir),
            fsync=settings.journal_fsync == "always",
            max_bytes=settings.journal_max_bytes,
            compact_max_bytes=settings.journal_compact_bytes,
            sync=sync,
        )
    return LocalQueue(
        max_items=settings.queue_max_size,
        max_bytes=settings.queue_max_memory_bytes,
        high_watermark=settings.queue_high_watermark,
        low_watermark=settings.queue_low_watermark,
        retention_s=settings.retention_s,
        retry_after_s=settings.queue_retry_after_s,
        max_retained=settings.queue_max_retained,
        clock=clock,
        journal=journal,
        recover_every_s=settings.journal_recover_interval_s,
        hooks=hooks,
    )


def build_redis_queue(
    settings: Settings, *, clock: Clock = time.time, hooks: StoreHooks = NO_HOOKS
) -> RedisQueue:
    """A RedisQueue for the settings, not yet started (nothing is sent to Redis)."""
    return RedisQueue(
        redis_client(settings),
        retention_s=settings.retention_s,
        prefix=settings.redis_key_prefix,
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
) -> tuple[QueueStore, LocalQueue]:
    """The store that serves, and the local store under it (the same object without Redis)."""
    local = build_local_queue(settings, hooks=hooks, sync=sync)
    if settings.redis_url is None:
        log.info("local_queue_only", state_dir=settings.state_dir, fsync=settings.journal_fsync)
        return local, local
    # The resilient manager starts Redis itself, so a daemon whose Redis is down at boot
    # still starts, on the local queue, and moves to Redis when it answers.
    return ResilientQueue(
        build_redis_queue(settings, hooks=hooks),
        local,
        probe_initial_s=settings.redis_probe_initial_s,
        probe_max_s=settings.redis_probe_max_s,
        probe_successes=settings.redis_probe_successes,
        flap_window_s=settings.redis_flap_window_s,
        watch_interval_s=settings.redis_watch_interval_s,
        migrate_batch=settings.redis_handover_batch,
        log_repeat_s=settings.redis_log_repeat_s,
    ), local
