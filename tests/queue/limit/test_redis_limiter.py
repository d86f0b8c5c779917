"""The limiter's rules on a real redis-server through lua/limit.lua, timed by Redis's clock.

Redis's TIME cannot be moved by a test, so these read what the script stored and answered:
concurrent calls leave in one pipeline (run back to back within a millisecond), waits are
read from replies, and lapses are reached by waiting on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.protocol.limits import MAX_FAILURES, MAX_PAUSE_S, MAX_RAMP_S, MAX_RESET_S
from sidecar.queue.limit import Ask, Breaker, Reason, RedisLimiter, gcra
from sidecar.queue.redis.keys import RedisKeys
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)

S = "llm.openai.gpt-4o.0123456789abcdef"
KEY = RedisKeys.for_prefix("sidecar").limit(S)


@pytest.fixture(params=[True, False], ids=["functions", "scripts"])
async def limiter(request: pytest.FixtureRequest, make_queue: QueueFactory) -> RedisLimiter:
    return RedisLimiter(await make_queue(functions=request.param))


async def state(raw: Redis) -> dict[str, int]:
    held = await raw.hgetall(KEY)
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in held.items()}


async def redis_now_us(raw: Redis) -> int:
    seconds, micros = await raw.time()
    return int(seconds) * gcra.US + int(micros)


async def at_once(limiter: RedisLimiter, ask: Ask, n: int) -> list[gcra.Grant]:
    """n acquires made in one loop pass: they leave in one pipeline."""
    return list(await asyncio.gather(*(limiter.acquire(S, ask) for _ in range(n))))


async def test_a_burst_is_a_quarter_second_of_the_limit(limiter: RedisLimiter) -> None:
    answers = await at_once(limiter, Ask(rpm=2400, tpm=0), 20)  # 25 ms a request
    assert sum(a.granted for a in answers) == gcra.BURST_US // 25_000  # 10
    refused = answers[-1]
    assert refused.reason is Reason.REQUESTS
    assert 0 < refused.wait_s <= 0.025


async def test_a_second_request_waits_its_interval(limiter: RedisLimiter) -> None:
    first, second = await at_once(limiter, Ask(rpm=60, tpm=0), 2)
    assert first.granted and not second.granted
    assert second.reason is Reason.REQUESTS
    assert 0.99 < second.wait_s <= 1.0


async def test_acquire_is_all_or_nothing(limiter: RedisLimiter, raw: Redis) -> None:
    ask = Ask(rpm=6000, tpm=60, tokens=1)  # 10 ms of requests, 1 s of tokens
    assert (await limiter.acquire(S, ask)).granted
    before = await state(raw)
    refused = await limiter.acquire(S, ask)
    assert (refused.granted, refused.reason) == (False, Reason.TOKENS)
    assert 0.9 < refused.wait_s <= 1.0
    assert await state(raw) == before  # the requests limit was not charged


async def test_settle_moves_the_tokens_limit_by_its_rate(limiter: RedisLimiter, raw: Redis) -> None:
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=600, tokens=100))).granted  # 10 s
    reserved = (await state(raw))["t"]
    await limiter.settle(S, 600, -90)
    assert reserved - (await state(raw))["t"] == 9 * gcra.US
    await limiter.settle(S, 600, 30)
    assert (await state(raw))["t"] - reserved == -6 * gcra.US
    await limiter.settle(S, 600, -1_000_000)  # never below now
    now = await redis_now_us(raw)
    assert now - 100_000 < (await state(raw))["t"] <= now


async def test_pause_holds_the_scope_for_the_fleet(limiter: RedisLimiter, raw: Redis) -> None:
    until = await limiter.pause(S, 12.5)
    now = await redis_now_us(raw) / gcra.US
    assert 12.4 < until - now <= 12.5
    assert await limiter.pause(S, 1.0) == until  # the later pause wins
    refused = await limiter.acquire(S, Ask(rpm=0, tpm=0))
    assert refused.reason is Reason.PAUSED and 12.4 < refused.wait_s <= 12.5


async def test_fresh_traffic_holds_the_drain_to_its_share(
    limiter: RedisLimiter, raw: Redis
) -> None:
    # A live call was seen and is kept waiting (as a refused fresh acquire leaves the scope).
    now_us = await redis_now_us(raw)
    await raw.hset(KEY, mapping={"f": str(now_us), "w": str(now_us)})
    drain = Ask(rpm=60, tpm=0, drain_share=0.5)
    first, second = await at_once(limiter, drain, 2)
    assert first.granted
    # The whole limit would allow the next after 1 s; the drain's half only after 2 s.
    assert second.reason is Reason.DRAIN_SHARE and 1.9 < second.wait_s <= 2.0
    held = await state(raw)
    assert held["dr"] - held["r"] == gcra.US  # the drain's own TAT, at half the rate


async def test_without_fresh_traffic_the_drain_has_the_whole_limit(
    limiter: RedisLimiter, raw: Redis
) -> None:
    first, second = await at_once(limiter, Ask(rpm=60, tpm=0, drain_share=0.5), 2)
    assert first.granted and second.reason is Reason.REQUESTS and second.wait_s <= 1.0
    assert (await state(raw))["dr"] == 0


async def until_granted(limiter: RedisLimiter, ask: Ask, deadline_s: float = 10.0) -> gcra.Grant:
    """Ask until granted (as a worker would, waiting what it is told), within a deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        grant = await limiter.acquire(S, ask)
        if grant.granted:
            return grant
        assert time.monotonic() < deadline, f"not granted in {deadline_s} s: {grant}"
        await asyncio.sleep(grant.wait_s)


async def test_breaker_opens_then_one_probe_then_the_slow_start(
    limiter: RedisLimiter, raw: Redis
) -> None:
    states = [await limiter.report(S, ok=False, probe=False, failures=3, reset_s=0.3)
              for _ in range(3)]  # fmt: skip
    assert states == [Breaker.CLOSED, Breaker.CLOSED, Breaker.OPEN]
    ask = Ask(rpm=600, tpm=0, ramp_s=30.0)
    refused = await limiter.acquire(S, ask)
    assert refused.reason is Reason.BREAKER_OPEN and 0 < refused.wait_s <= 0.3
    probe = await until_granted(limiter, ask)
    assert probe.probe
    others = await at_once(limiter, ask, 10)
    assert {a.reason for a in others} == {Reason.PROBING}
    assert await limiter.report(S, ok=True, probe=True, failures=3, reset_s=0.3) == "closed"
    assert (await state(raw))["rs"] > 0
    # At the start of the ramp the limit is 10%: 60 a minute, one request a second (at the
    # full limit the burst would let the next go at once).
    await until_granted(limiter, ask)
    following = await limiter.acquire(S, ask)
    assert following.reason is Reason.REQUESTS and 0.9 < following.wait_s <= 1.0


async def test_a_failed_probe_reopens(limiter: RedisLimiter) -> None:
    await limiter.report(S, ok=False, probe=False, failures=1, reset_s=0.2)
    assert (await until_granted(limiter, Ask(rpm=0, tpm=0))).probe
    assert await limiter.report(S, ok=False, probe=True, failures=1, reset_s=0.2) == "open"
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).reason is Reason.BREAKER_OPEN


async def test_a_lapsed_probe_lease_lets_another_probe_go(
    limiter: RedisLimiter, raw: Redis
) -> None:
    await limiter.report(S, ok=False, probe=False, failures=1, reset_s=0.2)
    assert (await until_granted(limiter, Ask(rpm=0, tpm=0))).probe
    lease = (await state(raw))["h"] - await redis_now_us(raw)
    assert gcra.PROBE_LEASE_US - 1_000_000 < lease <= gcra.PROBE_LEASE_US
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).reason is Reason.PROBING
    # The probe's holder vanished: its lease ends (set in the past rather than waited 30 s).
    await raw.hset(KEY, "h", str(await redis_now_us(raw) - 1))
    assert (await limiter.acquire(S, Ask(rpm=0, tpm=0))).probe


async def test_a_scope_key_expires_by_itself_once_idle(limiter: RedisLimiter, raw: Redis) -> None:
    assert (await limiter.acquire(S, Ask(rpm=60, tpm=0))).granted
    # Kept while its TAT (1 s ahead) matters, plus IDLE_KEEP.
    keep_ms = (gcra.IDLE_KEEP_US + gcra.FRESH_WINDOW_US) // 1000
    assert keep_ms - 6000 < await raw.pttl(KEY) <= keep_ms
    await limiter.pause(S, 3600.0)
    assert (3600 + 300 - 1) * 1000 < await raw.pttl(KEY) <= (3600 + 300) * 1000


def test_the_lua_and_python_rules_share_their_constants() -> None:
    """lua/limit.lua repeats gcra.py's constants: a change to one must change the other."""
    lua = (Path(gcra.__file__).parents[1] / "redis" / "lua" / "limit.lua").read_text()
    found = {name: value for name, value in re.findall(r"^local L_(\w+) = (.+)$", lua, re.M)}

    def value(text: str) -> float:
        """A literal, or a product of literals and L_US, as the file writes them."""
        product = 1.0
        for factor in (f.strip() for f in text.split("*")):
            product *= gcra.US if factor == "L_US" else float(factor)
        return product

    assert value(found["BURST"]) == gcra.BURST_US
    assert value(found["FRESH_WINDOW"]) == gcra.FRESH_WINDOW_US
    assert value(found["FRESH_HEADROOM"]) == gcra.FRESH_HEADROOM_US
    assert value(found["PROBE_LEASE"]) == gcra.PROBE_LEASE_US
    assert value(found["PROBING_RECHECK"]) == gcra.PROBING_RECHECK_US
    assert value(found["RAMP_FLOOR"]) == gcra.RAMP_FLOOR
    assert value(found["MAX_AHEAD"]) == gcra.MAX_AHEAD_US
    assert value(found["IDLE_KEEP"]) == gcra.IDLE_KEEP_US
    assert value(found["BREAKER_KEEP"]) == gcra.BREAKER_KEEP_US
    assert value(found["MAX_RAMP"]) == MAX_RAMP_S * gcra.US
    assert f"a.pause > {int(MAX_PAUSE_S)}" in lua and f"a.reset > {int(MAX_RESET_S)}" in lua
    assert f"'failures', 1, {MAX_FAILURES})" in lua


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("acquire", 60, 0, 1, 0, 0, "0", 0), "ARGV[9] (drain_share) is 0"),
        (("acquire", 60, 0, -1, 0, 0, "0.5", 0), "ARGV[4] (acquire arguments)"),
        (("pause", "86401"), "ARGV[4] (pause_s) is 86401"),
        (("report", 1, 0, 0, "30"), "ARGV[6] (failures) is 0"),
        (("sleep",), "ARGV[3] (op) is sleep"),
    ],
)
async def test_the_script_refuses_bad_arguments_before_any_write(
    make_queue: QueueFactory, raw: Redis, args: tuple[str | int, ...], says: str
) -> None:
    """The wire types bound every argument; the script checks them again, before writing."""
    queue = await make_queue()
    with pytest.raises(ResponseError, match=re.escape(says)):
        await queue.run_script("limit", *args, keys=(KEY,))
    assert not await raw.exists(KEY)
