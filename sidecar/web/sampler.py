"""Rates over the last minutes: the dashboard samples the daemon's stats in its own process."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from sidecar.errors import SidecarError
from sidecar.protocol import StatsResult

log = structlog.get_logger("sidecar.web")

# The counters whose rates the overview shows (cumulative counts in the stats reply).
RATE_FIELDS = ("accepted", "completed", "failed", "expired")


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    counts: tuple[int, ...]  # RATE_FIELDS, in order


@dataclass(frozen=True, slots=True)
class Series:
    """One counter's rate per sampling interval (per second), oldest first, and its SVG line."""

    name: str
    rates: list[float]
    last_minute: float | None
    points: str  # an SVG polyline's points: numbers only


class Sampler:
    """Takes the daemon's stats every interval_s and keeps the last `keep` samples."""

    def __init__(
        self, stats: Callable[[], Awaitable[StatsResult]], interval_s: float, keep: int
    ) -> None:
        self._stats = stats
        self.interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=keep)
        self.latest: StatsResult | None = None
        self.error: str | None = None

    async def run(self) -> None:
        """Sample until cancelled; a failed sample is noted, not fatal (the daemon may restart)."""
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    async def sample(self) -> None:
        try:
            stats = await self._stats()
        except SidecarError as err:
            if self.error is None:
                log.warning("web_sample_failed", code=err.code, error=err.message)
            self.error = err.message
            return
        self.error = None
        self.observe(stats, time.monotonic())

    def observe(self, stats: StatsResult, at: float) -> None:
        self.latest = stats
        counts = tuple(int(getattr(stats, f)) for f in RATE_FIELDS)
        if self._samples and any(
            c < p for c, p in zip(counts, self._samples[-1].counts, strict=True)
        ):
            self._samples.clear()  # the daemon restarted: its counters began again
        self._samples.append(Sample(at, counts))

    def series(self, width: int = 240, height: int = 40) -> list[Series]:
        """Each counter's rates between successive samples, with a line scaled to width x height."""
        pairs = list(zip(self._samples, list(self._samples)[1:], strict=False))
        out = []
        for i, name in enumerate(RATE_FIELDS):
            rates = [
                max(0, b.counts[i] - a.counts[i]) / (b.at - a.at) if b.at > a.at else 0.0
                for a, b in pairs
            ]
            out.append(Series(name, rates, self._last_minute(i), _points(rates, width, height)))
        return out

    def _last_minute(self, i: int) -> float | None:
        if len(self._samples) < 2:
            return None
        last = self._samples[-1]
        first = next(s for s in self._samples if s.at >= last.at - 60.0 or s is last)
        if first is last:
            first = self._samples[-2]
        span = last.at - first.at
        return max(0, last.counts[i] - first.counts[i]) / span if span > 0 else None

    @property
    def window_s(self) -> float:
        return self.interval_s * max(0, len(self._samples) - 1)


def _points(rates: list[float], width: int, height: int) -> str:
    if not rates:
        return ""
    top = max(rates) or 1.0
    step = width / max(1, len(rates) - 1)
    return " ".join(
        f"{i * step:.1f},{height - 2 - (r / top) * (height - 4):.1f}" for i, r in enumerate(rates)
    )
