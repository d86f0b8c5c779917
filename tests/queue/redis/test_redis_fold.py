"""Concurrent enqueues (and completes) of one loop pass fold into one run per script."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.errors import LeaseMismatch, NotFound
from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.redis import RedisQueue
from sidecar.queue.redis.fold import EARLY_FLUSH_ITEMS, FOLD_MAX_ITEMS
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    RedisServer,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
    script_runs,
)


async def _script_runs(raw: Redis) -> int:
    return script_runs(await raw.info("commandstats"))


async def test_concurrent_enqueues_share_one_script_run(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    before = await _script_runs(raw)
    n = EARLY_FLUSH_ITEMS  # past it, a fold is written early and the rest make another
    results = await asyncio.gather(
        *(queue.enqueue([make_request(clock, i, queue_id=f"q{i}")]) for i in range(n))
    )
    assert await _script_runs(raw) == before + 1
    assert [r.request.queue_id for [r] in results] == [f"q{i}" for i in range(n)]
    assert all(r.created for [r] in results)
    # Each caller got its own record: seqs follow the call order.
    assert [r.request.seq for [r] in results] == sorted(r.request.seq for [r] in results)
    for [r] in results:
        st = await queue.status(r.request.queue_id)
        assert st is not None and st.seq == r.request.seq and st.payload == r.request.payload


async def test_a_bad_call_fails_alone_and_its_neighbours_are_stored(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    calls = [queue.enqueue([make_request(clock, queue_id=f"ok{i}")]) for i in range(5)]
    # A priority the script refuses (the server bounds it before it ever gets here).
    calls.insert(2, queue.enqueue([make_request(clock, priority=42, queue_id="bad")]))
    results = await asyncio.gather(*calls, return_exceptions=True)
    bad = results.pop(2)
    assert isinstance(bad, ResponseError) and "priority" in str(bad)
    assert all(not isinstance(r, BaseException) and r[0].created for r in results)
    stats = await queue.stats()
    assert (stats.accepted, stats.queued) == (5, 5)
    assert await queue.status("bad") is None


async def test_a_repeat_inside_one_fold_is_stored_once(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    first, second = await asyncio.gather(
        queue.enqueue([make_request(clock, queue_id="same")]),
        queue.enqueue([make_request(clock, queue_id="same")]),
    )
    assert (first[0].created, second[0].created) == (True, False)
    assert first[0].request.seq == second[0].request.seq
    assert (await queue.stats()).accepted == 1


class PipelineRedis(Redis):
    """redis-py's client under another class: the scripts go through redis-py's pipeline, as
    they do for Sentinel and Cluster clients, where no early flush splits a loop pass."""


@pytest.mark.parametrize("per_call", [1, 7])
async def test_folds_past_the_cap_split_into_several_runs(
    redis_server: RedisServer, clock: FakeClock, raw: Redis, per_call: int
) -> None:
    queue = RedisQueue(
        PipelineRedis.from_url(redis_server.url), retention_s=600.0, clock=clock,
        sweep_interval_s=None,
    )  # fmt: skip
    await queue.start()
    assert queue._runner.wire is None  # redis-py's pipeline, not the lean connection
    calls = FOLD_MAX_ITEMS // per_call + 3
    before = await _script_runs(raw)
    try:
        results = await asyncio.gather(
            *(
                queue.enqueue([make_request(clock, queue_id=f"c{c}-{k}") for k in range(per_call)])
                for c in range(calls)
            )
        )
    finally:
        await queue.close()
    # Whole calls per run, each run at most FOLD_MAX_ITEMS requests: here two runs.
    assert await _script_runs(raw) - before == 2
    assert sum(len(r) for r in results) == calls * per_call
    assert all(res.created for r in results for res in r)
    assert int(await raw.zcard(queue.keys.pending)) == calls * per_call


# -- completes fold the same way (complete.lua takes a batch) --------------------------------


async def _leased(queue: Any, clock: FakeClock, n: int) -> list[Any]:
    await queue.enqueue([make_request(clock, i, queue_id=f"j{i}") for i in range(n)])
    jobs = await queue.dequeue(n, 60)
    assert len(jobs) == n
    return list(jobs)


async def test_concurrent_completes_share_one_script_run(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    jobs = await _leased(queue, clock, 16)
    before = await _script_runs(raw)
    done = await asyncio.gather(*(queue.complete(j.queue_id, j.lease_id) for j in jobs))
    assert await _script_runs(raw) == before + 1
    assert [d.queue_id for d in done] == [j.queue_id for j in jobs]  # each caller its own
    assert all(d.status is QueueStatus.COMPLETED for d in done)
    stats = await queue.stats()
    assert (stats.completed, stats.processing) == (16, 0)


async def test_a_refused_complete_fails_alone_and_its_neighbours_complete(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    jobs = await _leased(queue, clock, 4)
    calls = [queue.complete(j.queue_id, j.lease_id) for j in jobs]
    # Ahead of its right one in the run: the request is still processing, under another lease.
    calls.insert(0, queue.complete(jobs[0].queue_id, "not-the-lease"))
    calls.insert(3, queue.complete("no-such-id", "x"))
    before = await _script_runs(raw)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert await _script_runs(raw) == before + 1
    assert isinstance(results.pop(3), NotFound)
    assert isinstance(results.pop(0), LeaseMismatch)
    assert all(isinstance(r, QueuedRequest) and r.status is QueueStatus.COMPLETED for r in results)
    assert (await queue.stats()).completed == 4


async def test_a_complete_repeated_inside_one_fold_is_harmless(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    [job] = await _leased(queue, clock, 1)
    first, second = await asyncio.gather(
        queue.complete(job.queue_id, job.lease_id), queue.complete(job.queue_id, job.lease_id)
    )
    assert first.status is second.status is QueueStatus.COMPLETED
    assert (await queue.stats()).completed == 1


async def test_enqueues_and_completes_of_one_pass_fold_by_script(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    jobs = await _leased(queue, clock, 3)
    before = await _script_runs(raw)
    results: list[Any] = await asyncio.gather(
        *(queue.complete(j.queue_id, j.lease_id) for j in jobs),
        *(queue.enqueue([make_request(clock, queue_id=f"new{i}")]) for i in range(3)),
    )
    assert await _script_runs(raw) == before + 2  # one complete run, one enqueue run
    assert [r.queue_id for r in results[:3]] == [j.queue_id for j in jobs]
    assert [r[0].request.queue_id for r in results[3:]] == ["new0", "new1", "new2"]
    stats = await queue.stats()
    assert (stats.completed, stats.queued) == (3, 3)


async def test_a_folded_batch_keeps_every_index_and_counter_exact(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    """enqueue, dequeue and complete write a batch's index entries and counters in one call
    per key (lua/common.lua, many): each entry must still be there with its own score, and
    what a byte budget leaves must go back where it was."""
    queue = await make_queue()
    keys = queue.keys
    [old] = await queue.enqueue([make_request(clock, queue_id="old", priority=0)])
    calls = [queue.enqueue([make_request(clock, {"n": i}, priority=i % 3, queue_id=f"q{i}")])
             for i in range(12)]  # fmt: skip
    calls.append(queue.enqueue([make_request(clock, queue_id="q3")]))  # a repeat in the fold
    calls.append(queue.enqueue([make_request(clock, queue_id="old")]))  # stored before
    results = [r for [r] in await asyncio.gather(*calls)]
    assert [r.created for r in results] == [True] * 12 + [False, False]
    stored = [old.request] + [r.request for r in results[:12]]
    assert len({r.seq for r in stored}) == 13
    for rec in stored:
        assert await raw.zscore(keys.pending, rec.queue_id) == rec.priority * 2**48 + rec.seq
        assert await raw.zscore(keys.expiry, rec.queue_id) == math.ceil(rec.expires_at * 1000)
    assert await raw.zcard(keys.pending) == await raw.zcard(keys.expiry) == 13
    held = sum(len(r.payload or b"") for r in stored)
    assert await raw.hmget(keys.stats, "accepted", "bytes") == [b"13", str(held).encode()]

    order = sorted(stored, key=lambda r: (r.priority, r.seq))
    one = len(order[0].payload or b"") + 200
    got = await queue.dequeue(6, 30.0, max_bytes=2 * one)  # room for two of the six asked
    assert [r.queue_id for r in got] == [r.queue_id for r in order[:2]]
    assert await raw.zcard(keys.pending) == 11
    for rec in order[2:]:  # the four taken off with them went back with their scores
        assert await raw.zscore(keys.pending, rec.queue_id) == rec.priority * 2**48 + rec.seq
    assert sorted(await raw.zrange(keys.leases, 0, -1)) == sorted(r.queue_id.encode() for r in got)
    assert await raw.zcard(keys.expiry) == 11

    done = await asyncio.gather(*(queue.complete(r.queue_id, r.lease_id or "") for r in got))
    assert [r.status for r in done] == [QueueStatus.COMPLETED] * 2
    assert await raw.zcard(keys.leases) == 0
    for rec in done:
        assert await raw.zscore(keys.retained, rec.queue_id) == rec.updated_at + queue.retention_s
    left = held - sum(len(r.payload or b"") for r in got)
    assert await raw.hmget(keys.stats, "completed", "bytes") == [b"2", str(left).encode()]
