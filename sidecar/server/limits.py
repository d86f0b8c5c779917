"""The limiter ops (protocol.md 8.14-8.17): each request's fields to the limiter and back."""

from __future__ import annotations

import structlog

from sidecar.protocol import (
    LimitAcquire,
    LimitGrant,
    LimitPause,
    LimitPaused,
    LimitReport,
    LimitSettle,
    LimitSettled,
    LimitState,
)
from sidecar.queue.limit import Ask, Limiter

log = structlog.get_logger("sidecar.limits")


class LimitOps:
    """Answers limit_acquire, limit_settle, limit_pause and limit_report from one limiter."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def acquire(self, req: LimitAcquire) -> LimitGrant:
        ask = Ask(
            rpm=req.rpm, tpm=req.tpm, requests=req.requests, tokens=req.tokens, fresh=req.fresh,
            drain_share=req.drain_share, ramp_s=req.ramp_s,
        )  # fmt: skip
        grant = await self.limiter.acquire(req.scope, ask)
        return LimitGrant(
            granted=grant.granted,
            wait_s=grant.wait_s,
            probe=grant.probe,
            reason=grant.reason.value,
        )

    async def settle(self, req: LimitSettle) -> LimitSettled:
        await self.limiter.settle(req.scope, req.tpm, req.tokens_delta)
        return LimitSettled()

    async def pause(self, req: LimitPause) -> LimitPaused:
        until = await self.limiter.pause(req.scope, req.pause_s)
        # A pause is rare (a 429 or 503 with Retry-After, rate-limit headers at zero) and
        # stops the whole fleet's calls on the scope: worth a line.
        log.info("limit_paused", scope=req.scope, pause_s=req.pause_s, reason=req.reason)
        return LimitPaused(paused_until=until)

    async def report(self, req: LimitReport) -> LimitState:
        state = await self.limiter.report(
            req.scope, ok=req.ok, probe=req.probe, failures=req.failures, reset_s=req.reset_s
        )
        return LimitState(state=state.value)
