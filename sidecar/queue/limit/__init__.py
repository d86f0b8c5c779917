"""The fleet's limiter: pacing of provider calls by scope, owned by the daemon.

    gcra.py       the rules, written once (GCRA over two limits, drain share, breaker, ramp)
    base.py       Limiter, the interface of every limiter, and the counting above them
    local.py      LocalLimiter: in memory, at this host's share (LIMITER_LOCAL_SHARE)
    redis.py      RedisLimiter: lua/limit.lua, shared by every daemon on one Redis
    resilient.py  ResilientLimiter: Redis while the queue's Redis serves, else local
    build.py      build_limiter: Settings and the serving queue -> the daemon's limiter

protocol.md 8.14-8.17 is the normative text.
"""

from __future__ import annotations

from sidecar.queue.limit.base import CountedLimiter, Limiter, LimiterHooks
from sidecar.queue.limit.build import build_limiter
from sidecar.queue.limit.gcra import Ask, Breaker, Grant, Reason
from sidecar.queue.limit.local import LocalLimiter
from sidecar.queue.limit.redis import RedisLimiter
from sidecar.queue.limit.resilient import RedisRoute, ResilientLimiter

__all__ = [
    "Ask",
    "Breaker",
    "CountedLimiter",
    "Grant",
    "Limiter",
    "LimiterHooks",
    "LocalLimiter",
    "Reason",
    "RedisLimiter",
    "RedisRoute",
    "ResilientLimiter",
    "build_limiter",
]
