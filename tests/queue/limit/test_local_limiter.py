"""The limiter's rules on the local limiter, with a clock the test moves: rates, burst, the
all-or-nothing rule, settles, pauses, the drain's share, the breaker's one probe and the slow
start, the probe's lease, the bound on scopes. Counts and waits, never wall time."""

from __future__ import annotations

import pytest

from sidecar.queue.limit import Ask, Breaker, LocalLimiter, Reason, gcra
from tests.support.helpers import FakeClock

S = "llm.openai.gpt-4o.0123456789abcdef"


@pytest.fixture
def limiter(clock: FakeClock) -> LocalLimiter:
    return LocalLimiter(clock=clock)


async def grants_over(
    limiter: LimiterLike, clock: FakeClock, ask: Ask, seconds: float, step: float = 0.01
) -> int:
    """How many asks, one every `step`, are granted over `seconds` of the fake clock."""
    granted = 0
    for _ in range(round(seconds / step)):
        granted += (await limiter.acquire(S, ask)).granted
        clock.advance(step)
    return granted


LimiterLike = LocalLimiter


async def test_a_limit_grants_its_rate_over_a_minute(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    granted = await grants_over(limiter, clock, Ask(rpm=600, tpm=0), 60.0)
    # 600 a minute, plus the burst of BURST_US (2 requests at 0.1 s apiece) at the start.
    assert 600 <= granted <= 603


async def test_a_burst_is_a_quarter_second_of_the_limit(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    ask = Ask(rpm=6000, tpm=0)  # 10 ms a request
    results = [await limiter.acquire(S, ask) for _ in range(40)]
    assert sum(g.granted for g in results) == gcra.BURST_US // 10_000
    refused = results[-1]
    assert refused.reason is Reason.REQUESTS
    assert refused.wait_s == pytest.approx(0.01)


async def test_a_cost_above_the_burst_waits_for_an_empty_bucket_not_forever(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    ask = Ask(rpm=0, tpm=600, tokens=1200)  # 120 s of the limit in one request
    assert (await limiter.acquire(S, ask)).granted
    second = await limiter.acquire(S, ask)
    assert not second.granted and second.reason is Reason.TOKENS
    assert second.wait_s == pytest.approx(120.0)
    clock.advance(second.wait_s)
    assert (await limiter.acquire(S, ask)).granted


async def test_acquire_is_all_or_nothing(limiter: LocalLimiter, clock: FakeClock) -> None:
    both = Ask(rpm=60, tpm=600, tokens=100)  # 1 s of requests, 10 s of tokens
    assert (await limiter.acquire(S, both)).granted
    clock.advance(1.0)
    refused = await limiter.acquire(S, both)
    assert (refused.granted, refused.reason) == (False, Reason.TOKENS)
    assert refused.wait_s == pytest.approx(9.0)
    # The requests limit was not charged by the refused call: a request alone goes now.
    assert (await limiter.acquire(S, Ask(rpm=60, tpm=0))).granted


async def test_settle_refunds_and_charges_tokens(limiter: LocalLimiter, clock: FakeClock) -> None:
    ask = Ask(rpm=0, tpm=600, tokens=100)  # reserves 10 s
    assert (await limiter.acquire(S, ask)).granted
    await limiter.settle(S, 600, -90)  # it used 10: 9 s back
    wait = (await limiter.acquire(S, Ask(rpm=0, tpm=600, tokens=10))).wait_s
    assert wait == pytest.approx(1.0)
    await limiter.settle(S, 600, -10_000)  # never below now
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=600, tokens=10))).granted
    await limiter.settle(S, 600, 50)  # used more than reserved: 5 s more
    assert (await limiter.acquire(S, ask)).wait_s == pytest.approx(6.0)


async def test_pause_holds_the_scope_and_the_later_pause_wins(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    until = await limiter.pause(S, 12.5)
    assert until == pytest.approx(clock() + 12.5)
    assert await limiter.pause(S, 3.0) == pytest.approx(until)  # a shorter one changes nothing
    refused = await limiter.acquire(S, Ask(rpm=0, tpm=0, fresh=True))
    assert (refused.granted, refused.reason) == (False, Reason.PAUSED)
    assert refused.wait_s == pytest.approx(12.5)
    clock.advance(12.5)
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).granted


async def test_the_drain_gets_its_share_while_fresh_traffic_flows(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    drain, fresh = Ask(rpm=60, tpm=0, drain_share=0.5), Ask(rpm=60, tpm=0, fresh=True)
    got = {"drain": 0, "fresh": 0}
    for _ in range(6000):  # a minute, both asking every 10 ms, the backlog first
        got["drain"] += (await limiter.acquire(S, drain)).granted
        got["fresh"] += (await limiter.acquire(S, fresh)).granted
        clock.advance(0.01)
    assert 29 <= got["drain"] <= 31  # half of 60
    assert got["fresh"] + got["drain"] <= 61  # the limit holds for both together
    assert got["fresh"] >= 29  # the live service is not starved by its backlog


async def test_without_fresh_traffic_the_drain_gets_the_whole_limit(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    assert (await limiter.acquire(S, Ask(rpm=60, tpm=0, fresh=True))).granted
    clock.advance(gcra.FRESH_WINDOW_US / gcra.US)  # the fresh traffic stopped that long ago
    drain = Ask(rpm=60, tpm=0, drain_share=0.5)
    assert 59 <= await grants_over(limiter, clock, drain, 60.0) <= 61


async def test_a_refused_drain_says_drain_share(limiter: LocalLimiter, clock: FakeClock) -> None:
    drain = Ask(rpm=60, tpm=0, drain_share=0.5)
    assert (await limiter.acquire(S, drain)).granted
    kept_waiting = await limiter.acquire(S, Ask(rpm=60, tpm=0, fresh=True))
    assert kept_waiting.reason is Reason.REQUESTS  # live traffic now waits: the drain is held
    clock.advance(1.0)
    assert (await limiter.acquire(S, drain)).granted  # charged to its half as well
    clock.advance(1.0)  # the whole limit allows the next, the drain's half does not
    refused = await limiter.acquire(S, drain)
    assert refused.reason is Reason.DRAIN_SHARE
    assert refused.wait_s == pytest.approx(1.0)


async def test_light_fresh_traffic_goes_first_and_the_drain_takes_the_rest(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    """Work-conserving: one live call every 2 s beside a drain asking every 10 ms. Once live
    traffic has been seen, each live call is granted on its first ask (the drain leaves it
    room), and the drain is not held to its share: it gets the rest of the limit, not half."""
    drain, fresh = Ask(rpm=600, tpm=0, drain_share=0.5), Ask(rpm=600, tpm=0, fresh=True)
    drained, live, first_asks, waiting = 0, 0, [], False
    for step in range(6000):  # a minute
        drained += (await limiter.acquire(S, drain)).granted
        if step % 200 == 100:
            first = (await limiter.acquire(S, fresh)).granted
            first_asks.append(first)
            live, waiting = live + first, not first
        elif waiting and (await limiter.acquire(S, fresh)).granted:  # asks again, as a gateway
            live, waiting = live + 1, False
        clock.advance(0.01)
    assert live == 30 and first_asks[1:] == [True] * 29
    assert 565 <= drained <= 572  # 600 a minute, less the 30 live calls (half would be 300)


async def test_a_fresh_grant_ends_the_drain_s_hold(limiter: LocalLimiter, clock: FakeClock) -> None:
    drain, fresh = Ask(rpm=60, tpm=0, drain_share=0.5), Ask(rpm=60, tpm=0, fresh=True)
    assert (await limiter.acquire(S, drain)).granted
    assert not (await limiter.acquire(S, fresh)).granted  # kept waiting: the drain is held
    clock.advance(1.0)
    assert (await limiter.acquire(S, fresh)).granted  # no live call waits any more
    clock.advance(1.13)  # one interval, plus the room the drain leaves a live call
    assert (await limiter.acquire(S, drain)).granted  # not held: its half would say 2 s
    assert limiter._scopes[S][0].dr == 0  # the drain's own TAT was never charged


async def test_breaker_opens_sends_one_probe_then_ramps(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    states = [await limiter.report(S, ok=False, probe=False, failures=3, reset_s=30.0)
              for _ in range(3)]  # fmt: skip
    assert states == [Breaker.CLOSED, Breaker.CLOSED, Breaker.OPEN]
    ask = Ask(rpm=600, tpm=0, ramp_s=30.0)
    refused = await limiter.acquire(S, ask)
    assert refused.reason is Reason.BREAKER_OPEN
    assert refused.wait_s == pytest.approx(30.0)
    clock.advance(30.0)
    answers = [await limiter.acquire(S, ask) for _ in range(20)]
    assert [a.probe for a in answers].count(True) == 1 and answers[0].probe
    assert {a.reason for a in answers[1:]} == {Reason.PROBING}
    assert all(0 < a.wait_s <= 1.0 for a in answers[1:])
    closed = await limiter.report(S, ok=True, probe=True, failures=3, reset_s=30.0)
    assert closed is Breaker.CLOSED
    # The slow start: from 10% to 100% over 30 s, so about (0.1 + 0.55) / 2 ... of 300.
    during = await grants_over(limiter, clock, ask, 30.0)
    after = await grants_over(limiter, clock, ask, 30.0)
    ideal = 600 / 60 * 30 * (gcra.RAMP_FLOOR + (1 - gcra.RAMP_FLOOR) / 2)  # 165
    assert ideal - 5 <= during <= ideal + 5
    assert 299 <= after <= 302


async def test_a_failed_probe_opens_the_breaker_again(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    await limiter.report(S, ok=False, probe=False, failures=1, reset_s=5.0)
    clock.advance(5.0)
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).probe
    state = await limiter.report(S, ok=False, probe=True, failures=1, reset_s=5.0)
    assert state is Breaker.OPEN
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).reason is Reason.BREAKER_OPEN


async def test_an_ok_resets_the_failures_in_a_row(limiter: LocalLimiter, clock: FakeClock) -> None:
    for ok in (False, False, True, False, False):
        assert await limiter.report(S, ok=ok, probe=False, failures=3, reset_s=5.0) == "closed"
    assert await limiter.report(S, ok=False, probe=False, failures=3, reset_s=5.0) == "open"


async def test_a_lapsed_probe_lease_lets_another_probe_go(
    limiter: LocalLimiter, clock: FakeClock
) -> None:
    await limiter.report(S, ok=False, probe=False, failures=1, reset_s=1.0)
    clock.advance(1.0)
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).probe
    clock.advance(gcra.PROBE_LEASE_US / gcra.US - 0.001)
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).reason is Reason.PROBING
    clock.advance(0.001)
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).probe


async def test_the_local_share_scales_every_limit(clock: FakeClock) -> None:
    half = LocalLimiter(share=0.5, clock=clock)
    assert 299 <= await grants_over(half, clock, Ask(rpm=600, tpm=0), 60.0) <= 302


async def test_scopes_held_are_bounded(clock: FakeClock) -> None:
    limiter = LocalLimiter(clock=clock, max_scopes=3)
    for name in ("a", "b", "c"):
        await limiter.pause(name, 100.0)
    await limiter.acquire("a", Ask(rpm=0, tpm=0))  # a is used again: b is now the oldest
    await limiter.pause("d", 100.0)
    assert limiter.scopes == 3
    assert (await limiter.acquire("a", Ask(rpm=0, tpm=0))).reason is Reason.PAUSED
    assert (await limiter.acquire("b", Ask(rpm=0, tpm=0))).granted  # dropped: starts empty


async def test_the_default_bound_holds_ten_thousand_scopes(clock: FakeClock) -> None:
    limiter = LocalLimiter(clock=clock)
    for i in range(10_050):
        await limiter.acquire(f"s{i}", Ask(rpm=60, tpm=0))
    assert limiter.scopes == 10_000


async def test_an_idle_scope_starts_again_empty(limiter: LocalLimiter, clock: FakeClock) -> None:
    await limiter.report(S, ok=False, probe=False, failures=2, reset_s=5.0)
    clock.advance(gcra.IDLE_KEEP_US / gcra.US + gcra.FRESH_WINDOW_US / gcra.US)
    # The failure in a row is forgotten with the idle scope: one more does not open it.
    assert await limiter.report(S, ok=False, probe=False, failures=2, reset_s=5.0) == "closed"


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, float("nan")])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share must be in"):
        LocalLimiter(share=share)
