"""ResilientLimiter: Redis's limiter while the request queue's Redis serves, the local one
(this host's share of each limit) while it does not, switching inside the same call.

It follows the queue's view of Redis (RedisRoute: the ResilientQueue), so the limiter and the
queue fail over and recover together. On Redis's return its state is authoritative again: what
the local limiter granted meanwhile is not carried over (protocol.md 8.14 bounds the overshoot).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from sidecar.errors import BackendUnavailable
from sidecar.queue.limit.base import Limiter
from sidecar.queue.limit.gcra import Ask, Breaker, Grant

T = TypeVar("T")


class RedisRoute(Protocol):
    """Whether Redis serves, as the request queue sees it, and how to tell it otherwise."""

    @property
    def redis_up(self) -> bool: ...

    def redis_failed(self, exc: BackendUnavailable, op: str) -> None:
        """A call beside the queue met Redis unavailable: fail over as the queue's own would."""


class ResilientLimiter:
    """Routes each limiter call to Redis or, when it cannot serve, to the local limiter."""

    name = "resilient"

    def __init__(self, redis: Limiter, local: Limiter, route: RedisRoute) -> None:
        self.redis = redis
        self.local = local
        self._route = route

    async def _routed(
        self, on_redis: Callable[[], Awaitable[T]], on_local: Callable[[], Awaitable[T]]
    ) -> T:
        if self._route.redis_up:
            try:
                return await on_redis()
            except BackendUnavailable as exc:
                self._route.redis_failed(exc, "limit")
        return await on_local()

    async def acquire(self, scope: str, ask: Ask) -> Grant:
        return await self._routed(
            lambda: self.redis.acquire(scope, ask), lambda: self.local.acquire(scope, ask)
        )

    async def settle(self, scope: str, tpm: int, tokens_delta: int) -> None:
        await self._routed(
            lambda: self.redis.settle(scope, tpm, tokens_delta),
            lambda: self.local.settle(scope, tpm, tokens_delta),
        )

    async def pause(self, scope: str, pause_s: float) -> float:
        return await self._routed(
            lambda: self.redis.pause(scope, pause_s), lambda: self.local.pause(scope, pause_s)
        )

    async def report(
        self, scope: str, *, ok: bool, probe: bool, failures: int, reset_s: float
    ) -> Breaker:
        return await self._routed(
            lambda: self.redis.report(
                scope, ok=ok, probe=probe, failures=failures, reset_s=reset_s
            ),
            lambda: self.local.report(
                scope, ok=ok, probe=probe, failures=failures, reset_s=reset_s
            ),
        )
