"""ResilientQueue against real redis-server processes that the tests kill, freeze and restart.

In-process, so each fault is placed exactly; tests/queue/resilient/test_failover.py does the
same through the real daemon with concurrent producers and workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.errors import BackendUnavailable
from sidecar.models import EnqueueOutcome, QueuedRequest, QueueStatus
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.resilient import ResilientQueue
from tests.support.crash import crash_local
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import RedisServer, redis_queue_for

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

RECOVERY_TIMEOUT_S = 20.0
LONG_LEASE_S = 3600.0  # outlives the fake clock's steps
REDIS_TIMEOUT_S = 0.3


class Clock:
    """The wall clock: Redis's own TTLs and the daemon's must agree in these tests."""

    def __call__(self) -> float:
        return time.time()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    # AOF on: a killed server comes back with what it had, like a production Redis.
    with RedisServer(appendonly=True) as s:
        yield s


def build(server: RedisServer, **local_limits: int) -> ResilientQueue:
    clock = Clock()
    redis = redis_queue_for(server.url, clock, retention_s=600, timeout_s=REDIS_TIMEOUT_S)
    local = LocalQueue(
        max_items=local_limits.get("max_items", 10_000),
        max_bytes=10**9,
        high_watermark=0.8,
        low_watermark=0.6,
        retention_s=600,
        clock=clock,
    )
    return ResilientQueue(redis, local, probe_initial_s=0.02, probe_max_s=0.2)


@pytest.fixture
async def queue(server: RedisServer) -> AsyncIterator[ResilientQueue]:
    q = build(server)
    await q.start()
    try:
        yield q
    finally:
        await q.close()


async def test_killed_redis_fails_over_inside_the_call_and_moves_back(
    server: RedisServer, queue: ResilientQueue
) -> None:
    clock = Clock()
    before = [make_request(clock, i, priority=5, queue_id=f"r{i}") for i in range(5)]
    await queue.enqueue(before)
    server.kill()
    during = [make_request(clock, i, priority=i % 3, queue_id=f"l{i}") for i in range(10)]
    results = await queue.enqueue(during)  # the same call: Redis refuses, the local queue takes it
    assert all(r.created for r in results)
    assert queue.mode == "local_fallback" and queue.failover.failovers == 1
    health = await queue.health()
    assert health.status == "degraded" and "redis unavailable" in health.reasons[0]
    st = await queue.status("l3")
    assert st is not None and st.status is QueueStatus.QUEUED
    with pytest.raises(BackendUnavailable):
        await queue.status("r0")  # held by Redis, which is away

    server.restart()
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    assert queue.failover.recoveries == 1 and queue.handover.moved == 10
    assert (await queue.health()).status == "ok"
    jobs = await queue.dequeue(100, 30)
    # One order over both sets: priority first, then arrival (the moved ones arrived later).
    assert [j.queue_id for j in jobs] == [
        *(f"l{i}" for i in (0, 3, 6, 9)),
        *(f"l{i}" for i in (1, 4, 7)),
        *(f"l{i}" for i in (2, 5, 8)),
        *(f"r{i}" for i in range(5)),
    ]
    stats = await queue.stats()
    assert stats.accepted == 15 and stats.processing == 15 and stats.balanced, stats


async def test_moved_requests_keep_their_metadata(
    server: RedisServer, queue: ResilientQueue
) -> None:
    clock = Clock()
    server.kill()
    req = make_request(clock, {"keep": "me"}, priority=2, ttl_s=900, max_attempts=4)
    await queue.enqueue([req])
    [job] = await queue.dequeue(1, 30)
    assert job.lease_id is not None
    await queue.fail(job.queue_id, job.lease_id, "provider down", retry=True)  # attempts = 1
    server.restart()
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    moved = await queue.redis.status(req.queue_id)
    assert moved is not None
    assert (moved.priority, moved.attempts, moved.max_attempts) == (2, 1, 4)
    assert moved.created_at == pytest.approx(req.created_at)
    assert moved.expires_at == pytest.approx(req.expires_at)
    assert moved.payload == req.payload


async def test_redis_down_at_start_serves_locally_then_recovers(server: RedisServer) -> None:
    server.stop()
    q = build(server)
    await q.start()
    try:
        assert q.mode == "local_fallback"
        [res] = await q.enqueue([make_request(Clock(), "early", queue_id="early")])
        assert res.created
        server.start()
        await q.wait_until(q.backlog_moved, RECOVERY_TIMEOUT_S)
        remote = await q.redis.status("early")
        assert remote is not None and remote.status is QueueStatus.QUEUED
    finally:
        await q.close()


async def test_leased_locally_stays_settleable_after_recovery(
    server: RedisServer, queue: ResilientQueue
) -> None:
    server.kill()
    await queue.enqueue([make_request(Clock(), queue_id="leased")])
    [job] = await queue.dequeue(1, 30)
    server.restart()
    await queue.wait_until(lambda: queue.redis_up, RECOVERY_TIMEOUT_S)
    assert job.lease_id is not None
    ext = await queue.extend(job.queue_id, job.lease_id, 60)
    assert ext.status is QueueStatus.PROCESSING
    done = await queue.complete(job.queue_id, job.lease_id)
    assert done.status is QueueStatus.COMPLETED
    assert (await queue.stats()).balanced


async def test_frozen_redis_times_out_into_local_and_keeps_one_copy(
    server: RedisServer, queue: ResilientQueue
) -> None:
    """A frozen server runs the write it already received once it thaws: one copy must win."""
    server.pause()
    started = time.monotonic()
    [res] = await queue.enqueue([make_request(Clock(), "frozen", queue_id="frozen-1")])
    assert res.created and queue.mode == "local_fallback"
    assert time.monotonic() - started < 5 * REDIS_TIMEOUT_S + 2
    # Once Redis is marked down, the next call does not wait for another timeout.
    started = time.monotonic()
    await queue.enqueue([make_request(Clock(), queue_id="frozen-2")])
    assert time.monotonic() - started < REDIS_TIMEOUT_S
    server.resume()
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    jobs = await queue.dequeue(10, 30)
    assert sorted(j.queue_id for j in jobs) == ["frozen-1", "frozen-2"]
    assert await queue.dequeue(10, 30) == []
    stats = await queue.stats()
    assert stats.accepted == 2 and stats.balanced, stats


async def test_frozen_copy_handed_out_locally_is_the_one_kept(
    server: RedisServer, queue: ResilientQueue
) -> None:
    server.pause()
    await queue.enqueue([make_request(Clock(), queue_id="taken")])
    [job] = await queue.dequeue(1, 30)  # served from the local queue during the outage
    server.resume()
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    assert await queue.dequeue(10, 30) == []  # a thawed Redis copy was discarded
    assert job.lease_id is not None
    await queue.complete(job.queue_id, job.lease_id)
    stats = await queue.stats()
    assert stats.completed == 1 and stats.balanced, stats


async def test_frozen_copy_of_a_request_finished_locally_is_discarded(
    server: RedisServer, queue: ResilientQueue
) -> None:
    server.pause()
    await queue.enqueue([make_request(Clock(), queue_id="early")])  # may still land in Redis
    [job] = await queue.dequeue(1, 30)
    assert job.lease_id is not None
    await queue.complete(job.queue_id, job.lease_id)  # finished before Redis thaws
    server.resume()
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    assert await queue.dequeue(10, 30) == []  # the thawed copy must not run a second time
    assert await queue.redis.status("early") is None


async def test_redis_restarted_empty_is_reported(queue: ResilientQueue) -> None:
    with RedisServer(appendonly=False) as volatile:
        q = build(volatile)
        await q.start()
        try:
            await q.enqueue([make_request(Clock(), queue_id=f"gone-{i}") for i in range(3)])
            volatile.kill()
            await q.enqueue([make_request(Clock(), queue_id="kept")])
            volatile.restart()  # no persistence: it comes back empty
            await q.wait_until(q.backlog_moved, RECOVERY_TIMEOUT_S)
            assert q.failover.data_lost and "generation marker missing" in q.failover.data_lost[0]
            health = await q.health()
            assert health.status == "degraded"
            assert any("without its data" in r for r in health.reasons)
            stats = await q.stats()
            assert stats.redis_data_lost == 1
            assert await q.status("kept") is not None
        finally:
            await q.close()


@pytest.mark.parametrize("fault", ["oom", "readonly"])
async def test_redis_refusing_writes_routes_to_local(
    server: RedisServer, queue: ResilientQueue, fault: str
) -> None:
    admin = await _admin(server)
    try:
        if fault == "oom":
            await admin.config_set("maxmemory", "1")
        else:
            await admin.replicaof("127.0.0.1", 1)  # nobody listens there
        [res] = await queue.enqueue([make_request(Clock(), queue_id=f"refused-{fault}")])
        assert res.created and queue.mode == "local_fallback"
        if fault == "oom":
            await admin.config_set("maxmemory", "0")
        else:
            await admin.replicaof("NO", "ONE")
        await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
        remote = await queue.redis.status(f"refused-{fault}")
        assert remote is not None and remote.status is QueueStatus.QUEUED
    finally:
        await admin.aclose()


async def test_move_back_interrupted_by_a_second_failure(server: RedisServer) -> None:
    q = build(server)
    q.handover.migrate_batch = 7
    await q.start()
    try:
        server.kill()
        ids = [f"m{i}" for i in range(200)]
        await q.enqueue([make_request(Clock(), i, queue_id=i) for i in ids])
        server.restart()
        await q.wait_until(lambda: q.handover.moved > 0, RECOVERY_TIMEOUT_S)
        server.kill()  # mid-move: some batches moved, maybe one in flight, the rest local
        statuses = [await _status_or_none(q, i) for i in ids]
        assert q.mode == "local_fallback"
        server.restart()
        await q.wait_until(q.backlog_moved, RECOVERY_TIMEOUT_S)
        got = []
        while batch := await q.dequeue(50, 30):
            got += [j.queue_id for j in batch]
        assert sorted(got) == sorted(ids), "lost or duplicated in the move"
        assert all(s in (None, QueueStatus.QUEUED) for s in statuses)
        assert (await q.stats()).balanced
    finally:
        await q.close()


async def _status_or_none(q: ResilientQueue, queue_id: str) -> QueueStatus | None:
    try:
        rec = await q.status(queue_id)
    except BackendUnavailable:
        return None  # moved to Redis before it went away again
    return None if rec is None else rec.status


async def _admin(server: RedisServer) -> Redis:
    return Redis.from_url(server.url)


async def test_batch_with_a_locally_held_id_is_answered_once_and_moves_on(
    server: RedisServer, queue: ResilientQueue
) -> None:
    server.kill()
    [held] = await queue.enqueue([make_request(Clock(), "old", queue_id="held")])
    [job] = await queue.dequeue(1, 30)  # leased locally: it stays local until settled
    server.restart()
    await queue.wait_until(lambda: queue.redis_up, RECOVERY_TIMEOUT_S)
    again, new = await queue.enqueue(
        [make_request(Clock(), "copy", queue_id="held"), make_request(Clock(), queue_id="new")]
    )
    assert not again.created and again.request.status is QueueStatus.PROCESSING
    assert new.created
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    remote = await queue.redis.status("new")
    assert remote is not None and remote.status is QueueStatus.QUEUED
    assert await queue.redis.status("held") is None
    assert held.created and job.queue_id == "held"


async def test_retried_enqueue_of_a_request_being_moved_is_not_stored_twice(
    server: RedisServer, queue: ResilientQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.kill()
    await queue.enqueue([make_request(Clock(), queue_id="X")])
    server.restart()
    real_enqueue = queue.redis.enqueue

    async def refuse_once(requests: list[QueuedRequest], **_: object) -> list[EnqueueOutcome]:
        monkeypatch.setattr(queue.redis, "enqueue", real_enqueue)
        raise BackendUnavailable("redis unavailable (injected)", {"kind": "connection"})

    monkeypatch.setattr(queue.redis, "enqueue", refuse_once)  # the hand-over fails once
    await queue.wait_until(lambda: not queue.redis_up and queue.redis.enqueue == real_enqueue, 20)
    [again] = await queue.enqueue([make_request(Clock(), "retry", queue_id="X")])
    assert not again.created  # answered from the local store, not stored again
    local = await queue.local.status("X")
    assert local is not None and local.status is QueueStatus.QUEUED
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    jobs = await queue.dequeue(10, 30)
    assert [j.queue_id for j in jobs] == ["X"]
    assert (await queue.stats()).accepted == 1


async def test_an_unexpected_probe_error_does_not_end_the_probing(
    server: RedisServer, queue: ResilientQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_probe = queue.redis.probe
    calls = 0

    async def flaky_probe() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("an error nobody planned for")
        await real_probe()

    monkeypatch.setattr(queue.redis, "probe", flaky_probe)
    server.kill()
    await queue.enqueue([make_request(Clock(), queue_id="during")])
    server.restart()
    await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
    assert calls >= 2 and queue.failover.recoveries == 1


def test_misconf_and_noreplicas_mean_unavailable() -> None:
    from redis.exceptions import ResponseError

    from sidecar.queue.redis import unavailable_kind

    assert unavailable_kind(ResponseError("MISCONF Redis is configured to save")) == "misconf"
    assert unavailable_kind(ResponseError("NOREPLICAS Not enough good replicas")) == "no_replicas"
    assert unavailable_kind(ResponseError("ERR wrong number of arguments")) is None


async def test_close_hands_the_local_backlog_to_redis(server: RedisServer) -> None:
    q = build(server)
    await q.start()
    server.kill()
    await q.enqueue([make_request(Clock(), queue_id=f"b{i}") for i in range(20)])
    server.restart()
    await q.wait_until(lambda: q.redis_up, RECOVERY_TIMEOUT_S)
    await q.close()
    check = redis_queue_for(server.url, Clock(), retention_s=600, sweep_interval_s=None)
    await check.start()
    try:
        found = [await check.status(f"b{i}") for i in range(20)]
        assert all(f is not None and f.status is QueueStatus.QUEUED for f in found)
    finally:
        await check.close()


async def test_a_batch_whose_hand_over_failed_is_served_locally_while_redis_stays_down(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 7: a failed hand-over batch was stuck (not dequeued, not cancellable, no expiry)."""
    clock = FakeClock()
    redis = redis_queue_for(server.url, clock, retention_s=600, timeout_s=REDIS_TIMEOUT_S)
    local = LocalQueue(
        max_items=100, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock,
    )  # fmt: skip
    queue = ResilientQueue(redis, local, probe_initial_s=0.02, probe_max_s=0.2)
    await queue.start()
    try:
        server.kill()
        batch = [make_request(clock, i, queue_id=f"m{i}", ttl_s=60 + i) for i in range(3)]
        await queue.enqueue(batch)
        real_enqueue = redis.enqueue
        failed = asyncio.Event()

        async def down_again(requests: list[QueuedRequest], **_: object) -> list[EnqueueOutcome]:
            # Redis goes away again while the batch is in flight, and stays away.
            monkeypatch.setattr(redis, "enqueue", real_enqueue)
            server.kill()
            failed.set()
            raise BackendUnavailable("redis unavailable (injected)", {"kind": "connection"})

        monkeypatch.setattr(redis, "enqueue", down_again)
        server.restart()
        async with asyncio.timeout(RECOVERY_TIMEOUT_S):
            await failed.wait()
        await queue.wait_until(lambda: not queue.redis_up and not local.moving, 20)
        [job] = await queue.dequeue(1, 30)  # the returned batch is served locally
        assert job.queue_id == "m0"
        cancelled = await queue.cancel("m1")
        assert cancelled.status is QueueStatus.FAILED and cancelled.reason == "cancelled"
        clock.advance(62.5)  # past m2's TTL (62 s), Redis still down
        expired = await queue.status("m2")
        assert expired is not None and expired.status is QueueStatus.EXPIRED
        assert not queue.redis_up
    finally:
        await queue.close(0)


async def test_a_crash_after_redis_took_a_batch_keeps_one_copy(
    server: RedisServer, tmp_path: Path
) -> None:
    """The daemon dies after Redis acknowledged a hand-over batch, before it forgot the batch."""
    clock = Clock()

    def durable_local() -> LocalQueue:
        return LocalQueue(
            max_items=100, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
            retention_s=600, clock=clock, journal=Journal(tmp_path, fsync=False),
        )  # fmt: skip

    local = durable_local()
    await local.start()
    await local.enqueue([make_request(clock, i, queue_id=f"c{i}") for i in range(3)])
    batch = await local.take_for_handover(10)  # the mover's first step, on disk
    first = redis_queue_for(server.url, clock, retention_s=600, sweep_interval_s=None)
    await first.start()
    assert all(r.created for r in await first.enqueue(batch))  # Redis took it...
    await first.close()
    crash_local(local)  # ...and the daemon died before confirming
    redis = redis_queue_for(server.url, clock, retention_s=600, timeout_s=REDIS_TIMEOUT_S)
    queue = ResilientQueue(redis, durable_local(), probe_initial_s=0.02, probe_max_s=0.2)
    await queue.start()  # replay: the batch is local and uncertain; Redis has it: drop ours
    try:
        await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
        jobs = await queue.dequeue(10, 30)
        assert sorted(j.queue_id for j in jobs) == ["c0", "c1", "c2"]
        assert await queue.dequeue(10, 30) == []
        stats = await queue.stats()
        assert stats.accepted == 3 and stats.stores["local"].moved_out == 3 and stats.balanced
    finally:
        await queue.close(0)


async def test_an_unexpected_error_while_reconciling_at_start_does_not_stop_the_start(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    local = LocalQueue(
        max_items=100, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock, journal=Journal(tmp_path, fsync=False),
    )  # fmt: skip
    await local.start()
    await local.enqueue([make_request(clock, queue_id="u")], uncertain=True)
    await local.close()
    local = LocalQueue(
        max_items=100, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock, journal=Journal(tmp_path, fsync=False),
    )  # fmt: skip
    redis = redis_queue_for(server.url, clock, retention_s=600, timeout_s=REDIS_TIMEOUT_S)
    real_status = redis.status
    calls = 0

    async def flaky_status(queue_id: str) -> QueuedRequest | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("an error nobody planned for")
        return await real_status(queue_id)

    monkeypatch.setattr(redis, "status", flaky_status)
    queue = ResilientQueue(redis, local, probe_initial_s=0.02, probe_max_s=0.2)
    await queue.start()  # serves (locally) instead of failing
    try:
        assert queue.mode == "local_fallback"
        await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)  # the probe retried
        assert calls >= 2 and local.uncertain_ids() == []
        [job] = await queue.dequeue(10, 30)
        assert job.queue_id == "u"
    finally:
        await queue.close(0)


async def test_a_delayed_local_request_moves_to_redis_and_stays_held_until_its_time(
    server: RedisServer,
) -> None:
    """Issue 22: a request a fail held back locally moved only once its delay had ended."""
    clock = FakeClock()
    redis = redis_queue_for(server.url, clock, retention_s=600, timeout_s=REDIS_TIMEOUT_S)
    local = LocalQueue(
        max_items=100, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock,
    )  # fmt: skip
    queue = ResilientQueue(redis, local, probe_initial_s=0.02, probe_max_s=0.2)
    await queue.start()
    try:
        server.kill()
        await queue.enqueue([make_request(clock, queue_id=q, max_attempts=3)
                             for q in ("counted", "waits", "ready")])  # fmt: skip
        first, second = await queue.dequeue(2, 30)
        assert (first.queue_id, second.queue_id) == ("counted", "waits")
        await queue.fail("counted", first.lease_id or "", "worker error", True, 60.0)
        await queue.fail("waits", second.lease_id or "", "provider down", True, 90.0, False)
        assert local.queued == 3
        server.restart()
        # Before, the two held back kept the backlog from moving until their delays ended.
        await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
        assert not any(local.holds(q) for q in ("counted", "waits", "ready"))
        raw = Redis.from_url(server.url)
        try:
            for qid, attempts, delay in (("counted", 1, 60.0), ("waits", 0, 90.0)):
                moved = await redis.status(qid)
                assert moved is not None and moved.status is QueueStatus.QUEUED
                assert moved.attempts == attempts  # its deliveries, as counted locally
                held = await raw.zscore(redis.keys.delayed, qid)
                assert held == pytest.approx(clock() + delay)
        finally:
            await raw.aclose()
        [job] = await queue.dequeue(5, LONG_LEASE_S)  # only the one not held back
        assert job.queue_id == "ready"
        clock.advance(59)
        assert await queue.dequeue(5, LONG_LEASE_S) == []
        clock.advance(2)
        [job] = await queue.dequeue(5, LONG_LEASE_S)
        assert (job.queue_id, job.attempts) == ("counted", 2)
        clock.advance(30)
        [job] = await queue.dequeue(5, LONG_LEASE_S)
        assert (job.queue_id, job.attempts) == ("waits", 1)
        stats = await queue.stats()
        assert stats.accepted == 3 and stats.processing == 3 and stats.balanced, stats
    finally:
        await queue.close(0)
