"""RedisLimiter: the limiter in Redis, shared by every daemon on it (lua/limit.lua).

Each call is one run of the one atomic script on the scope's hash, `{prefix}:limit:<scope>`,
timed by Redis's own clock (TIME), so hosts agree without synchronised clocks. The hash expires
by itself once idle. Calls share the queue's pipelines (RedisQueue.run_script).
"""

from __future__ import annotations

from typing import Any

from sidecar.queue.limit.gcra import US, Ask, Breaker, Grant, Reason
from sidecar.queue.redis import RedisQueue

SCRIPT = "limit"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLimiter:
    """The limiter's rules run by lua/limit.lua on the queue's Redis."""

    name = "redis"

    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue

    async def _run(self, scope: str, *args: str | int | float) -> list[Any]:
        key = self._queue.keys.limit(scope)
        reply: list[Any] = await self._queue.run_script(SCRIPT, *args, keys=(key,))
        return reply

    async def acquire(self, scope: str, ask: Ask) -> Grant:
        granted, wait_us, probe, reason = await self._run(
            scope, "acquire", repr(float(ask.rpm)), repr(float(ask.tpm)), ask.requests,
            ask.tokens, int(ask.fresh), repr(ask.drain_share), repr(ask.ramp_s),
        )  # fmt: skip
        return Grant(bool(granted), int(wait_us) / US, bool(probe), Reason(_text(reason)))

    async def settle(self, scope: str, tpm: int, tokens_delta: int) -> None:
        await self._run(scope, "settle", tpm, tokens_delta)

    async def pause(self, scope: str, pause_s: float) -> float:
        [until] = await self._run(scope, "pause", repr(pause_s))
        return int(until) / US

    async def report(
        self, scope: str, *, ok: bool, probe: bool, failures: int, reset_s: float
    ) -> Breaker:
        [state] = await self._run(scope, "report", int(ok), int(probe), failures, repr(reset_s))
        return Breaker(_text(state))
