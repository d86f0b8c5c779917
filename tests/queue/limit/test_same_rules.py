"""lua/limit.lua and gcra.py are one set of rules, checked call by call on a real redis-server.

Redis's clock cannot be stopped, so each call is bracketed: the scope's state and Redis's TIME
are read before it, TIME and the state again after it. The Python rules, run from the same
state at both ends of that bracket, must answer as Redis did at one end or the other, and
leave each field of the state between what they leave at the two ends. Random sequences
(limits, costs, fresh and drain calls, settles, pauses, failures and probes, with time passing)
walk through every rule: rates, burst, drain share, pause, breaker, probe and slow start.
"""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.queue.limit import Ask, Breaker, Grant, RedisLimiter, gcra
from sidecar.queue.redis.keys import RedisKeys
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)

# Real time passes between calls (the sleeps below let it; no result depends on their length):
# left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

FIELDS = ("r", "t", "dr", "dt", "f", "w", "p", "n", "o", "h", "rs")
RESET_S = 0.3  # the breaker's open period: short, so probes and the ramp come round
RAMP_S = 1.0


async def read_state(raw: Redis, key: str) -> gcra.ScopeState:
    held = await raw.hgetall(key)
    values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in held.items()}
    return gcra.ScopeState(**{f: values.get(f, 0) for f in FIELDS})


async def redis_time(raw: Redis) -> int:
    seconds, micros = await raw.time()
    return int(seconds) * gcra.US + int(micros)


def python_call(state: gcra.ScopeState, now: int, kind: str, a: dict[str, Any]) -> Any:
    if kind == "acquire":
        return gcra.acquire(state, now, a["ask"])
    if kind == "settle":
        gcra.settle(state, now, a["tpm"], a["delta"])
        return None
    if kind == "pause":
        return gcra.pause(state, now, a["pause_s"]) / gcra.US
    return gcra.report(state, now, ok=a["ok"], probe=a["probe"], failures=3, reset_s=RESET_S)


async def redis_call(limiter: RedisLimiter, scope: str, kind: str, a: dict[str, Any]) -> Any:
    if kind == "acquire":
        return await limiter.acquire(scope, a["ask"])
    if kind == "settle":
        return await limiter.settle(scope, a["tpm"], a["delta"])
    if kind == "pause":
        return await limiter.pause(scope, a["pause_s"])
    return await limiter.report(scope, ok=a["ok"], probe=a["probe"], failures=3, reset_s=RESET_S)


def next_call(rng: random.Random, rpm: int, tpm: int, share: float, probe: bool) -> Any:
    kind = rng.choices(["acquire", "settle", "pause", "report"], [70, 10, 3, 17])[0]
    if kind == "acquire":
        ask = Ask(
            rpm=rpm, tpm=tpm, requests=rng.choice([0, 1, 1, 1, 3]),
            tokens=rng.choice([0, 10, 100, 300]), fresh=rng.random() < 0.3, drain_share=share,
            ramp_s=RAMP_S,
        )  # fmt: skip
        return kind, {"ask": ask}
    if kind == "settle":
        return kind, {"tpm": tpm, "delta": rng.randint(-200, 200)}
    if kind == "pause":
        return kind, {"pause_s": rng.choice([0.0, 0.05, 0.2])}
    return kind, {"ok": rng.random() < 0.5, "probe": probe}


def decision(grant: Any) -> tuple[bool, bool, str]:
    return (grant.granted, grant.probe, grant.reason.value)


def check(kind: str, have: Any, at_t0: Any, at_t1: Any, where: str) -> None:
    if isinstance(have, Grant):
        assert isinstance(at_t0, Grant) and isinstance(at_t1, Grant)
        assert decision(have) in {decision(at_t0), decision(at_t1)}, (
            f"{where}: {have} not {at_t0} or {at_t1}"
        )
        if not have.granted and at_t0.reason == at_t1.reason == have.reason:
            assert at_t1.wait_s - 1e-6 <= have.wait_s <= at_t0.wait_s + 1e-6, where
    elif kind == "pause":
        assert min(at_t0, at_t1) - 1e-6 <= have <= max(at_t0, at_t1) + 1e-6, where
    elif isinstance(have, str):
        assert Breaker(have) in (at_t0, at_t1), where
    else:
        assert have is None and at_t0 is None, where


@pytest.mark.parametrize("seed", range(3))
async def test_redis_and_python_answer_alike(
    make_queue: QueueFactory, raw: Redis, seed: int
) -> None:
    limiter = RedisLimiter(await make_queue())
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    for run in range(3):
        scope = f"same-{seed}-{run}"
        key = RedisKeys.for_prefix("sidecar").limit(scope)
        rpm, tpm = rng.choice([(600, 0), (0, 6000), (600, 6000), (1200, 60000)])
        share = rng.choice([0.5, 1.0])
        probe = False
        for i in range(120):
            kind, a = next_call(rng, rpm, tpm, share, probe)
            before = await read_state(raw, key)
            t0 = await redis_time(raw)
            have = await redis_call(limiter, scope, kind, a)
            t1 = await redis_time(raw)
            after = await read_state(raw, key)
            s0, s1 = copy.copy(before), copy.copy(before)
            at_t0, at_t1 = python_call(s0, t0, kind, a), python_call(s1, t1, kind, a)
            where = f"seed {seed} run {run} call {i} {kind} {a}"
            check(kind, have, at_t0, at_t1, where)
            if not isinstance(at_t0, Grant) or decision(at_t0) == decision(at_t1):
                # Both ends decided alike: each field lies between what they leave (a bracket
                # that straddles a decision is left out; the next call reads Redis's state).
                for f in FIELDS:
                    lo, hi = sorted((getattr(s0, f), getattr(s1, f)))
                    assert lo <= getattr(after, f) <= hi, (where, f, before, after)
            if isinstance(have, Grant):
                seen.add((kind, have.reason.value or ("probe" if have.probe else "granted")))
                probe = probe or have.probe
            else:
                seen.add((kind, str(have) if kind == "report" else ""))
                if kind == "report":
                    probe = False
            if rng.random() < 0.3:
                await asyncio.sleep(rng.choice([0.01, 0.05, 0.2]))
    # The walk went through the rules it claims to check.
    assert {r for k, r in seen if k == "acquire"} >= {
        "granted", "requests", "tokens", "drain_share", "paused", "breaker_open", "probe",
        "probing",
    }, seen  # fmt: skip
    assert {r for k, r in seen if k == "report"} >= {"closed", "open"}, seen
