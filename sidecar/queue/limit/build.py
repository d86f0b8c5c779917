"""The one place that turns Settings and the serving queue into the daemon's limiter."""

from __future__ import annotations

from sidecar.config import Settings
from sidecar.queue.base import QueueStore
from sidecar.queue.limit.base import CountedLimiter, Limiter, LimiterHooks
from sidecar.queue.limit.local import LocalLimiter
from sidecar.queue.limit.redis import RedisLimiter
from sidecar.queue.limit.resilient import ResilientLimiter
from sidecar.queue.resilient import ResilientQueue


def build_limiter(
    settings: Settings, queue: QueueStore, hooks: LimiterHooks | None = None
) -> Limiter:
    """Redis's limiter beside a queue on Redis (the local one while Redis is down), else the
    local limiter alone; each at LIMITER_LOCAL_SHARE of every limit when local."""
    local = LocalLimiter(share=settings.limiter_local_share)
    limiter: Limiter = local
    # The wiring is the one place that looks at which store serves: the limiter follows it.
    if isinstance(queue, ResilientQueue):
        limiter = ResilientLimiter(RedisLimiter(queue.redis), local, queue)
    return limiter if hooks is None else CountedLimiter(limiter, hooks)
