"""REDIS_MIN_REPLICAS_ACK: an enqueue is acknowledged from Redis only once replicas have it.

Real servers on loopback: a primary alone (WAIT can never be met) and a primary with a replica.
A write the replicas did not confirm is answered from the local queue and, once replicas
confirm again, the two copies are reconciled so the request runs once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.errors import BackendUnavailable
from sidecar.models import QueueStatus
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient import ResilientQueue
from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import redis_queue_for
from tests.support.redis_topology import TcpRedis, cli, wait_replica_linked

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

WAIT_MS = 100
RECOVERY_TIMEOUT_S = 20.0


@pytest.fixture
def lone_primary() -> Iterator[TcpRedis]:
    with TcpRedis() as primary:
        yield primary


def _queue(primary: TcpRedis, clock: FakeClock, min_replicas: int = 1) -> RedisQueue:
    return redis_queue_for(
        f"redis://127.0.0.1:{primary.port}/0",
        clock,
        retention_s=600.0,
        min_replicas_ack=min_replicas,
        replicas_ack_timeout_ms=WAIT_MS,
        sweep_interval_s=None,
    )


async def test_without_a_replica_the_enqueue_is_not_acknowledged(
    lone_primary: TcpRedis, clock: FakeClock
) -> None:
    queue = _queue(lone_primary, clock)
    await queue.start()
    try:
        req = make_request(clock)
        flushes = queue.flushes
        with pytest.raises(BackendUnavailable) as info:
            await queue.enqueue([req])
        assert info.value.details["kind"] == "replicas"
        # WAIT rode in the script's own pipeline: one round trip, not two.
        assert queue.flushes == flushes + 1
        # The primary has it (that is why recovery must reconcile), only not durably.
        stored = await queue.status(req.queue_id)
        assert stored is not None and stored.status is QueueStatus.QUEUED
        with pytest.raises(BackendUnavailable):
            await queue.probe()  # the probe asks for the same confirmation
        # Reads and settles are not held to it: a worker still dequeues from this primary.
        [job] = await queue.dequeue(1, 30.0)
        assert job.queue_id == req.queue_id
    finally:
        await queue.close()


async def test_with_a_replica_the_enqueue_is_acknowledged(
    lone_primary: TcpRedis, clock: FakeClock
) -> None:
    with TcpRedis(("--replicaof", "127.0.0.1", str(lone_primary.port))) as replica:
        wait_replica_linked(replica)
        queue = _queue(lone_primary, clock)
        await queue.start()
        try:
            [res] = await queue.enqueue([make_request(clock)])
            assert res.created
            await queue.probe()
            key = queue.keys.request(res.request.queue_id)
            assert cli(replica.port, "HGET", key, "status") == "queued"
        finally:
            await queue.close()


async def test_unconfirmed_enqueue_is_answered_locally_and_runs_once(
    lone_primary: TcpRedis, clock: FakeClock, tmp_path: Path
) -> None:
    redis = _queue(lone_primary, clock)
    queue = ResilientQueue(redis, make_local(clock, tmp_path / "state"), probe_max_s=0.2)
    await queue.start()
    try:
        req = make_request(clock)
        [res] = await queue.enqueue([req])
        assert res.created
        assert queue.mode == "local_fallback"
        assert queue.local.uncertain_ids() == [req.queue_id]
        # A replica arrives: the probe's WAIT passes, the copies are reconciled.
        with TcpRedis(("--replicaof", "127.0.0.1", str(lone_primary.port))) as replica:
            wait_replica_linked(replica)
            await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
            assert queue.local.uncertain_ids() == []
            jobs = await queue.dequeue(10, 30.0)
            assert [j.queue_id for j in jobs] == [req.queue_id]
            assert await queue.dequeue(10, 30.0) == []
            await queue.complete(req.queue_id, jobs[0].lease_id or "")
            stats = await queue.stats()
            assert (stats.accepted, stats.completed, stats.queued) == (1, 1, 0)
    finally:
        await queue.close()


def test_the_socket_waits_for_wait_on_top_of_the_command_timeout() -> None:
    from sidecar.config import Settings
    from sidecar.queue.redis.io import _client_options

    plain = _client_options(Settings(redis_timeout_s=1.0))
    waiting = _client_options(
        Settings(redis_timeout_s=1.0, redis_min_replicas_ack=1, redis_replicas_ack_timeout_ms=400)
    )
    assert (plain["socket_timeout"], waiting["socket_timeout"]) == (1.0, 1.4)

