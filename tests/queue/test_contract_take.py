"""The contract of `take` (lease the one request a queue_id names, if it is queued), run
unchanged against every store the `store` fixture yields: the pick-up of a result by its caller
is take, hand it over, complete."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import LeaseMismatch
from sidecar.models import QueueStatus
from sidecar.queue.base import QueueStore
from tests.conftest import CONTRACT_LEASE_S
from tests.support.helpers import FakeClock, make_request

LEASE = CONTRACT_LEASE_S


async def test_take_leases_the_named_request_with_its_payload(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock, {"result": "ok"}, queue_id="r-1")
    await store.enqueue([req])
    got = await store.take("r-1", LEASE)
    assert got is not None
    assert got.queue_id == "r-1"
    assert got.status is QueueStatus.PROCESSING
    assert got.payload == req.payload
    assert got.attempts == 1
    assert got.lease_id
    assert got.lease_expires_at == pytest.approx(clock() + LEASE)
    now = await store.status("r-1")
    assert now is not None and now.status is QueueStatus.PROCESSING
    assert now.lease_id == got.lease_id
    # Leased: a second take finds nothing to take, and a dequeue does not hand it out.
    assert await store.take("r-1", LEASE) is None
    assert await store.dequeue(5, LEASE) == []
    done = await store.complete("r-1", got.lease_id)
    assert done.status is QueueStatus.COMPLETED


async def test_take_of_an_unknown_id_is_none(store: QueueStore, clock: FakeClock) -> None:
    await store.enqueue([make_request(clock, queue_id="other")])
    assert await store.take("never-enqueued", LEASE) is None
    other = await store.status("other")
    assert other is not None and other.status is QueueStatus.QUEUED


async def test_take_of_a_finished_request_is_none(store: QueueStore, clock: FakeClock) -> None:
    await store.enqueue([make_request(clock, queue_id="c"), make_request(clock, queue_id="x")])
    leased = await store.take("c", LEASE)
    assert leased is not None and leased.lease_id is not None
    await store.complete("c", leased.lease_id)
    await store.cancel("x")
    assert await store.take("c", LEASE) is None
    assert await store.take("x", LEASE) is None
    done = await store.status("c")
    assert done is not None and done.status is QueueStatus.COMPLETED


async def test_take_never_hands_out_an_expired_request(store: QueueStore, clock: FakeClock) -> None:
    await store.enqueue([make_request(clock, queue_id="old", ttl_s=10.0)])
    clock.advance(11.0)
    assert await store.take("old", LEASE) is None
    rec = await store.status("old")
    assert rec is not None and rec.status is QueueStatus.EXPIRED


async def test_take_picks_one_out_of_line_and_leaves_the_order_of_the_rest(
    store: QueueStore, clock: FakeClock
) -> None:
    reqs = []
    for name in "abcd":
        reqs.append(make_request(clock, name, queue_id=f"o-{name}"))
        clock.advance(0.001)
    await store.enqueue(reqs)
    got = await store.take("o-c", LEASE)
    assert got is not None
    rest = await store.dequeue(10, LEASE)
    assert [r.queue_id for r in rest] == ["o-a", "o-b", "o-d"]


async def test_take_leases_a_request_held_back_by_a_delay(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, queue_id="held")])
    [first] = await store.dequeue(1, LEASE)
    assert first.lease_id is not None
    await store.fail("held", first.lease_id, "receiver down", retry=True, delay_s=LEASE / 3)
    got = await store.take("held", LEASE)
    assert got is not None and got.status is QueueStatus.PROCESSING
    assert got.attempts == 2
    # Past the delay (within the lease) it is still leased, never handed out a second time.
    clock.advance(LEASE / 2)
    assert await store.dequeue(5, LEASE) == []
    # Its lease lapses: back in line at once (the delay it had is over).
    clock.advance(LEASE / 2 + 1.0)
    [again] = await store.dequeue(5, LEASE)
    assert again.queue_id == "held" and again.attempts == 3


async def test_a_lapsed_take_can_be_taken_again(store: QueueStore, clock: FakeClock) -> None:
    """A taker that crashed: its lease lapses and the entry is taken again, nothing lost."""
    await store.enqueue([make_request(clock, queue_id="crash", max_attempts=5)])
    first = await store.take("crash", LEASE)
    assert first is not None and first.lease_id is not None
    clock.advance(LEASE + 1.0)
    second = await store.take("crash", LEASE)
    assert second is not None and second.lease_id is not None
    assert second.lease_id != first.lease_id
    assert second.attempts == 2
    with pytest.raises(LeaseMismatch):
        await store.complete("crash", first.lease_id)
    done = await store.complete("crash", second.lease_id)
    assert done.status is QueueStatus.COMPLETED


async def test_of_two_concurrent_takes_exactly_one_gets_it(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, queue_id=f"race-{i}") for i in range(5)])
    outcomes = await asyncio.gather(
        *(store.take(f"race-{i}", LEASE) for i in range(5) for _ in range(2))
    )
    for i in range(5):
        pair = outcomes[2 * i : 2 * i + 2]
        assert sum(o is not None for o in pair) == 1, pair
    stats = await store.stats()
    assert stats.processing == 5 and stats.queued == 0


async def test_without_retention_a_taken_and_completed_entry_is_gone_at_once(
    store_no_retention: QueueStore, clock: FakeClock
) -> None:
    """The outbox queues' stores: a result picked up is deleted once completed."""
    store = store_no_retention
    await store.enqueue([make_request(clock, {"result": 1}, queue_id="pick")])
    got = await store.take("pick", LEASE)
    assert got is not None and got.lease_id is not None
    done = await store.complete("pick", got.lease_id)
    assert done.status is QueueStatus.COMPLETED
    assert await store.status("pick") is None
    assert await store.take("pick", LEASE) is None
