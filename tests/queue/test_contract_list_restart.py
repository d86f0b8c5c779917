"""Dead letters across a restart (the local journal, and Redis), requeued afterwards, and the
QUEUE_MAX_DEAD bound: past it the oldest go, counted, in both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from sidecar.models import ListQuery, ListStatus, QueueStatus
from sidecar.queue.base import QueueStore
from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import RedisServer, redis_queue_for, redis_server_fixture

__all__ = ["redis_server_fixture"]

Factory = Callable[..., Awaitable[QueueStore]]


@pytest.fixture(params=["local", "redis"])
async def opened(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[Factory]:
    """Opens the same store again and again (one journal folder, or one redis-server)."""
    made: list[QueueStore] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    async def open_store(**options: float) -> QueueStore:
        options.setdefault("retention_s", 60.0)
        options.setdefault("dead_retention_s", 6000.0)
        store: QueueStore
        if server is None:
            store = make_local(clock, tmp_path / "state", fsync=False, **options)
        else:
            store = redis_queue_for(server.url, clock, sweep_interval_s=None, **options)
        await store.start()
        made.append(store)
        return store

    yield open_store
    for store in made:
        await store.close()


async def _fail_for_good(store: QueueStore, clock: FakeClock, name: str) -> None:
    await store.enqueue([make_request(clock, {"n": name}, queue_id=name, max_attempts=1)])
    [job] = await store.dequeue(1, 30)
    await store.fail(name, job.lease_id or "", "provider said 400", retry=True)


async def test_a_dead_letter_survives_a_restart_and_is_requeued(
    opened: Factory, clock: FakeClock
) -> None:
    first = await opened()
    await _fail_for_good(first, clock, "d1")
    await first.close()
    clock.advance(120)  # past the ordinary retention: only a dead letter is still there
    again = await opened()
    rec = await again.status("d1")
    assert rec is not None and rec.status is QueueStatus.FAILED
    assert rec.reason == "attempts_exhausted: provider said 400"
    assert msgspec.msgpack.decode(rec.payload or b"") == {"n": "d1"}
    page = await again.list_records(ListQuery(status=ListStatus.FAILED), None)
    assert [r.queue_id for _, r in page.items] == ["d1"]
    assert (await again.requeue_dead(["d1"])).requeued == ["d1"]
    [job] = await again.dequeue(1, 30)
    assert job.queue_id == "d1" and job.attempts == 1
    assert msgspec.msgpack.decode(job.payload or b"") == {"n": "d1"}
    stats = await again.stats()
    assert stats.dead_letters == 0 and stats.balanced


async def test_past_max_dead_the_oldest_go_counted(opened: Factory, clock: FakeClock) -> None:
    store = await opened(max_dead=2)
    for name in ("d1", "d2", "d3"):
        await _fail_for_good(store, clock, name)
        clock.advance(1)
    stats = await store.stats()
    assert stats.dead_letters == 2 and stats.dead_letters_dropped == 1
    assert await store.status("d1") is None
    page = await store.list_records(ListQuery(status=ListStatus.FAILED), None)
    assert [r.queue_id for _, r in page.items] == ["d2", "d3"]


async def test_requeues_and_purges_survive_a_restart(opened: Factory, clock: FakeClock) -> None:
    first = await opened()
    for name in ("r1", "r2", "r3"):
        await _fail_for_good(first, clock, name)
    await first.enqueue([make_request(clock, queue_id="q1")])
    assert (await first.requeue_dead(["r1"])).requeued == ["r1"]
    assert await first.purge_records(ListStatus.FAILED, None) == 2  # r2, r3
    before = await first.stats()
    await first.close()
    again = await opened()
    assert await again.status("r2") is None and await again.status("r3") is None
    rec = await again.status("r1")
    assert rec is not None and rec.status is QueueStatus.QUEUED and rec.attempts == 0
    after = await again.stats()
    assert (after.queued, after.dead_letters, after.failed) == (
        before.queued, before.dead_letters, before.failed,
    )  # fmt: skip
    assert after.balanced
    page = await again.list_records(ListQuery(status=ListStatus.QUEUED), None)
    assert [r.queue_id for _, r in page.items] == ["q1", "r1"]


async def test_past_max_dead_bytes_the_oldest_go_counted(opened: Factory, clock: FakeClock) -> None:
    """QUEUE_MAX_DEAD_MB: three dead letters of about 100 KB under a 250 KB cap, in both stores."""
    store = await opened(max_dead_bytes=250_000)
    for name in ("b1", "b2", "b3"):
        await store.enqueue([make_request(clock, {"p": "x" * 100_000}, queue_id=name, ttl_s=5)])
        clock.advance(1)
    clock.advance(5)  # all three expire unprocessed: dead letters
    stats = await store.stats()
    assert stats.dead_letters == 2 and stats.dead_letters_dropped == 1
    assert 200_000 < stats.dead_letters_bytes <= 250_000
    assert await store.status("b1") is None
    page = await store.list_records(ListQuery(status=ListStatus.EXPIRED), None)
    assert [r.queue_id for _, r in page.items] == ["b2", "b3"]
