"""Dead letters and the operators' ops on a real Redis: requeue all or none, list past an
orphan and within a byte bound, the caps trimmed before a new dead letter is indexed."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from redis.asyncio import Redis

from sidecar.errors import NotFound
from sidecar.models import ListQuery, ListStatus, QueueStatus
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient import ResilientQueue
from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)

LEASE_S = 30.0


async def _dead(queue: RedisQueue, clock: FakeClock, name: str, size: int = 10) -> None:
    await queue.enqueue([make_request(clock, "x" * size, queue_id=name)])
    jobs = await queue.dequeue(1, LEASE_S)
    assert jobs and jobs[0].lease_id is not None
    await queue.fail(jobs[0].queue_id, jobs[0].lease_id, "boom", retry=False)


async def test_requeue_is_all_or_none(make_queue: QueueFactory, clock: FakeClock) -> None:
    queue = await make_queue(dead_retention_s=3600.0)
    await _dead(queue, clock, "d1")
    with pytest.raises(NotFound) as err:
        await queue.requeue_dead(["d1", "nope"])
    assert err.value.details == {"queue_id": "nope"}
    st = await queue.status("d1")
    assert st is not None and st.status is QueueStatus.FAILED  # nothing changed
    done = await queue.requeue_dead(["d1"])
    assert done.requeued == ["d1"]


async def test_list_queued_skips_an_orphan(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("a", "b", "c")])
    await raw.delete(queue.keys.request("b"))
    page = await queue.list_records(ListQuery(status=ListStatus.QUEUED, limit=10), None)
    assert [r.queue_id for _, r in page.items] == ["a", "c"]


async def test_fail_at_the_cap_keeps_the_new_dead_letter(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    # A daemon with a shorter dead retention (or a clock behind) makes a dead letter that is
    # the oldest by its end of retention: the trim must not drop the one being made.
    long = await make_queue(dead_retention_s=3600.0, max_dead=2)
    for name in ("d1", "d2"):
        clock.advance(1)
        await _dead(long, clock, name)
    short = await make_queue(dead_retention_s=60.0, max_dead=2)
    await _dead(short, clock, "d3")  # answered, not internal_error
    st = await short.status("d3")
    assert st is not None and st.status is QueueStatus.FAILED and st.payload is not None
    assert await short.status("d1") is None  # the oldest by arrival in the index went
    stats = await short.stats()
    assert (stats.dead_letters, stats.dead_letters_dropped) == (2, 1)
    assert stats.dead_letters_bytes == 2 * st.size_bytes


async def test_the_sweep_logs_dropped_dead_letters(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue(dead_retention_s=3600.0, max_dead=1)
    await queue.sweep()  # the counter as first seen
    with structlog.testing.capture_logs() as logs:
        for name in ("d1", "d2", "d3"):
            clock.advance(1)
            await _dead(queue, clock, name)
        await queue.sweep()  # no stats call: the sweep notices the drops
    dropped = [e for e in logs if e["event"] == "dead_letters_dropped"]
    assert [(e["count"], e["total"]) for e in dropped] == [(2, 2)]


async def test_byte_cap_drops_the_oldest(make_queue: QueueFactory, clock: FakeClock) -> None:
    queue = await make_queue(dead_retention_s=3600.0, max_dead_bytes=250)
    for name in ("d1", "d2", "d3"):
        clock.advance(1)
        await _dead(queue, clock, name, size=100)
    stats = await queue.stats()
    assert (stats.dead_letters, stats.dead_letters_dropped) == (2, 1)
    assert 200 <= stats.dead_letters_bytes <= 250
    assert await queue.status("d1") is None


async def test_dead_letter_has_no_native_ttl(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue(dead_retention_s=3600.0)
    await _dead(queue, clock, "d1")
    assert await raw.pttl(queue.keys.request("d1")) == -1


async def test_resilient_requeue_checks_redis_before_the_local_store_changes(
    make_queue: QueueFactory, clock: FakeClock, tmp_path: Path
) -> None:
    redis = await make_queue(dead_retention_s=3600.0)
    local = make_local(clock, tmp_path / "state", retention_s=60.0, dead_retention_s=3600.0)
    manager = ResilientQueue(redis, local)
    await manager.start()
    try:
        # A dead letter the local store holds (as one made while Redis was away).
        await local.enqueue([make_request(clock, "x", queue_id="here")])
        [job] = await local.dequeue(1, LEASE_S)
        await local.fail("here", job.lease_id or "", "boom", retry=False)
        await _dead(redis, clock, "there")
        await redis.purge_records(ListStatus.FAILED, older_than_s=None)  # "there" is gone
        with pytest.raises(NotFound) as err:
            await manager.requeue_dead(["here", "there"])
        assert err.value.details == {"queue_id": "there"}
        st = await local.status("here")
        assert st is not None and st.status is QueueStatus.FAILED  # the local one unchanged
        assert (await manager.requeue_dead(["here"])).requeued == ["here"]
    finally:
        await manager.close()
