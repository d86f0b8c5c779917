"""The limiter follows the request queue's Redis: a Redis killed mid-way is met inside the same
call, which the local limiter answers at this host's share; on Redis's return its state rules.

In-process, so the fault is placed exactly; tests/queue/limit/test_limit_daemons.py does the
same through the real daemon.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from sidecar.config import Settings
from sidecar.queue.limit import Ask, Reason, ResilientLimiter, build_limiter
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis.keys import RedisKeys
from sidecar.queue.resilient import ResilientQueue
from tests.support.redis_server import RedisServer, redis_queue_for

# Real redis-server processes killed and restarted: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

RECOVERY_TIMEOUT_S = 20.0
KEYS = RedisKeys.for_prefix("sidecar")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
async def queue(server: RedisServer) -> AsyncIterator[ResilientQueue]:
    redis = redis_queue_for(server.url, time.time, retention_s=600, timeout_s=0.3)
    local = LocalQueue(max_items=1000, max_bytes=10**8, high_watermark=0.8, low_watermark=0.6,
                       retention_s=600)  # fmt: skip
    q = ResilientQueue(redis, local, probe_initial_s=0.02, probe_max_s=0.2)
    await q.start()
    try:
        yield q
    finally:
        await q.close()


async def test_a_killed_redis_is_met_inside_the_call_at_the_local_share(
    server: RedisServer, queue: ResilientQueue
) -> None:
    limiter = build_limiter(Settings(limiter_local_share=0.5), queue)
    assert isinstance(limiter, ResilientLimiter)
    ask = Ask(rpm=60, tpm=0)
    assert (await limiter.acquire("on-redis", ask)).granted
    raw = Redis.from_url(server.url)
    try:
        assert await raw.exists(KEYS.limit("on-redis"))
    finally:
        await raw.aclose()
    server.kill()
    # The same call meets the dead Redis and is answered by the local limiter: no error.
    first = await limiter.acquire("during", ask)
    assert first.granted and not queue.redis_up
    second = await limiter.acquire("during", ask)
    # This host's share (0.5) of 60 a minute: one request every 2 s.
    assert second.reason is Reason.REQUESTS and 1.9 < second.wait_s <= 2.0
    assert await limiter.report("during", ok=False, probe=False, failures=1, reset_s=5.0) == "open"
    until = await limiter.pause("during", 10.0)
    assert until > time.time() + 9

    server.start()
    await queue.wait_until(lambda: queue.redis_up, RECOVERY_TIMEOUT_S)
    # Redis's state is authoritative again: the local grants, breaker and pause stay behind.
    raw = Redis.from_url(server.url)
    try:
        assert not await raw.exists(KEYS.limit("during"))
        back = await limiter.acquire("during", ask)
        assert back.granted
        assert await raw.exists(KEYS.limit("during"))
    finally:
        await raw.aclose()


async def test_a_frozen_redis_times_out_to_the_local_limiter(
    server: RedisServer, queue: ResilientQueue
) -> None:
    limiter = build_limiter(Settings(limiter_local_share=1.0), queue)
    server.pause()
    try:
        grant = await limiter.acquire("frozen", Ask(rpm=60, tpm=0))
        assert grant.granted and not queue.redis_up
    finally:
        server.resume()


def test_without_redis_the_limiter_is_local_at_its_share() -> None:
    local = LocalQueue(max_items=10, max_bytes=10**6, high_watermark=0.8, low_watermark=0.6,
                       retention_s=60)  # fmt: skip
    limiter = build_limiter(Settings(limiter_local_share=0.25), local)
    assert limiter.name == "local"
    assert getattr(limiter, "share", None) == 0.25
