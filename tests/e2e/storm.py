"""The pacing scenario, run by tests/e2e/test_pacing.py (a bounded slice) and bench/storm.py.

A backlog of `requests` queued requests, two daemons on one Redis with two `sidecar work` on
each (concurrency 8), drained into a fake provider that enforces `rpm` requests and `tpm`
tokens per `provider_window_s` (scaled from per minute) and answers 429 with `Retry-After`
past them. With `limiter=True` the fleet is told the same limits (LLM_PROVIDER_RPM/TPM);
with `limiter=False` they are 0 and the drain goes as fast as the workers can: the storm.
With `fresh_rate` > 0 a gateway serves fresh calls at that rate during the drain (and, for
bench/storm.py, before it: the idle baseline), and their latencies and answers are kept.

Each request is 100 tokens by the fake's count (20 prompt + 80 completion, max_tokens 80), so
`tpm = 100 * rpm` makes both limits bind together, as the issue's 600 rpm / 60,000 tpm do.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.e2e.harness import MAX_TOKENS, Fleet, chat_body, provider_calls_by_tag, wait_until
from tests.support.fake_provider import (
    Call,
    FakeProvider,
    per_second,
    share,
    token_weight,
    window_max,
)

TOKENS_PER_REQUEST = 20 + MAX_TOKENS  # the fake's count of one chat_body request
# Fresh calls in flight at once at most (each may wait for the limiter up to its max wait).
FRESH_SENDERS = 16


@dataclass(frozen=True)
class Storm:
    """One run's shape; the defaults are the issue's full size."""

    requests: int = 2000
    rpm: int = 600
    tpm: int = 60_000
    daemons: int = 2
    workers_per_daemon: int = 2
    concurrency: int = 8
    limiter: bool = True
    provider_window_s: float = 60.0  # the fake's "minute"
    check_window_s: float = 10.0  # the windows the run is judged on
    fresh_rate: float = 0.0  # fresh gateway calls per second during the drain (0: no gateway)
    idle_fresh: int = 0  # fresh calls timed before the backlog arrives (the idle baseline)
    drain_share: float = 0.5
    timeout_s: float = 900.0

    @property
    def ideal_s(self) -> float:
        """The drain's ideal time: the backlog's work over the limit (the tighter of the two)."""
        by_requests = self.requests / (self.rpm / 60)
        by_tokens = self.requests * TOKENS_PER_REQUEST / (self.tpm / 60) if self.tpm else 0.0
        return max(by_requests, by_tokens)

    def window_limits(self) -> tuple[float, float]:
        """The provider's limits over one check window: requests, tokens."""
        scale = self.check_window_s / 60
        return self.rpm * scale, self.tpm * scale


@dataclass
class FreshCall:
    at: float
    latency_s: float
    status: int


@dataclass
class StormResult:
    storm: Storm
    calls: list[Call]  # everything the fake provider saw
    start: float  # monotonic: the backlog's enqueue began
    end: float  # the backlog's last result
    acknowledged: list[str]
    statuses: dict[str, int]
    fresh: list[FreshCall] = field(default_factory=list)
    idle: list[FreshCall] = field(default_factory=list)

    @property
    def drain_s(self) -> float:
        return self.end - self.start

    @property
    def work_calls(self) -> list[Call]:
        return [c for c in self.calls if c.ok]

    def ideal_s(self) -> float:
        """Work over limit, counting every call the provider answered (fresh ones too)."""
        s = self.storm
        n = len(self.work_calls)
        tokens = sum(c.tokens for c in self.work_calls)
        return max(n / (s.rpm / 60), tokens / (s.tpm / 60) if s.tpm else 0.0)

    def window_max(self) -> tuple[int, int]:
        """The most calls and tokens the provider answered within any check window."""
        w = self.storm.check_window_s
        return window_max(self.calls, w)[0], window_max(self.calls, w, token_weight)[0]

    def excess(self) -> tuple[float, float]:
        """How far the busiest window went past the provider's limit (0.03 = 3 % over)."""
        calls, tokens = self.window_max()
        limit_calls, limit_tokens = self.storm.window_limits()
        return calls / limit_calls - 1, (tokens / limit_tokens - 1) if limit_tokens else 0.0

    def share_429(self) -> float:
        return share(self.calls, 429)

    def per_second(self) -> list[int]:
        return per_second(self.calls, self.start, self.end + 1, ok_only=False)

    def fresh_share_ok(self) -> float:
        """The share of the fresh calls during the drain that were answered fresh (200)."""
        return share_of(self.fresh, 200)

    def p50(self, which: list[FreshCall]) -> float | None:
        ok = [f.latency_s for f in which if f.status == 200]
        return statistics.median(ok) if ok else None


def share_of(calls: list[FreshCall], status: int) -> float:
    return sum(f.status == status for f in calls) / len(calls) if calls else 0.0


def fleet_settings(storm: Storm) -> dict[str, str]:
    return {
        "LLM_PROVIDER_RPM": str(storm.rpm if storm.limiter else 0),
        "LLM_PROVIDER_TPM": str(storm.tpm if storm.limiter else 0),
        "LLM_DRAIN_SHARE": str(storm.drain_share),
        "LLM_RAMP_SECONDS": "0",
        # A 429 storm must show as 429s, not as the breaker hiding it behind its pauses.
        "LLM_BREAKER_FAILURES": "1000",
    }


def run_storm(
    storm: Storm, tmp: Path, progress: Callable[[str], None] = lambda _: None
) -> StormResult:
    """Run one storm on real processes under `tmp`; every process is stopped on the way out."""
    scale = storm.provider_window_s / 60
    provider = FakeProvider(rpm=round(storm.rpm * scale), tpm=round(storm.tpm * scale),
                            window_s=storm.provider_window_s,
                            completion_tokens=MAX_TOKENS).start()  # fmt: skip
    try:
        with Fleet(tmp, daemons=storm.daemons, workers_per_daemon=storm.workers_per_daemon,
                   concurrency=storm.concurrency, llm=fleet_settings(storm)) as fleet:  # fmt: skip
            fleet.start(provider)
            progress(f"fleet up: {storm.daemons} daemons, {len(fleet.workers)} workers")
            gateway = fleet.start_gateway() if storm.fresh_rate or storm.idle_fresh else None
            rate = storm.fresh_rate or 1.0
            idle = _fresh_calls(gateway, rate, count=storm.idle_fresh) if gateway else []
            provider.mark("drain")
            stop = threading.Event()
            fresh: list[FreshCall] = []
            sender = None
            start = time.monotonic()
            ids = fleet.enqueue(storm.requests, prefix="storm")
            progress(f"{len(ids)} queued in {time.monotonic() - start:.1f} s")
            if gateway and storm.fresh_rate:
                sender = threading.Thread(
                    target=lambda: fresh.extend(_fresh_calls(gateway, rate, stop=stop)),
                    daemon=True,
                )
                sender.start()
            wanted = set(ids)

            def drained() -> bool:
                return wanted <= set(provider_calls_by_tag(provider))

            try:
                wait_until(drained, storm.timeout_s, "the backlog drained", interval_s=0.5)
            finally:
                stop.set()
                if sender is not None:
                    sender.join(30)
            end = max(c.done for c in provider.snapshot() if c.ok and c.tag.startswith("storm"))
            progress(f"drained in {end - start:.1f} s")
            # Completed once its result is kept: the settle follows the call by a moment.
            wait_until(lambda: fleet.count_status(ids).get("completed") == len(ids), 60,
                       "every request completed", interval_s=1.0)  # fmt: skip
            statuses = fleet.count_status(ids)
    finally:
        provider.stop()
    return StormResult(storm, provider.snapshot(), start, end, ids, statuses, fresh, idle)


def _fresh_calls(
    base_url: str, rate: float, *, count: int | None = None, stop: threading.Event | None = None
) -> list[FreshCall]:
    """Fresh chat calls through the gateway, one every 1/rate seconds, each sent on time
    whatever the earlier ones wait (a pool of senders), until `count` were sent or `stop` is
    set; each one's start, latency and answer. The idle baseline uses the same rate as the
    calls during the drain: back to back, calls would wait for the limiter's own spacing."""
    out: list[FreshCall] = []
    lock = threading.Lock()

    def one(http: httpx.Client, n: int) -> None:
        t = time.monotonic()
        resp = http.post("/v1/chat/completions", json=chat_body(f"fresh-{n:05d}"))
        with lock:
            out.append(FreshCall(t, time.monotonic() - t, resp.status_code))

    halt = stop or threading.Event()
    limits = httpx.Limits(max_connections=FRESH_SENDERS)
    with (
        httpx.Client(base_url=base_url, timeout=30, limits=limits) as http,
        ThreadPoolExecutor(FRESH_SENDERS) as pool,
    ):
        started, n = time.monotonic(), 0
        while (count is None or n < count) and not halt.wait(
            max(0.0, started + n / rate - time.monotonic())
        ):
            pool.submit(one, http, n)
            n += 1
    return sorted(out, key=lambda f: f.at)
