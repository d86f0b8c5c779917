"""The Redis store's sweeper: one bounded sweep step every interval, until the store closes.

Each step is one script run (lua/sweep.lua): expire queued requests past their TTL, reclaim
lapsed leases, forget terminal records past their retention. A backlog is swept step after
step; an outage is logged once when it starts and once when it ends, not at every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from sidecar.errors import BackendUnavailable
from sidecar.queue.redis.keys import SweepCounts


class Sweepable(Protocol):
    async def sweep(self) -> SweepCounts: ...


async def sweep_forever(
    store: Sweepable,
    *,
    interval_s: float,
    limit: int,
    closing: asyncio.Event,
    log: Any,
) -> None:
    """Call store.sweep() every interval_s until closing is set; again at once while a step
    was full (the method is looked up at each call, as the store's own loop did)."""
    failing = False
    while not closing.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), interval_s)
            return
        try:
            counts = await store.sweep()
            while max(counts) >= limit:  # a backlog: keep going
                counts = await store.sweep()
        except BackendUnavailable as exc:
            if not failing:
                log.warning("redis_sweep_failed", error=exc.message)
            failing = True
        except Exception:  # a bug must not stop the sweeper for good
            log.exception("redis_sweep_crashed")
        else:
            if failing:
                log.info("redis_sweep_recovered")
            failing = False
