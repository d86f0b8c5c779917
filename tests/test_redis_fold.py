"""Concurrent single enqueues of one loop pass fold into one enqueue.lua run (redis_io.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.queue.redis_io import FOLD_MAX_ITEMS
from tests.helpers import FakeClock, make_request
from tests.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)


async def _evalsha_calls(raw: Redis) -> int:
    stats: dict[str, Any] = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_enqueues_share_one_script_run(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    before = await _evalsha_calls(raw)
    results = await asyncio.gather(
        *(queue.enqueue([make_request(clock, i, queue_id=f"q{i}")]) for i in range(32))
    )
    assert await _evalsha_calls(raw) == before + 1
    assert [r.request.queue_id for [r] in results] == [f"q{i}" for i in range(32)]
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


@pytest.mark.parametrize("per_call", [1, 7])
async def test_folds_past_the_cap_split_into_several_runs(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, per_call: int
) -> None:
    queue = await make_queue()
    calls = FOLD_MAX_ITEMS // per_call + 3
    before = await _evalsha_calls(raw)
    results = await asyncio.gather(
        *(
            queue.enqueue([make_request(clock, queue_id=f"c{c}-{k}") for k in range(per_call)])
            for c in range(calls)
        )
    )
    # Whole calls per run, each run at most FOLD_MAX_ITEMS requests: here two runs.
    assert await _evalsha_calls(raw) - before == 2
    assert sum(len(r) for r in results) == calls * per_call
    assert all(res.created for r in results for res in r)
    assert (await queue.stats()).queued == calls * per_call
