"""The named queues over a real redis-server: each outbox queue fails over to its own local
store and moves back under its own keys; `take` of a request in the middle of a hand-over."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.config import Settings
from sidecar.models import QueueStatus
from sidecar.queue.build import NamedQueues, build_queues
from sidecar.queue.resilient import ResilientQueue
from tests.support.helpers import make_request
from tests.support.redis_server import RedisServer

# Real redis-servers that the tests kill and restart: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

RECOVERY_TIMEOUT_S = 20.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as s:
        yield s


@pytest.fixture
async def queues(server: RedisServer, tmp_path: Path) -> AsyncIterator[NamedQueues]:
    settings = Settings.from_env({
        "REDIS_URL": server.url,
        "REDIS_TIMEOUT_SECONDS": "0.3",
        "REDIS_CONNECT_TIMEOUT_SECONDS": "0.3",
        "REDIS_PROBE_INITIAL_SECONDS": "0.02",
        "REDIS_PROBE_MAX_SECONDS": "0.2",
        "SIDECAR_STATE_DIR": str(tmp_path / "state"),
        "SIDECAR_JOURNAL_FSYNC": "off",
    })  # fmt: skip
    named = build_queues(settings)
    await named.start()
    try:
        yield named
    finally:
        await named.close(2.0)


def resilient(named: NamedQueues, name: str) -> ResilientQueue:
    store = named.stores[name]
    assert isinstance(store, ResilientQueue)
    return store


async def test_the_queues_share_one_redis_client_under_their_own_keys(
    server: RedisServer, queues: NamedQueues
) -> None:
    stacks = [resilient(queues, name) for name in ("requests", "deliveries", "pickups")]
    assert len({id(s.redis._redis) for s in stacks}) == 1  # one client, one pool
    assert [s.redis.keys.pending for s in stacks] == [
        "{sidecar}:pending",  # the request queue's keys, as they always were
        "{sidecar:deliveries}:pending",
        "{sidecar:pickups}:pending",
    ]
    clock = time.time
    await queues.requests.enqueue([make_request(clock, "req", queue_id="x")])
    await queues.stores["deliveries"].enqueue([make_request(clock, "res", queue_id="x")])
    raw = Redis.from_url(server.url)
    try:
        assert await raw.exists("{sidecar}:req:x", "{sidecar:deliveries}:req:x") == 2
        assert await raw.exists("{sidecar:pickups}:req:x") == 0
    finally:
        await raw.aclose()


async def test_a_delivery_enqueued_while_redis_is_down_moves_to_redis_when_it_returns(
    server: RedisServer, queues: NamedQueues
) -> None:
    deliveries = resilient(queues, "deliveries")
    server.kill()
    clock = time.time
    outcome = await deliveries.enqueue([make_request(clock, {"url": "u"}, queue_id="d-1")])
    assert outcome[0].created
    assert deliveries.local.holds("d-1")  # the same call went to the local store
    assert not deliveries.redis_up
    server.restart()
    await deliveries.wait_until(deliveries.backlog_moved, RECOVERY_TIMEOUT_S)
    assert not deliveries.local.holds("d-1")
    moved = await deliveries.redis.status("d-1")
    assert moved is not None and moved.status is QueueStatus.QUEUED
    taken = await deliveries.take("d-1", 30.0)
    assert taken is not None and taken.lease_id is not None
    await deliveries.complete("d-1", taken.lease_id)
    assert await deliveries.status("d-1") is None  # retention 0: deleted once completed


@pytest.mark.parametrize("move", ["confirmed", "returned"])
async def test_take_of_a_request_being_moved_waits_for_the_move(
    queues: NamedQueues, move: str
) -> None:
    """A request pending in at most one store: a take during its batch's move answers from
    whichever store holds it once the move ends, never from both, never None."""
    pickups = resilient(queues, "pickups")
    local = pickups.local
    await local.enqueue([make_request(time.time, {"r": 1}, queue_id="m-1")])
    batch = await local.take_for_handover(10)  # what the mover does first
    assert [r.queue_id for r in batch] == ["m-1"]
    taking = asyncio.create_task(pickups.take("m-1", 30.0))
    await asyncio.sleep(0.05)
    assert not taking.done()  # it waits for the move of its batch
    if move == "confirmed":
        await pickups.redis.enqueue(batch)
        await local.confirm_handover(["m-1"])
    else:
        await local.return_handover(["m-1"])
    pickups.failover.changed()
    got = await asyncio.wait_for(taking, 5.0)
    assert got is not None and got.status is QueueStatus.PROCESSING
    in_redis = await pickups.redis.status("m-1")
    if move == "confirmed":
        assert not local.holds("m-1")
        assert in_redis is not None and in_redis.lease_id == got.lease_id
    else:
        assert in_redis is None
        here = await local.status("m-1")
        assert here is not None and here.lease_id == got.lease_id
    assert await pickups.take("m-1", 30.0) is None
