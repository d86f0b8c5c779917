"""A provider breaker: consecutive failures open it, one half-open probe closes it again.

While it is open, callers do not each wait for a timeout: the gateway queues at once and
workers wait for the probe time. Nothing here awaits; the clock is injected for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("sidecar.llm.breaker")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Closed → open after `failures` in a row → half-open after `reset_s` → closed on success."""

    def __init__(
        self,
        *,
        failures: int = 5,
        reset_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._changed: asyncio.Event | None = None  # made by the first waiter

    @property
    def state(self) -> BreakerState:
        """The state now (open turns half-open by itself once reset_s has passed)."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until a probe may be sent (0 when a call may go now)."""
        if self._opened_at is None or self._probing:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the provider now; in half-open, only one probe at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        self._probing = True
        return True

    async def wait(self, stop: asyncio.Event) -> None:
        """Until a call may be allowed again: the open period ends, or a probe settles."""
        if self._changed is None:
            self._changed = asyncio.Event()
        changed = asyncio.ensure_future(self._changed.wait())
        stopped = asyncio.ensure_future(stop.wait())
        # Open: until it turns half-open. A probe in flight: until it settles (success,
        # failure or release notify), bounded so a lost notice cannot stall a worker.
        timeout = self.retry_in() or self.reset_s
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.wait((changed, stopped), return_when=asyncio.FIRST_COMPLETED),
                    timeout,
                )
        finally:
            changed.cancel()
            stopped.cancel()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def success(self) -> None:
        """The provider answered (a 4xx included: it is up)."""
        if self._opened_at is not None:
            log.info("llm_breaker_closed")
        self._failures = 0
        self._opened_at = None
        self._probing = False
        self._notify()

    def failure(self) -> None:
        """The provider was unavailable; a failed probe opens the breaker again for reset_s."""
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self.threshold):
            log.warning("llm_breaker_opened", failures=self._failures, reset_s=self.reset_s)
            self._opened_at = self._clock()
        self._probing = False
        self._notify()

    def release(self) -> None:
        """A probe ended without telling anything (cancelled, no work): let another go."""
        if self._probing:
            self._probing = False
            self._notify()
