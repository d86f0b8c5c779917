"""The interface every limiter keeps (Limiter), and the counting done once above them."""

from __future__ import annotations

from typing import Protocol

from sidecar.queue.limit.gcra import Ask, Breaker, Grant


class Limiter(Protocol):
    """Pacing of provider calls by scope: LocalLimiter, RedisLimiter, or ResilientLimiter over
    both, which the server talks to exactly as to one. protocol.md 8.14-8.17 says what each
    call means; the arguments arrive validated (the wire types bound them)."""

    name: str

    async def acquire(self, scope: str, ask: Ask) -> Grant:
        """All of the ask's costs, or none and when asking again can succeed."""
        ...

    async def settle(self, scope: str, tpm: int, tokens_delta: int) -> None:
        """Charge (or refund) tokens after the call, at the tokens limit's rate."""
        ...

    async def pause(self, scope: str, pause_s: float) -> float:
        """Nothing granted on the scope for pause_s; the pause's end (epoch seconds)."""
        ...

    async def report(
        self, scope: str, *, ok: bool, probe: bool, failures: int, reset_s: float
    ) -> Breaker:
        """One call's outcome for the shared breaker; its state after."""
        ...


class LimiterHooks(Protocol):
    """What the limiter tells an observer (the metrics)."""

    def limit_decided(self, result: str) -> None:
        """One acquire answered: granted, probe (granted as the probe) or waited."""


class CountedLimiter:
    """A limiter whose every acquire is counted by its outcome (the daemon's metrics)."""

    def __init__(self, inner: Limiter, hooks: LimiterHooks) -> None:
        self.inner = inner
        self.name = inner.name
        self._hooks = hooks

    async def acquire(self, scope: str, ask: Ask) -> Grant:
        grant = await self.inner.acquire(scope, ask)
        result = "probe" if grant.probe else "granted" if grant.granted else "waited"
        self._hooks.limit_decided(result)
        return grant

    async def settle(self, scope: str, tpm: int, tokens_delta: int) -> None:
        await self.inner.settle(scope, tpm, tokens_delta)

    async def pause(self, scope: str, pause_s: float) -> float:
        return await self.inner.pause(scope, pause_s)

    async def report(
        self, scope: str, *, ok: bool, probe: bool, failures: int, reset_s: float
    ) -> Breaker:
        return await self.inner.report(
            scope, ok=ok, probe=probe, failures=failures, reset_s=reset_s
        )
