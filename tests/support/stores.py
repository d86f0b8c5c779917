"""Stores built from Settings for tests, beyond what sidecar.queue.build gives the daemon."""

from __future__ import annotations

import time

from sidecar.config import Settings
from sidecar.queue.base import Clock
from sidecar.queue.build import build_redis_queue
from sidecar.queue.redis import RedisQueue


async def open_redis_queue(settings: Settings, *, clock: Clock = time.time) -> RedisQueue:
    """Build and start a RedisQueue; raises BackendUnavailable when Redis cannot be reached."""
    queue = build_redis_queue(settings, clock=clock)
    try:
        await queue.start()
    except BaseException:
        await queue.close()
        raise
    return queue
