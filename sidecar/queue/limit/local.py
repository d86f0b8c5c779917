"""LocalLimiter: the limiter in this daemon's memory, at this host's share of every limit.

It serves while Redis is down (or when none is configured). Each limit is multiplied by
LIMITER_LOCAL_SHARE (1 / the hosts sharing a provider account), so the hosts together stay
within the account's limits while each paces on its own. The scopes held are bounded: past
max_scopes the least recently used one is dropped (a dropped scope starts again empty).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from sidecar.queue.base import Clock
from sidecar.queue.limit import gcra
from sidecar.queue.limit.gcra import US, Ask, Breaker, Grant, ScopeState

# About 100 bytes a scope: 10,000 scopes stay near a megabyte, far more than the providers,
# models and keys one host calls.
MAX_SCOPES = 10_000


class LocalLimiter:
    """The limiter's rules (gcra.py) on scopes kept in a bounded table in memory."""

    name = "local"

    def __init__(
        self, *, share: float = 1.0, clock: Clock = time.time, max_scopes: int = MAX_SCOPES
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share!r}")
        self.share = share
        self._clock = clock
        self.max_scopes = max_scopes
        self._scopes: OrderedDict[str, tuple[ScopeState, int]] = OrderedDict()

    @property
    def scopes(self) -> int:
        """Scopes held now (idle ones included until they are dropped)."""
        return len(self._scopes)

    def _now(self) -> int:
        return gcra.whole_us(self._clock() * US)

    def _state(self, scope: str, now: int) -> ScopeState:
        held = self._scopes.get(scope)
        if held is not None and held[1] > now:
            self._scopes.move_to_end(scope)
            return held[0]
        self._scopes.pop(scope, None)
        while len(self._scopes) >= self.max_scopes:
            self._scopes.popitem(last=False)  # the least recently used
        state = ScopeState()
        self._scopes[scope] = (state, 0)
        return state

    def _keep(self, scope: str, state: ScopeState, now: int) -> None:
        self._scopes[scope] = (state, gcra.expires_at(state, now))

    async def acquire(self, scope: str, ask: Ask) -> Grant:
        now = self._now()
        state = self._state(scope, now)
        share = self.share
        local = Ask(
            rpm=ask.rpm * share, tpm=ask.tpm * share, requests=ask.requests, tokens=ask.tokens,
            fresh=ask.fresh, drain_share=ask.drain_share, ramp_s=ask.ramp_s,
        )  # fmt: skip
        grant = gcra.acquire(state, now, local)
        self._keep(scope, state, now)
        return grant

    async def settle(self, scope: str, tpm: int, tokens_delta: int) -> None:
        now = self._now()
        state = self._state(scope, now)
        gcra.settle(state, now, tpm * self.share, tokens_delta)
        self._keep(scope, state, now)

    async def pause(self, scope: str, pause_s: float) -> float:
        now = self._now()
        state = self._state(scope, now)
        until = gcra.pause(state, now, pause_s)
        self._keep(scope, state, now)
        return until / US

    async def report(
        self, scope: str, *, ok: bool, probe: bool, failures: int, reset_s: float
    ) -> Breaker:
        now = self._now()
        state = self._state(scope, now)
        result = gcra.report(state, now, ok=ok, probe=probe, failures=failures, reset_s=reset_s)
        self._keep(scope, state, now)
        return result
