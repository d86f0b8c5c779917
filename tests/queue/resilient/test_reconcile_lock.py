"""One reconciliation at a time, across changes of state (GitHub issue 24, item 1).

Two reconciliations of the same uncertain enqueue that overlap both see the Redis copy: one
drops the local copy, the other (finding no local copy left to drop) discards the Redis one,
and the request is gone from both stores. The lock that prevents it must therefore be the same
lock for a reconciliation that starts after a change of state (Failover.changed()) as for one
that started before it.

The fault is placed exactly: the first reconciliation is held inside its Redis status read by
an event, the state changes, and the second reconciliation's first step is run at once (in the
test's own task, up to its first suspension), so whether it waited for the lock or went on to
read Redis is decided before the first one is let go: no timing is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from sidecar.eager import first_step, resume
from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient.failover import Failover
from tests.support.bounded import settle
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import RedisServer, redis_queue_for

WAIT_S = 10.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
async def stores(server: RedisServer) -> AsyncIterator[tuple[RedisQueue, LocalQueue]]:
    clock = FakeClock()
    redis = redis_queue_for(server.url, clock, retention_s=600)
    local = LocalQueue(
        max_items=100, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock,
    )  # fmt: skip
    await redis.start()
    await local.start()
    # One request in both stores: the local copy uncertain (its Redis write timed out, and
    # landed after all), as after an outage.
    request = make_request(clock, queue_id="twice")
    await redis.enqueue([request])
    await local.enqueue([request], uncertain=True)
    try:
        yield redis, local
    finally:
        await local.close()
        await redis.close()


def failover_for(redis: RedisQueue, local: LocalQueue) -> Failover:
    return Failover(
        redis, local, on_up=lambda: None, probe_initial_s=0.05, probe_max_s=0.1,
        probe_successes=1, flap_window_s=30.0, watch_interval_s=1.0, log_repeat_s=60.0,
    )  # fmt: skip


async def test_a_reconciliation_started_after_a_change_waits_for_the_one_in_progress(
    stores: tuple[RedisQueue, LocalQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    redis, local = stores
    failover = failover_for(redis, local)
    real_status = redis.status
    inside = 0
    overlapped: list[int] = []
    first_in = asyncio.Event()
    let_first_go = asyncio.Event()
    calls = 0

    async def held_status(queue_id: str) -> QueuedRequest | None:
        nonlocal inside, calls
        calls += 1
        inside += 1
        if inside > 1:
            overlapped.append(inside)
        try:
            if calls == 1:  # the first reconciliation stops here until the test lets it go
                first_in.set()
                await let_first_go.wait()
            return await real_status(queue_id)
        finally:
            inside -= 1

    monkeypatch.setattr(redis, "status", held_status)

    first = asyncio.create_task(failover.reconcile(), name="reconcile-1")
    async with asyncio.timeout(WAIT_S):
        await first_in.wait()
    failover.changed()  # e.g. Redis marked down, or data loss reported, meanwhile
    # The second reconciliation's first step, now: it either waits for the lock, or (with a
    # lock renewed by the change) goes straight on to read Redis while the first is held.
    second_coro = failover.reconcile()
    ended, waiting = first_step(second_coro)
    second = None if ended else asyncio.create_task(resume(second_coro, waiting))
    went_on = list(overlapped)  # before the first one is let go

    let_first_go.set()
    await settle([first] + ([second] if second is not None else []), WAIT_S)

    # The request is still queued, in exactly one store (with overlapping reconciliations, the
    # second drops the local copy and the first, finding none, discards the Redis one).
    in_redis = await real_status("twice")
    in_local = await local.status("twice")
    held = [
        name
        for name, found in (("redis", in_redis), ("local", in_local))
        if found is not None and found.status is QueueStatus.QUEUED
    ]
    assert held == ["redis"], f"the request is queued in {held or 'no store'}"
    assert went_on == [], "a reconciliation ran while another was in progress"
    assert local.uncertain_ids() == []
