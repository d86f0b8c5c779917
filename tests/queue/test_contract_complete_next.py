"""complete_next (protocol.md 8.12) on every store the `store` fixture yields: one settle and
the next leases, the leases standing whether or not the settle succeeds."""

from __future__ import annotations

from sidecar.errors import InvalidState, LeaseMismatch, NotFound
from sidecar.models import QueueStatus
from sidecar.queue.base import QueueStore, job_bytes
from tests.conftest import CONTRACT_LEASE_S
from tests.support.helpers import FakeClock, make_request

LEASE = CONTRACT_LEASE_S


async def _status(store: QueueStore, queue_id: str) -> QueueStatus:
    rec = await store.status(queue_id)
    assert rec is not None
    return rec.status


async def test_completes_one_and_leases_the_next_in_order(
    store: QueueStore, clock: FakeClock
) -> None:
    specs = [(5, "a"), (1, "b"), (5, "c"), (0, "d")]
    await store.enqueue([make_request(clock, n, priority=p, queue_id=f"q-{n}") for p, n in specs])
    [first] = await store.dequeue(1, LEASE)
    assert first.queue_id == "q-d" and first.lease_id is not None
    got = await store.complete_next(first.queue_id, first.lease_id, 2, LEASE, None)
    assert got.error is None
    assert got.completed is not None and got.completed.status is QueueStatus.COMPLETED
    assert got.completed.queue_id == "q-d"
    assert [r.queue_id for r in got.leased] == ["q-b", "q-a"]
    for rec in got.leased:
        assert rec.status is QueueStatus.PROCESSING and rec.lease_id
        assert rec.attempts == 1 and rec.payload is not None
        assert await _status(store, rec.queue_id) is QueueStatus.PROCESSING
    assert await _status(store, "q-d") is QueueStatus.COMPLETED
    assert await _status(store, "q-c") is QueueStatus.QUEUED


async def test_an_empty_queue_still_settles(store: QueueStore, clock: FakeClock) -> None:
    await store.enqueue([make_request(clock, queue_id="only")])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    got = await store.complete_next("only", job.lease_id, 4, LEASE, None)
    assert (got.error, got.leased) == (None, [])
    assert got.completed is not None and got.completed.status is QueueStatus.COMPLETED
    stats = await store.stats()
    assert (stats.completed, stats.processing, stats.queued) == (1, 0, 0)


async def test_a_lost_lease_is_reported_and_the_next_jobs_are_leased_anyway(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, i, queue_id=f"j-{i}") for i in range(3)])
    [job] = await store.dequeue(1, LEASE)
    got = await store.complete_next(job.queue_id, "not-the-lease", 5, LEASE, None)
    assert isinstance(got.error, LeaseMismatch)
    assert got.error.details == {"queue_id": job.queue_id}
    assert got.completed is None
    assert sorted(r.queue_id for r in got.leased) == ["j-1", "j-2"]
    # The failed settle changed nothing: the request is still leased by its worker.
    assert await _status(store, job.queue_id) is QueueStatus.PROCESSING
    assert (await store.stats()).completed == 0


async def test_an_unknown_or_unleased_request_is_reported_in_the_outcome(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, queue_id="waiting")])
    got = await store.complete_next("no-such-id", "x", 1, LEASE, None)
    assert isinstance(got.error, NotFound) and got.completed is None
    [leased] = got.leased  # the only queued request, leased although the settle failed
    assert leased.queue_id == "waiting"
    await store.enqueue([make_request(clock, queue_id="queued")])
    got = await store.complete_next("queued", "x", 1, LEASE, None)
    assert isinstance(got.error, InvalidState)
    # It was the one queued request: the leasing half took it after the settle was refused.
    assert [r.queue_id for r in got.leased] == ["queued"]


async def test_a_repeated_complete_next_settles_nothing_new_but_leases_again(
    store: QueueStore, clock: FakeClock
) -> None:
    """Why the registry marks it not resend-safe: the settle repeats harmlessly, leasing not."""
    await store.enqueue([make_request(clock, i, queue_id=f"r-{i}") for i in range(3)])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    first = await store.complete_next(job.queue_id, job.lease_id, 1, LEASE, None)
    again = await store.complete_next(job.queue_id, job.lease_id, 1, LEASE, None)
    assert first.completed is not None and again.completed is not None
    assert again.error is None and again.completed.status is QueueStatus.COMPLETED
    assert [r.queue_id for r in first.leased] == ["r-1"]
    assert [r.queue_id for r in again.leased] == ["r-2"]
    assert (await store.stats()).completed == 1


async def test_the_leases_keep_to_max_bytes(store: QueueStore, clock: FakeClock) -> None:
    reqs = [make_request(clock, "x" * 900, queue_id=f"b-{i}") for i in range(5)]
    await store.enqueue(reqs)
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    one = job_bytes(reqs[0].size_bytes, "b-0", "l" * 16)
    got = await store.complete_next(job.queue_id, job.lease_id, 5, LEASE, 2 * one + one // 2)
    assert got.error is None
    assert [r.queue_id for r in got.leased] == ["b-1", "b-2"]
    assert await _status(store, "b-3") is QueueStatus.QUEUED
