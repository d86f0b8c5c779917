"""Redis Cluster: one queue's keys in one slot, scripts routed by the cluster client, and a
migration of the queue's slot under load with nothing lost.

The contract suite runs against the session's cluster too (the `cluster` param of the `store`
fixture in conftest.py); this module covers what only a cluster has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.crc import key_slot

from sidecar.config import ConfigError
from sidecar.errors import BackendUnavailable, QueueFull
from sidecar.models import QueuedRequest
from sidecar.queue.redis import RedisQueue
from sidecar.queue.redis.io import check_one_slot
from sidecar.queue.redis.keys import LIBRARY_NAME, RedisKeys
from sidecar.queue.resilient import ResilientQueue
from tests.conftest import make_local
from tests.support.bounded import in_thread, settle
from tests.support.helpers import make_request
from tests.support.redis_topology import ClusterLayout, cluster_queue

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

# The whole of the migration test (about 10 s alone, up to 70 s on a machine loaded to a load
# average of 8), and its parts: inside its pytest-timeout of TEST_TIMEOUT_S (setup and
# teardown included), so a stall fails the test here, with the stuck tasks' stacks, before
# pytest-timeout ends the run.
LOAD_TIMEOUT_S = 100.0
MIGRATE_TIMEOUT_S = 30.0
SETTLE_S = 5.0
TEST_TIMEOUT_S = 150.0
# Short: a lease whose complete met the migration comes back within the test.
LEASE_S = 2.0


def test_every_key_of_a_queue_hashes_to_one_slot() -> None:
    keys = RedisKeys.for_prefix("sidecar")
    check_one_slot(keys)  # does not raise
    assert key_slot(keys.pending.encode()) == key_slot(keys.request("x").encode())


def test_keys_in_two_slots_are_refused_at_start_with_the_slots_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = RedisKeys.for_prefix("q")
    # A key builder that lost the hash tag on one key: the scripts would span two slots.
    bad = RedisKeys(**{**{f: getattr(good, f) for f in good.__dataclass_fields__},
                       "stats": "q:stats"})  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_one_slot(bad)
    message = str(info.value)
    assert "span several cluster slots" in message
    assert f"q:stats -> {key_slot(b'q:stats')}" in message
    monkeypatch.setattr(RedisKeys, "for_prefix", classmethod(lambda cls, prefix: bad))
    with pytest.raises(ConfigError):
        RedisQueue(object(), retention_s=1.0)  # type: ignore[arg-type]


async def test_queue_keys_live_on_the_node_that_owns_the_slot(
    redis_cluster: ClusterLayout,
) -> None:
    queue = cluster_queue(redis_cluster, time.time, retention_s=60.0, sweep_interval_s=None)
    await queue.start()
    try:
        [res] = await queue.enqueue([make_request(time.time)])
        slot = key_slot(queue.keys.pending.encode())
        owner = redis_cluster.owner(slot)
        key = queue.keys.request(res.request.queue_id)
        assert owner.info("keyspace").get("db0", "").startswith("keys=")
        for node in redis_cluster.nodes:
            held = _exists(node.port, key)
            assert held == (node is owner), f"{key} on port {node.port}: {held}"
        assert (await queue.health()).status == "ok"
    finally:
        await queue.close()


async def test_a_node_without_the_library_gets_it_on_the_first_call_that_meets_it(
    redis_cluster: ClusterLayout,
) -> None:
    """A node that joined empty, or lost its functions (FUNCTION FLUSH here): the call that
    meets "Function not found" loads the library on every primary and is sent again."""
    from tests.support.redis_topology import cli

    queue = cluster_queue(redis_cluster, time.time, retention_s=60.0, sweep_interval_s=None)
    await queue.start()
    try:
        assert queue.uses_functions
        [res] = await queue.enqueue([make_request(time.time)])
        owner = redis_cluster.owner(key_slot(queue.keys.pending.encode()))
        assert cli(owner.port, "FUNCTION", "FLUSH") == "OK"
        loads = queue.script_loads
        st = await queue.status(res.request.queue_id)
        assert st is not None and st.queue_id == res.request.queue_id
        assert queue.script_loads == loads + 1
        assert cli(owner.port, "FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME) != ""
    finally:
        await queue.close()


def _exists(port: int, key: str) -> bool:
    from tests.support.redis_topology import cli

    return cli(port, "EXISTS", key) == "1"


@pytest.mark.timeout(TEST_TIMEOUT_S)  # its bounded waits (a slot move) add up past 60 s
async def test_a_call_that_meets_only_redirections_goes_to_the_local_queue(
    redis_cluster: ClusterLayout, tmp_path: Path
) -> None:
    # Mid-move, with the queue's keys split between two nodes, both answer a script TRYAGAIN
    # until the cluster client gives up ("TTL exhausted"): that is "cannot take this now",
    # and the request must go to the local queue instead of failing the producer's call.
    redis = cluster_queue(redis_cluster, time.time, retention_s=60.0, sweep_interval_s=None)
    local = make_local(time.time, tmp_path / "state")  # type: ignore[arg-type]
    queue = ResilientQueue(redis, local, probe_max_s=0.2)
    await queue.start()
    try:
        await queue.enqueue([make_request(time.time)])  # the queue's keys exist on the owner
        slot = key_slot(redis.keys.pending.encode())
        target = next(n for n in redis_cluster.nodes if n is not redis_cluster.owner(slot))
        redis_cluster.move_keys(slot, target, [redis.keys.pending])
        try:
            [res] = await queue.enqueue([make_request(time.time)])
            assert queue.failover.failovers == 1
            assert await local.status(res.request.queue_id) is not None
        finally:
            await in_thread(redis_cluster.migrate_slot, slot, target, timeout_s=MIGRATE_TIMEOUT_S)
        await queue.wait_until(queue.backlog_moved, LOAD_TIMEOUT_S)
        assert await redis.status(res.request.queue_id) is not None
    finally:
        await queue.close()


async def _produce(
    queue: ResilientQueue, acked: list[str], grew: asyncio.Condition, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        batch: list[QueuedRequest] = [make_request(time.time) for _ in range(5)]
        try:
            results = await queue.enqueue(batch)
        except QueueFull:  # the local queue took the load while the slot moved: back off
            async with grew:
                # Until a worker settles something, a producer adds, or the test stops the
                # load. Checked under the lock: _stop_load() sets stop before it takes the
                # lock to notify, and the workers may have ended already.
                if stop.is_set():
                    break
                await grew.wait()
            continue
        async with grew:
            acked += [r.request.queue_id for r in results if r.created]
            grew.notify_all()


async def _stop_load(stop: asyncio.Event, grew: asyncio.Condition) -> None:
    """Stop the load and wake a producer held back by a full local queue.

    Its workers may have ended already, so nothing else would wake it.
    """
    stop.set()
    async with grew:
        grew.notify_all()


async def _work(
    queue: ResilientQueue, completed: dict[str, int], grew: asyncio.Condition, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        jobs = await queue.dequeue(5, LEASE_S)
        for job in jobs:
            try:
                await queue.complete(job.queue_id, job.lease_id or "")
            except BackendUnavailable:
                continue  # its lease lapses and it comes back: counted if it runs twice
            completed[job.queue_id] = completed.get(job.queue_id, 0) + 1
        async with grew:  # wakes a producer held back by a full local queue
            grew.notify_all()
        # The local queue answers without suspending, and an uncontended lock does not
        # suspend either: without this the loop can spin forever holding the event loop,
        # where no asyncio timeout can fire and pytest-timeout's signal stops one task only.
        await asyncio.sleep(0)
        if not jobs:
            await queue.wait_for_work(0.2)


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_slot_migration_under_load_loses_nothing(
    redis_cluster: ClusterLayout, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    redis = cluster_queue(redis_cluster, time.time, retention_s=600.0, sweep_interval_s=0.2)
    local = make_local(time.time, tmp_path / "state")  # type: ignore[arg-type]
    queue = ResilientQueue(redis, local, probe_max_s=0.2)
    await queue.start()
    acked: list[str] = []
    completed: dict[str, int] = {}
    stop = asyncio.Event()
    grew = asyncio.Condition()
    tasks = [asyncio.create_task(_produce(queue, acked, grew, stop)) for _ in range(2)]
    tasks += [asyncio.create_task(_work(queue, completed, grew, stop)) for _ in range(2)]
    try:
        # One budget for the whole test, inside pytest-timeout's: a stall fails here.
        async with asyncio.timeout(LOAD_TIMEOUT_S):
            await _load_reaches(grew, lambda: len(acked) >= 500, tasks)  # the load is under way
            slot = key_slot(redis.keys.pending.encode())
            source = redis_cluster.owner(slot)
            target = next(n for n in redis_cluster.nodes if n is not source)
            before_move = len(acked)
            moved = await in_thread(
                redis_cluster.migrate_slot, slot, target, timeout_s=MIGRATE_TIMEOUT_S
            )
            assert redis_cluster.owner(slot) is target
            at_move = len(acked)
            # The load goes on against the new owner.
            await _load_reaches(grew, lambda: len(acked) >= at_move + 500, tasks)
            await _stop_load(stop, grew)
            await settle(tasks, SETTLE_S)
            await queue.wait_until(queue.backlog_moved, LOAD_TIMEOUT_S)
            await _drain(queue, completed)
    finally:
        await _stop_load(stop, grew)
        try:
            await settle(tasks, SETTLE_S)  # re-raises what a load task raised
        finally:
            await queue.close()
    lost = [q for q in acked if q not in completed]
    twice = [q for q, n in completed.items() if n > 1]
    counts = {"acknowledged": len(acked), "keys_moved": moved, "lost": len(lost),
              "acked_while_moving": at_move - before_move,
              "settled_twice": len(twice), "failovers": queue.failover.failovers}  # fmt: skip
    for k, v in counts.items():
        record_property(k, v)
    print("cluster slot migration:", counts)
    assert moved > 0
    assert at_move > before_move, "no load ran while the slot moved"
    assert lost == []


async def _load_reaches(
    grew: asyncio.Condition, enough: Callable[[], bool], tasks: list[asyncio.Task[None]]
) -> None:
    """Wait until enough() holds; a load task that ends first fails the test at once."""

    async def reached() -> None:
        async with grew:
            await grew.wait_for(enough)

    waiter = asyncio.create_task(reached())
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    ended = [t for t in tasks if t.done()]
    if ended:  # the finally's settle() raises what it raised
        raise AssertionError(f"a load task ended before the load did: {ended[0]!r}")


async def _drain(queue: ResilientQueue, completed: dict[str, int]) -> None:
    """Complete everything left, leases that lapsed during the move included."""
    while (stats := await queue.stats()).queued or stats.processing:
        jobs = await queue.dequeue(100, 30.0)
        # At once: concurrent completes share round trips (one by one, a loaded machine
        # spent the test's whole budget here).
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(queue.complete(job.queue_id, job.lease_id or ""))
        for job in jobs:
            completed[job.queue_id] = completed.get(job.queue_id, 0) + 1
        await queue.wait_for_work(0.2)  # leases lapsing during the move come back


async def test_replica_ack_on_a_cluster_waits_on_the_slot_owner(
    redis_cluster: ClusterLayout,
) -> None:
    # These primaries have no replicas: WAIT 1, sent to the node that owns the queue's slot,
    # can never be met, so the enqueue is refused as not durable (and the probe too).
    queue = cluster_queue(
        redis_cluster, time.time, retention_s=60.0, sweep_interval_s=None,
        min_replicas_ack=1, replicas_ack_timeout_ms=50,
    )  # fmt: skip
    await queue.start()
    try:
        with pytest.raises(BackendUnavailable) as info:
            await queue.enqueue([make_request(time.time)])
        assert info.value.details["kind"] == "replicas"
        with pytest.raises(BackendUnavailable):
            await queue.probe()
    finally:
        await queue.close()
