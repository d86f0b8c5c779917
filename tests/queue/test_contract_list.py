"""The operators' ops in the contract: list, requeue and purge, and dead letters, run against
every store the `store` fixture yields."""

from __future__ import annotations

import msgspec
import pytest

from sidecar.config import Settings
from sidecar.errors import InvalidMessage, InvalidState, NotFound
from sidecar.models import ListPosition, ListQuery, ListStatus, QueueStatus
from sidecar.protocol import List, ListResult, Requeue, RequeueResult
from sidecar.queue.base import QueueStore
from sidecar.server.ops import Ops
from tests.conftest import CONTRACT_LEASE_S, CONTRACT_RETENTION_S
from tests.support.helpers import FakeClock, make_request

LEASE = CONTRACT_LEASE_S


async def _all(
    store: QueueStore, status: ListStatus, *, limit: int = 2, newest: bool = False,
    priority: int | None = None, payload: bool = False,
) -> list[str]:  # fmt: skip
    """Every queue_id of a status, page by page (small pages, so the cursor is exercised)."""
    ids: list[str] = []
    after: ListPosition | None = None
    for _ in range(100):
        query = ListQuery(
            status=status, priority=priority, newest=newest, limit=limit, payload=payload
        )
        page = await store.list_records(query, after)
        assert len(page.items) <= limit
        ids += [rec.queue_id for _, rec in page.items]
        if page.next is None:
            return ids
        after = page.next
    raise AssertionError("the pages never ended")


async def _dead(store: QueueStore, clock: FakeClock, name: str, priority: int = 5) -> str:
    """A request failed for good (a fail without retry): a dead letter."""
    await store.enqueue([make_request(clock, {"n": name}, queue_id=name, priority=priority)])
    [job] = await store.dequeue(1, LEASE)
    assert job.queue_id == name
    await store.fail(name, job.lease_id or "", "bad request", retry=False)
    return name


async def test_list_queued_in_arrival_order_both_ways(store: QueueStore, clock: FakeClock) -> None:
    names = [f"q{i}" for i in range(7)]
    for i, name in enumerate(names):
        await store.enqueue([make_request(clock, i, queue_id=name, priority=i % 3)])
        clock.advance(0.01)
    assert await _all(store, ListStatus.QUEUED) == names
    assert await _all(store, ListStatus.QUEUED, newest=True) == names[::-1]
    assert await _all(store, ListStatus.QUEUED, priority=1) == ["q1", "q4"]
    assert await _all(store, ListStatus.PROCESSING) == []


async def test_list_names_the_store_and_shows_payload_only_when_asked(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock, {"prompt": "p"}, queue_id="one")
    await store.enqueue([req])
    page = await store.list_records(ListQuery(status=ListStatus.QUEUED), None)
    [(where, rec)] = page.items
    assert where in store.store_names
    assert rec.payload is None
    page = await store.list_records(ListQuery(status=ListStatus.QUEUED, payload=True), None)
    assert page.items[0][1].payload == req.payload


async def test_list_each_status(store: QueueStore, clock: FakeClock) -> None:
    await store.enqueue([make_request(clock, i, queue_id=f"r{i}", ttl_s=60) for i in range(5)])
    jobs = await store.dequeue(3, LEASE)
    by_id = {j.queue_id: j for j in jobs}
    await store.complete("r0", by_id["r0"].lease_id or "")
    await store.fail("r1", by_id["r1"].lease_id or "", "later", retry=True, delay_s=30)
    assert await _all(store, ListStatus.PROCESSING) == ["r2"]
    assert await _all(store, ListStatus.DELAYED) == ["r1"]
    assert await _all(store, ListStatus.QUEUED) == ["r3", "r4"]
    assert await _all(store, ListStatus.COMPLETED) == ["r0"]
    clock.advance(61)  # past every TTL: r1, r3, r4 (and r2, its lease lapsed) are dead letters
    await store.stats()
    assert sorted(await _all(store, ListStatus.EXPIRED)) == ["r1", "r2", "r3", "r4"]
    assert await _all(store, ListStatus.QUEUED) == []


async def test_dead_letter_keeps_its_payload_past_the_retention(
    store: QueueStore, clock: FakeClock
) -> None:
    await _dead(store, clock, "d1")
    clock.advance(CONTRACT_RETENTION_S + 1)  # past the retention of completed records
    rec = await store.status("d1")
    assert rec is not None and rec.status is QueueStatus.FAILED
    assert msgspec.msgpack.decode(rec.payload or b"") == {"n": "d1"}
    stats = await store.stats()
    assert stats.dead_letters == 1 and stats.dead_letters_bytes > 0
    page = await store.list_records(ListQuery(status=ListStatus.FAILED, payload=True), None)
    assert [(r.queue_id, r.reason) for _, r in page.items] == [("d1", "bad request")]


async def test_a_cancelled_request_is_not_a_dead_letter(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, queue_id="c1")])
    await store.cancel("c1")
    assert await _all(store, ListStatus.FAILED) == []
    assert (await store.stats()).dead_letters == 0
    with pytest.raises(InvalidState):
        await store.requeue_dead(["c1"])


async def test_requeue_puts_a_dead_letter_back_and_is_safe_to_repeat(
    store: QueueStore, clock: FakeClock
) -> None:
    await _dead(store, clock, "d1")
    clock.advance(5)
    done = await store.requeue_dead(["d1"])
    assert done.requeued == ["d1"] and done.unchanged == []
    rec = await store.status("d1")
    assert rec is not None and rec.status is QueueStatus.QUEUED and rec.attempts == 0
    again = await store.requeue_dead(["d1"])
    assert again.requeued == [] and again.unchanged == ["d1"]
    [job] = await store.dequeue(5, LEASE)
    assert job.queue_id == "d1" and msgspec.msgpack.decode(job.payload or b"") == {"n": "d1"}
    assert job.attempts == 1
    stats = await store.stats()
    assert stats.dead_letters == 0 and stats.balanced


async def test_requeue_of_unknown_or_completed_is_refused(
    store: QueueStore, clock: FakeClock
) -> None:
    with pytest.raises(NotFound):
        await store.requeue_dead(["nope"])
    await store.enqueue([make_request(clock, queue_id="ok")])
    [job] = await store.dequeue(1, LEASE)
    await store.complete("ok", job.lease_id or "")
    with pytest.raises(InvalidState):
        await store.requeue_dead(["ok"])


async def test_requeue_of_an_expired_one_gives_it_its_ttl_anew(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, queue_id="e1", ttl_s=10)])
    clock.advance(11)
    rec = await store.status("e1")
    assert rec is not None and rec.status is QueueStatus.EXPIRED
    await store.requeue_dead(["e1"])
    [job] = await store.dequeue(1, LEASE)
    assert job.queue_id == "e1" and job.expires_at == pytest.approx(clock() + 10, abs=0.01)


async def test_purge_by_status_and_age(store: QueueStore, clock: FakeClock) -> None:
    for name in ("a", "b"):
        await store.enqueue([make_request(clock, queue_id=name)])
        [job] = await store.dequeue(1, LEASE)
        await store.complete(name, job.lease_id or "")
        clock.advance(100)
    await _dead(store, clock, "d1")
    assert await store.purge_records(ListStatus.COMPLETED, 150) == 1  # a only
    assert await store.status("a") is None and await store.status("b") is not None
    assert await store.purge_records(ListStatus.COMPLETED, None) == 1
    assert await store.status("b") is None
    assert await store.status("d1") is not None  # another status: kept
    assert await store.purge_records(ListStatus.FAILED, None) == 1
    assert await store.status("d1") is None
    assert (await store.stats()).dead_letters == 0


async def test_purge_of_queued_ends_them_failed_and_the_books_balance(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, i, queue_id=f"p{i}") for i in range(3)])
    assert await store.purge_records(ListStatus.QUEUED, None) == 3
    assert await store.dequeue(5, LEASE) == []
    assert await store.status("p0") is None
    stats = await store.stats()
    assert stats.queued == 0 and stats.failed == 3 and stats.balanced
    assert stats.dead_letters == 0


async def test_requeue_by_filter_takes_the_oldest_of_a_priority_up_to_the_cap(
    store: QueueStore, clock: FakeClock
) -> None:
    ops = Ops(Settings.from_env({}), store, clock=clock)
    for name, priority in (("a", 3), ("b", 5), ("c", 3), ("d", 3)):
        await _dead(store, clock, name, priority=priority)
        clock.advance(1)
    done = await ops.handle(Requeue(id=1, status="failed", priority=3, limit=2))
    assert isinstance(done, RequeueResult)
    assert (done.requeued, done.ids) == (2, ["a", "c"])
    assert await _all(store, ListStatus.FAILED) == ["b", "d"]
    assert await _all(store, ListStatus.QUEUED) == ["a", "c"]
    with pytest.raises(InvalidMessage):  # only dead letters' statuses
        await ops.handle(Requeue(id=2, status="completed"))


async def test_list_through_the_op_pages_with_a_cursor(store: QueueStore, clock: FakeClock) -> None:
    ops = Ops(Settings.from_env({}), store, clock=clock)
    await store.enqueue([make_request(clock, i, queue_id=f"c{i:02d}") for i in range(25)])
    seen: list[str] = []
    cursor = None
    while True:
        page = await ops.handle(List(id=1, status="queued", limit=10, cursor=cursor))
        assert isinstance(page, ListResult) and len(page.items) <= 10
        seen += [i.queue_id for i in page.items]
        assert all(i.store in store.store_names for i in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"c{i:02d}" for i in range(25)]


async def test_list_with_payloads_stays_within_the_frame(
    store: QueueStore, clock: FakeClock
) -> None:
    frame = 4096
    ops = Ops(Settings.from_env({"SIDECAR_MAX_FRAME_BYTES": str(frame)}), store, clock=clock)
    names = [f"big{i}" for i in range(7)]
    for name in names:
        await store.enqueue([make_request(clock, "x" * 1200, queue_id=name)])
        clock.advance(0.01)
    await store.enqueue([make_request(clock, "y" * 6000, queue_id="huge")])  # alone past it
    seen: list[str] = []
    sizes: list[int] = []
    cursor = None
    for _ in range(20):
        page = await ops.handle(
            List(id=1, status="queued", limit=1000, payload=True, cursor=cursor)
        )
        assert isinstance(page, ListResult) and page.items
        seen += [i.queue_id for i in page.items]
        sizes.append(len(page.items))
        if len(page.items) > 1:
            assert len(msgspec.msgpack.encode(page)) <= frame
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [*names, "huge"]  # each once, in order, the cursor after the last returned
    assert max(sizes) < len(names)  # the bound cut the pages


async def test_requeue_checks_every_id_before_changing_any(
    store: QueueStore, clock: FakeClock
) -> None:
    await _dead(store, clock, "d1")
    with pytest.raises(NotFound) as err:
        await store.requeue_dead(["d1", "nope"])
    assert err.value.details["queue_id"] == "nope"
    st = await store.status("d1")
    assert st is not None and st.status is QueueStatus.FAILED  # nothing was requeued
    assert (await store.requeue_dead(["d1"])).requeued == ["d1"]


class _VanishingStore:
    """A store whose oldest dead letter is purged between the filter's list and its requeue
    (as the sweep or the cap's trim may do)."""

    def __init__(self, store: QueueStore) -> None:
        self._store = store
        self._once = True

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def requeue_dead(self, queue_ids: list[str]) -> object:
        if self._once:
            self._once = False
            await self._store.purge_records(ListStatus.FAILED, older_than_s=5)
        return await self._store.requeue_dead(queue_ids)


async def test_requeue_by_filter_skips_a_dead_letter_that_left(
    store: QueueStore, clock: FakeClock
) -> None:
    await _dead(store, clock, "old")
    clock.advance(10)
    await _dead(store, clock, "new")
    ops = Ops(Settings.from_env({}), _VanishingStore(store), clock=clock)  # type: ignore[arg-type]
    done = await ops.handle(Requeue(id=1, status="failed", limit=10))
    assert isinstance(done, RequeueResult)
    assert (done.ids, done.unchanged) == (["new"], ["old"])
    assert await _all(store, ListStatus.QUEUED) == ["new"]
