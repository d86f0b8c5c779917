"""Pacing across hosts, the slow start with its one probe, and fresh traffic first.

Two daemons on one redis-server, `sidecar work` processes on each, a fake provider that
enforces its limits with 429 + Retry-After (tests/support/fake_provider.py): every number
asserted here is counted at the provider, the only place that sees the whole fleet's calls.

The issue's full size (2,000 requests at 600 rpm / 60,000 tpm, about 200 s of drain) is the
`campaign` test (`pytest -m campaign tests/e2e/test_pacing.py`) and `python -m bench.storm`,
which also runs it with the limiter off. The suite runs a slice: the limits scaled up (1200
rpm, so a 10-second window holds 200 calls) and the count down (500: 25 s of drain, two whole
10-second windows and every sliding one between), the fake enforcing per 20 s (a third of its
limits) what it would per minute: a provider's minute scaled to the run, so its limit bites
within it. Measured: one 429 in 501 calls, the busiest 10 s 2.5% over the limit (the
limiter's quarter-second burst), the drain 1.03x the ideal.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet, provider_calls_by_tag, wait_until
from tests.e2e.storm import Storm, StormResult, run_storm
from tests.support.fake_provider import FakeProvider, overlapping

pytestmark = [pytest.mark.slow]

SLICE = Storm(requests=500, rpm=1200, tpm=120_000, provider_window_s=20.0, timeout_s=120)
FULL = Storm()


def check_pacing(result: StormResult) -> None:
    """The issue's three numbers, each with what it was measured on in the message."""
    s = result.storm
    calls, tokens = result.window_max()
    limit_calls, limit_tokens = s.window_limits()
    over_calls, over_tokens = result.excess()
    where = (
        f"(busiest {s.check_window_s:g} s window: {calls} calls / {limit_calls:g}, "
        f"{tokens} tokens / {limit_tokens:g}; per second {result.per_second()})"
    )
    assert result.statuses == {"completed": s.requests}, result.statuses  # lost 0
    assert over_calls <= 0.05, f"requests {over_calls:.1%} over the limit {where}"
    assert over_tokens <= 0.05, f"tokens {over_tokens:.1%} over the limit {where}"
    n429 = sum(c.status == 429 for c in result.calls)
    assert result.share_429() <= 0.01, f"{n429} 429s of {len(result.calls)} calls {where}"
    ratio = result.drain_s / result.ideal_s()
    assert ratio <= 1.25, f"drained in {result.drain_s:.1f} s, {ratio:.2f}x the ideal {where}"


@pytest.mark.timeout(150)
def test_two_hosts_drain_a_backlog_at_the_providers_pace(tmp: Path) -> None:
    result = run_storm(SLICE, tmp)
    assert len(result.acknowledged) == SLICE.requests
    check_pacing(result)
    # Each request was paid for once: nothing drained twice.
    counts = provider_calls_by_tag_of(result)
    assert set(counts) == set(result.acknowledged) and set(counts.values()) == {1}


@pytest.mark.campaign
@pytest.mark.timeout(900)
def test_the_issues_full_size_storm(tmp: Path) -> None:
    """2,000 requests, 600 rpm / 60,000 tpm per minute, two hosts x two workers x 8."""
    check_pacing(run_storm(FULL, tmp))


def provider_calls_by_tag_of(result: StormResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in result.calls:
        if c.ok and c.tag.startswith("storm"):
            tag = c.tag.split(" ", 1)[0]
            counts[tag] = counts.get(tag, 0) + 1
    return counts


# -- fresh traffic first ---------------------------------------------------------------------------

FRESH = Storm(requests=200, rpm=1200, tpm=120_000, provider_window_s=10.0, fresh_rate=5.0,
              daemons=2, workers_per_daemon=1, timeout_s=120)  # fmt: skip


@pytest.mark.timeout(150)
def test_fresh_calls_keep_their_share_during_a_drain_at_the_limit(tmp: Path) -> None:
    """The backlog drains at the limit; fresh gateway calls at a quarter of it still go
    fresh (200): the drain leaves them room and takes the rest of the budget, so the backlog
    still drains near the ideal for all the work the provider did (work-conserving)."""
    result = run_storm(FRESH, tmp)
    assert result.statuses == {"completed": FRESH.requests}
    during = [f for f in result.fresh if f.at < result.end]
    assert len(during) >= 20, f"too few fresh calls during the drain: {len(during)}"
    ok = sum(f.status == 200 for f in during)
    assert ok / len(during) >= 0.95, (
        f"{ok} of {len(during)} fresh calls answered fresh; the rest: "
        f"{sorted({f.status for f in during})}"
    )
    # Fresh and drain together within the limit (plus the limiter's burst) ...
    assert result.excess()[0] <= 0.05
    # ... and the drain not held to its share while the fresh calls found room: every call
    # the provider answered until the backlog's last, at the limit, is the ideal.
    work = [c for c in result.calls if c.ok and c.at <= result.end]
    ideal_s = len(work) / (FRESH.rpm / 60)
    assert result.drain_s <= 1.25 * ideal_s, (result.drain_s, ideal_s)


# -- the slow start and its one probe -------------------------------------------------------------

RAMP_RPM = 1200  # 20 calls a second at full rate
RAMP_S = 10.0
RAMP_FLOOR = 0.1  # the share of the limit the slow start begins at (protocol.md, limit ops)
BURST_S = 0.25  # how far ahead of its slot the limiter lets a call go
RESET_S = 1.0


def expected_calls(t: float) -> float:
    """Calls admitted t seconds after the probe closed the breaker, at the ramp's rate
    (RAMP_FLOOR of the limit growing linearly to all of it over RAMP_S, then the limit)."""
    rate = RAMP_RPM / 60
    if t <= RAMP_S:
        return rate * (RAMP_FLOOR * t + (1 - RAMP_FLOOR) * t * t / (2 * RAMP_S))
    return rate * (RAMP_FLOOR * RAMP_S + (1 - RAMP_FLOOR) * RAMP_S / 2) + rate * (t - RAMP_S)


@pytest.mark.timeout(150)
def test_after_an_outage_one_probe_then_the_rate_ramps_up(tmp: Path) -> None:
    provider = FakeProvider(completion_tokens=20)
    provider.fail_with(503)
    provider.mark("outage")
    settings = {
        "LLM_PROVIDER_RPM": str(RAMP_RPM),
        "LLM_RAMP_SECONDS": str(RAMP_S),
        "LLM_BREAKER_FAILURES": "3",
        "LLM_BREAKER_RESET_SECONDS": str(RESET_S),
    }
    with Fleet(tmp, daemons=2, workers_per_daemon=1, concurrency=8, llm=settings) as fleet:
        fleet.start(provider)
        ids = fleet.enqueue(300, prefix="ramp")
        # The outage: the breaker opens fleet-wide, then one probe per reset period, each
        # answered 503. Wait for four probes past the first second.
        assert provider.wait_until(lambda calls: len(calls) >= 3, 30), "no call reached the fake"
        outage_start = provider.snapshot()[0].at
        assert provider.wait_until(
            lambda calls: sum(c.at > outage_start + 1.5 for c in calls) >= 4, 30
        ), f"no probes during the outage: {len(provider.snapshot())} calls"
        up = provider.mark("up")
        provider.come_up()
        wanted = set(ids)
        wait_until(lambda: wanted <= set(provider_calls_by_tag(provider)), 90,
                   "the backlog drained after the outage", interval_s=0.5)  # fmt: skip
        wait_until(lambda: fleet.count_status(ids).get("completed") == len(ids), 60,
                   "every request completed", interval_s=1.0)  # fmt: skip
    provider.stop()
    calls = provider.snapshot()
    outage = [c for c in calls if c.phase == "outage"]
    # While open, no call; while half-open, exactly one call for the whole fleet: past the
    # first calls (those granted before the breaker opened), one at a time, a reset apart.
    probes = [c for c in outage if c.at > outage[0].at + 1.5]
    assert len(probes) >= 4 and all(c.status == 503 for c in probes)
    assert overlapping(probes) == 1, [round(c.at - outage[0].at, 2) for c in probes]
    gaps = [b.at - a.at for a, b in itertools.pairwise(probes)]
    assert min(gaps) >= 0.8 * RESET_S, f"two probes {min(gaps):.2f} s apart"
    # The provider back: the first call is the probe, alone until it has answered.
    after = sorted((c for c in calls if c.phase == "up"), key=lambda c: c.at)
    probe = after[0]
    assert probe.ok and probe.at - up < RESET_S + 1
    assert after[1].at >= probe.done, "a second call went while the probe was out"
    # Then the ramp: the cumulative count follows the ramp's integral, second by second.
    ok = [c.at - probe.done for c in after[1:] if c.ok]
    full = RAMP_RPM / 60
    # A call may go up to BURST_S ahead of its slot (burst * rate calls), the count at a
    # second's edge may be one call off, and one more absorbs a worker's re-ask landing late on
    # a loaded machine. (Measured: within 1 of the integral at every second.)
    tolerance = math.ceil(BURST_S * full) + 2
    rows = []
    for second in range(1, int(RAMP_S) + 3):
        seen = sum(t < second for t in ok)
        want = expected_calls(second)
        rows.append((second, seen, round(want, 1)))
    bad = [r for r in rows if abs(r[1] - r[2]) > tolerance]
    assert not bad, f"off the ramp by more than {tolerance} (second, seen, expected): {rows}"
    # Not a jump: the first second after the probe well under the full rate.
    assert sum(t < 1 for t in ok) <= RAMP_FLOOR * full + tolerance
