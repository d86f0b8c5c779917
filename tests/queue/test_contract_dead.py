"""Dead letters turned off, in every store variant: with `QUEUE_MAX_DEAD=0` (or
`QUEUE_MAX_DEAD_MB=0`) or `QUEUE_DEAD_RETENTION_HOURS=0` a request that fails for good or
expires keeps no payload, and its status stays readable for the ordinary retention
(protocol.md 7.12): never forgotten at once, never counted as a dead letter dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import InvalidState
from sidecar.models import ListQuery, ListStatus, QueueStatus
from sidecar.queue.base import QueueStore
from sidecar.queue.resilient import ResilientQueue
from tests.conftest import CONTRACT_LEASE_S, CONTRACT_RETENTION_S, make_local
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import make_fakeredis_contract_store, make_redis_contract_store
from tests.support.redis_topology import make_cluster_contract_store

# The variants of tests/conftest.py's `store`; all but the first local and Redis ones are slow.
_VARIANTS = {"local": False, "local_fsync": True, "redis": False, "redis_scripts": True,
             "fakeredis": True, "resilient": True, "cluster": True}  # fmt: skip
# How dead letters are turned off: no room for any, or no time to keep them.
_OFF: dict[str, dict[str, Any]] = {
    "max_dead_0": {"max_dead": 0},
    "dead_retention_0": {"dead_retention_s": 0.0},
}


def _build(
    variant: str, off: dict[str, Any], request: pytest.FixtureRequest, clock: FakeClock,
    tmp_path: Path,
) -> QueueStore:  # fmt: skip
    options: dict[str, Any] = {"dead_retention_s": CONTRACT_RETENTION_S * 10, **off}
    state = tmp_path / "state"
    if variant in ("local", "local_fsync"):
        return make_local(clock, state, fsync=variant == "local_fsync", **options)
    if variant == "redis":
        return make_redis_contract_store(request, clock, CONTRACT_RETENTION_S, **options)
    if variant == "redis_scripts":
        return make_redis_contract_store(
            request, clock, CONTRACT_RETENTION_S, functions=False, **options
        )
    if variant == "fakeredis":
        return make_fakeredis_contract_store(clock, CONTRACT_RETENTION_S, **options)
    if variant == "cluster":
        return make_cluster_contract_store(request, clock, CONTRACT_RETENTION_S, **options)
    assert variant == "resilient"
    redis = make_redis_contract_store(request, clock, CONTRACT_RETENTION_S, **options)
    return ResilientQueue(redis, make_local(clock, state, **options))


@pytest.fixture(
    params=[
        pytest.param((v, k), id=f"{v}-{k}", marks=[pytest.mark.slow] if slow else [])
        for v, slow in _VARIANTS.items()
        for k in _OFF
    ]
)
async def undead(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[QueueStore]:
    """Each store variant with dead letters turned off one way or the other."""
    variant, off = request.param
    store = _build(variant, _OFF[off], request, clock, tmp_path)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_a_request_failed_for_good_keeps_its_status_for_the_ordinary_retention(
    undead: QueueStore, clock: FakeClock
) -> None:
    store = undead
    await store.enqueue([make_request(clock, {"p": 1}, queue_id="f1", max_attempts=1)])
    [job] = await store.dequeue(1, CONTRACT_LEASE_S)
    await store.fail("f1", job.lease_id or "", "provider said 400", retry=False)
    clock.advance(1)  # a tick or two later: the record is still there, payload gone
    rec = await store.status("f1")
    assert rec is not None and rec.status is QueueStatus.FAILED
    assert rec.reason == "provider said 400" and rec.payload is None
    stats = await store.stats()
    assert (stats.failed, stats.dead_letters, stats.dead_letters_dropped) == (1, 0, 0)
    assert stats.balanced
    page = await store.list_records(ListQuery(status=ListStatus.FAILED), None)
    assert page.items == []  # only dead letters are listed as failed
    with pytest.raises(InvalidState):
        await store.requeue_dead(["f1"])
    clock.advance(CONTRACT_RETENTION_S - 3)
    assert (await store.status("f1")) is not None
    clock.advance(3)
    assert await store.status("f1") is None
    assert (await store.stats()).dead_letters_dropped == 0


async def test_an_expired_request_keeps_its_status_for_the_ordinary_retention(
    undead: QueueStore, clock: FakeClock
) -> None:
    store = undead
    await store.enqueue([make_request(clock, {"p": 2}, queue_id="e1", ttl_s=10)])
    clock.advance(11)
    rec = await store.status("e1")
    assert rec is not None and rec.status is QueueStatus.EXPIRED and rec.payload is None
    clock.advance(1)
    assert (await store.status("e1")) is not None
    stats = await store.stats()
    assert (stats.expired, stats.dead_letters, stats.dead_letters_dropped) == (1, 0, 0)
    clock.advance(CONTRACT_RETENTION_S)
    assert await store.status("e1") is None
