"""The contract both stores keep (docs/architecture.md), run unchanged against every store the
`store` fixture yields."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from sidecar.errors import InvalidState, LeaseMismatch, NotFound
from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.base import QueueStore, job_bytes
from tests.conftest import CONTRACT_LEASE_S, CONTRACT_RETENTION_S, DEAD_RETENTION_FACTOR
from tests.support.helpers import FakeClock, make_request

LEASE = CONTRACT_LEASE_S


async def test_enqueue_then_status_reads_queued(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock, {"prompt": "hello", "n": [1, 2, 3]}, priority=3)
    [res] = await store.enqueue([req])
    assert res.created
    got = await store.status(req.queue_id)
    assert got is not None
    assert got.status is QueueStatus.QUEUED
    assert got.priority == 3
    assert got.attempts == 0
    assert got.payload == req.payload
    assert req.payload is not None and got.size_bytes == len(req.payload)
    assert got.expires_at == pytest.approx(req.created_at + 3600.0)


async def test_dequeue_order_is_priority_then_arrival(
    store: QueueStore, clock: FakeClock
) -> None:
    specs = [(5, "a"), (1, "b"), (5, "c"), (0, "d"), (1, "e"), (9, "f"), (5, "g")]
    reqs = []
    for prio, name in specs:
        reqs.append(make_request(clock, name, priority=prio, queue_id=f"q-{name}"))
        clock.advance(0.001)
    await store.enqueue(reqs[:4])
    await store.enqueue(reqs[4:])
    got = await store.dequeue(100, LEASE)
    assert [r.queue_id for r in got] == ["q-d", "q-b", "q-e", "q-a", "q-c", "q-g", "q-f"]


async def test_dequeue_takes_at_most_n_and_empty_gives_nothing(
    store: QueueStore, clock: FakeClock
) -> None:
    assert await store.dequeue(5, LEASE) == []
    await store.enqueue([make_request(clock, i) for i in range(4)])
    first = await store.dequeue(3, LEASE)
    second = await store.dequeue(3, LEASE)
    assert len(first) == 3
    assert len(second) == 1
    assert await store.dequeue(3, LEASE) == []


async def test_dequeue_stops_before_the_job_that_would_pass_max_bytes(
    store: QueueStore, clock: FakeClock
) -> None:
    reqs = [make_request(clock, "x" * 900, queue_id=f"b-{i}") for i in range(5)]
    await store.enqueue(reqs)
    one = job_bytes(reqs[0].size_bytes, "b-0", "l" * 16)  # lease ids are 16 characters
    got = await store.dequeue(5, LEASE, max_bytes=2 * one + one // 2)
    assert [r.queue_id for r in got] == ["b-0", "b-1"]  # the third would pass the budget
    assert sum(job_bytes(r.size_bytes, r.queue_id, r.lease_id or "") for r in got) <= 2 * one
    # A budget smaller than one job still hands out one; the rest stay first in line, in order.
    [third] = await store.dequeue(5, LEASE, max_bytes=1)
    assert third.queue_id == "b-2"
    rest = await store.dequeue(5, LEASE, max_bytes=10 * one)
    assert [r.queue_id for r in rest] == ["b-3", "b-4"]
    for r in [*got, third, *rest]:
        rec = await store.status(r.queue_id)
        assert rec is not None and rec.status is QueueStatus.PROCESSING


async def test_dequeue_leases_the_request(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.status is QueueStatus.PROCESSING
    assert job.attempts == 1
    assert job.lease_id
    assert job.lease_expires_at == pytest.approx(clock() + LEASE)
    assert job.payload == req.payload
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.PROCESSING


async def test_complete_keeps_metadata_only_and_repeats_harmlessly(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    done = await store.complete(job.queue_id, job.lease_id)
    assert done.status is QueueStatus.COMPLETED
    again = await store.complete(job.queue_id, job.lease_id)
    assert again.status is QueueStatus.COMPLETED
    st = await store.status(req.queue_id)
    assert st is not None
    assert st.status is QueueStatus.COMPLETED
    assert st.payload is None
    assert await store.dequeue(1, LEASE) == []


@pytest.mark.parametrize("retry", [True, False])
async def test_fail_repeats_harmlessly_until_the_next_lease(
    store: QueueStore, clock: FakeClock, retry: bool
) -> None:
    """A fail resent with the same lease answers the request as it is now, in every store."""
    req = make_request(clock)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    first = await store.fail(job.queue_id, job.lease_id, "provider down", retry)
    again = await store.fail(job.queue_id, job.lease_id, "provider down", retry)
    assert (again.status, again.reason, again.attempts) == (
        first.status,
        first.reason,
        first.attempts,
    )
    assert first.status is (QueueStatus.QUEUED if retry else QueueStatus.FAILED)
    if retry:
        # Once handed out again, the old lease's fail is stale, not a repeat.
        [second] = await store.dequeue(1, LEASE)
        with pytest.raises(LeaseMismatch):
            await store.fail(job.queue_id, job.lease_id, "provider down", retry)
        assert second.lease_id is not None
        await store.complete(second.queue_id, second.lease_id)
        with pytest.raises(InvalidState):
            await store.fail(job.queue_id, job.lease_id, "provider down", retry)


async def test_settling_needs_the_current_lease(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock)
    await store.enqueue([req])
    with pytest.raises(InvalidState):
        await store.complete(req.queue_id, "0000")
    [job] = await store.dequeue(1, LEASE)
    with pytest.raises(LeaseMismatch):
        await store.complete(job.queue_id, "not-the-lease")
    with pytest.raises(LeaseMismatch):
        await store.fail(job.queue_id, "not-the-lease", "x", retry=True)
    with pytest.raises(LeaseMismatch):
        await store.extend(job.queue_id, "not-the-lease", LEASE)
    with pytest.raises(NotFound):
        await store.complete("no-such-id", "x")
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.PROCESSING


async def test_fail_with_retry_requeues_until_attempts_run_out(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock, max_attempts=2)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    back = await store.fail(job.queue_id, job.lease_id, "provider 503", retry=True)
    assert back.status is QueueStatus.QUEUED
    assert back.attempts == 1
    [job2] = await store.dequeue(1, LEASE)
    assert job2.attempts == 2
    assert job2.lease_id is not None and job2.lease_id != job.lease_id
    final = await store.fail(job2.queue_id, job2.lease_id, "provider 503", retry=True)
    assert final.status is QueueStatus.FAILED
    assert final.reason is not None and "provider 503" in final.reason
    assert await store.dequeue(1, LEASE) == []


async def test_fail_without_retry_is_final(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock, max_attempts=5)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    final = await store.fail(job.queue_id, job.lease_id, "bad request", retry=False)
    assert final.status is QueueStatus.FAILED
    assert final.reason == "bad request"
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.FAILED


async def test_retried_request_keeps_its_place_among_equals(
    store: QueueStore, clock: FakeClock
) -> None:
    first = make_request(clock, queue_id="first")
    clock.advance(0.01)
    second = make_request(clock, queue_id="second")
    await store.enqueue([first, second])
    [job] = await store.dequeue(1, LEASE)
    assert job.queue_id == "first" and job.lease_id is not None
    await store.fail(job.queue_id, job.lease_id, "transient", retry=True)
    [again] = await store.dequeue(1, LEASE)
    assert again.queue_id == "first"


async def test_lapsed_lease_puts_the_request_back(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock, max_attempts=2)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    clock.advance(LEASE + 1)
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.QUEUED
    with pytest.raises(InvalidState):
        await store.complete(job.queue_id, job.lease_id)
    [job2] = await store.dequeue(1, LEASE)
    assert job2.attempts == 2
    clock.advance(LEASE + 1)
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.FAILED
    assert st.reason is not None and "lease_expired" in st.reason


async def test_extend_keeps_the_lease_alive(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    clock.advance(LEASE - 5)
    ext = await store.extend(job.queue_id, job.lease_id, LEASE)
    assert ext.lease_expires_at == pytest.approx(clock() + LEASE)
    clock.advance(LEASE - 5)  # past the original end, inside the extension
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.PROCESSING
    done = await store.complete(job.queue_id, job.lease_id)
    assert done.status is QueueStatus.COMPLETED


async def test_expired_request_is_never_handed_out(
    store: QueueStore, clock: FakeClock
) -> None:
    short = make_request(clock, "short", ttl_s=10, priority=0)
    long = make_request(clock, "long", ttl_s=1000, priority=9)
    await store.enqueue([short, long])
    clock.advance(11)
    got = await store.dequeue(10, LEASE)
    assert [r.queue_id for r in got] == [long.queue_id]
    st = await store.status(short.queue_id)
    assert st is not None
    assert st.status is QueueStatus.EXPIRED
    stats = await store.stats()
    assert stats.expired == 1
    assert stats.max_expired_age_s is not None and stats.max_expired_age_s >= 10


async def test_expiry_is_counted_without_a_dequeue(
    store: QueueStore, clock: FakeClock
) -> None:
    await store.enqueue([make_request(clock, ttl_s=5) for _ in range(3)])
    clock.advance(6)
    stats = await store.stats()
    assert stats.expired == 3
    assert stats.queued == 0
    assert stats.balanced


async def test_lease_lapse_after_ttl_expires_the_request(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock, ttl_s=LEASE / 2)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    clock.advance(LEASE + 1)
    st = await store.status(job.queue_id)
    assert st is not None and st.status is QueueStatus.EXPIRED


async def test_terminal_status_is_readable_until_retention_ends(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    await store.complete(job.queue_id, job.lease_id)
    clock.advance(CONTRACT_RETENTION_S - 1)
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.COMPLETED
    clock.advance(2)
    assert await store.status(req.queue_id) is None


async def test_expired_status_is_retained_too(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock, ttl_s=10)
    await store.enqueue([req])
    clock.advance(11)
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.EXPIRED
    # Expired unprocessed: a dead letter, kept for the dead retention (not the shorter one).
    clock.advance(CONTRACT_RETENTION_S * DEAD_RETENTION_FACTOR - 2)
    st = await store.status(req.queue_id)
    assert st is not None and st.status is QueueStatus.EXPIRED
    clock.advance(5)
    assert await store.status(req.queue_id) is None


async def test_cancel_only_a_queued_request(store: QueueStore, clock: FakeClock) -> None:
    a = make_request(clock)
    b = make_request(clock)
    await store.enqueue([a, b])
    cancelled = await store.cancel(a.queue_id)
    assert cancelled.status is QueueStatus.FAILED
    assert cancelled.reason == "cancelled"
    [job] = await store.dequeue(5, LEASE)
    assert job.queue_id == b.queue_id
    with pytest.raises(InvalidState):
        await store.cancel(b.queue_id)
    with pytest.raises(InvalidState):
        await store.cancel(a.queue_id)
    with pytest.raises(NotFound):
        await store.cancel("nope")
    st = await store.status(a.queue_id)
    assert st is not None and st.reason == "cancelled"


async def test_enqueue_is_idempotent_by_queue_id(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock, "original", queue_id="client-chosen-1")
    [first] = await store.enqueue([req])
    dup = make_request(clock, "second copy", queue_id="client-chosen-1", priority=0)
    [second] = await store.enqueue([dup])
    assert first.created and not second.created
    assert second.request.payload == req.payload
    assert second.request.priority == req.priority
    [again, twin] = await store.enqueue(
        [make_request(clock, queue_id="pair"), make_request(clock, queue_id="pair")]
    )
    assert again.created and not twin.created
    got = await store.dequeue(10, LEASE)
    assert sorted(r.queue_id for r in got) == ["client-chosen-1", "pair"]
    assert (await store.stats()).accepted == 2


async def test_enqueue_of_a_settled_id_returns_the_settled_entry(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock, queue_id="done-once")
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    await store.complete(job.queue_id, job.lease_id)
    [res] = await store.enqueue([make_request(clock, queue_id="done-once")])
    assert not res.created
    assert res.request.status is QueueStatus.COMPLETED
    assert await store.dequeue(1, LEASE) == []


async def test_payload_bytes_come_back_exactly(store: QueueStore, clock: FakeClock) -> None:
    bodies: list[object] = [
        {"messages": [{"role": "user", "content": "héllo ✓"}]},
        b"\x00\xff" * 100,
        [1, 2.5, None, True, "x" * 5000],
    ]
    reqs = [make_request(clock, body) for body in bodies]
    await store.enqueue(reqs)
    got = await store.dequeue(10, LEASE)
    by_id = {r.queue_id: r for r in got}
    for req, body in zip(reqs, bodies, strict=True):
        payload = by_id[req.queue_id].payload
        assert payload == req.payload
        assert payload is not None and msgspec.msgpack.decode(payload) == body


async def test_stats_books_balance(store: QueueStore, clock: FakeClock) -> None:
    # Two short-TTL requests at the back of the line, eight long-lived ones in front.
    short = [make_request(clock, i, ttl_s=100, priority=9) for i in range(2)]
    long = [make_request(clock, i, ttl_s=10_000, priority=1) for i in range(8)]
    await store.enqueue(short + long)
    jobs = await store.dequeue(5, 1000.0)  # leases outlive the clock step below
    for job in jobs[:2]:
        assert job.lease_id is not None
        await store.complete(job.queue_id, job.lease_id)
    assert jobs[2].lease_id is not None
    await store.fail(jobs[2].queue_id, jobs[2].lease_id, "no", retry=False)
    await store.cancel(long[5].queue_id)
    clock.advance(200)  # the short-TTL requests expire, still queued
    stats = await store.stats()
    assert (stats.accepted, stats.completed, stats.failed, stats.expired) == (10, 2, 2, 2)
    assert (stats.queued, stats.processing) == (2, 2)
    assert stats.balanced, stats


async def test_wait_for_work_wakes_on_enqueue(store: QueueStore, clock: FakeClock) -> None:
    waiter = asyncio.create_task(store.wait_for_work(30))
    await asyncio.sleep(0)  # let the waiter start waiting
    await store.enqueue([make_request(clock)])
    await asyncio.wait_for(waiter, 5)
    assert len(await store.dequeue(1, LEASE)) == 1


async def test_health_is_ok_when_fresh(store: QueueStore) -> None:
    report = await store.health()
    assert report.status == "ok"


# -- fail with delay_s: back to queued, held back until now + delay_s ---------------------------


async def _failed_with_delay(
    store: QueueStore, clock: FakeClock, delay_s: float, ttl_s: float = 3600.0
) -> str:
    req = make_request(clock, queue_id="delayed", ttl_s=ttl_s)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    back = await store.fail(job.queue_id, job.lease_id, "provider 429", True, delay_s)
    assert back.status is QueueStatus.QUEUED and back.reason == "provider 429"
    return req.queue_id


async def test_delayed_retry_is_held_back_until_its_time(
    store: QueueStore, clock: FakeClock
) -> None:
    qid = await _failed_with_delay(store, clock, 10.0)
    st = await store.status(qid)
    assert st is not None and st.status is QueueStatus.QUEUED
    assert await store.dequeue(1, LEASE) == []
    clock.advance(9.5)
    assert await store.dequeue(1, LEASE) == []
    stats = await store.stats()
    assert stats.queued == 1 and stats.balanced, stats
    clock.advance(1)
    [again] = await store.dequeue(1, LEASE)
    assert again.queue_id == qid and again.attempts == 2


async def test_delayed_retry_keeps_its_place_among_equals(
    store: QueueStore, clock: FakeClock
) -> None:
    first = make_request(clock, queue_id="first")
    clock.advance(0.01)
    second = make_request(clock, queue_id="second")
    clock.advance(0.01)
    third = make_request(clock, queue_id="third")
    await store.enqueue([first, second, third])
    [job] = await store.dequeue(1, LEASE)
    assert job.queue_id == "first" and job.lease_id is not None
    await store.fail(job.queue_id, job.lease_id, "busy", True, 5.0)
    clock.advance(6)
    got = await store.dequeue(2, LEASE)
    assert [j.queue_id for j in got] == ["first", "second"]


async def test_delayed_retry_still_expires_on_its_ttl(
    store: QueueStore, clock: FakeClock
) -> None:
    qid = await _failed_with_delay(store, clock, 50.0, ttl_s=10)
    clock.advance(11)
    st = await store.status(qid)
    assert st is not None and st.status is QueueStatus.EXPIRED
    clock.advance(50)
    assert await store.dequeue(1, LEASE) == []
    stats = await store.stats()
    assert (stats.queued, stats.expired) == (0, 1) and stats.balanced, stats


async def test_delayed_retry_can_be_cancelled_while_it_waits(
    store: QueueStore, clock: FakeClock
) -> None:
    qid = await _failed_with_delay(store, clock, 10.0)
    gone = await store.cancel(qid)
    assert gone.status is QueueStatus.FAILED and gone.reason == "cancelled"
    clock.advance(11)
    assert await store.dequeue(1, LEASE) == []
    stats = await store.stats()
    assert (stats.queued, stats.failed) == (0, 1) and stats.balanced, stats


async def test_delayed_fail_repeats_harmlessly(store: QueueStore, clock: FakeClock) -> None:
    req = make_request(clock)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    await store.fail(job.queue_id, job.lease_id, "later", True, 10.0)
    again = await store.fail(job.queue_id, job.lease_id, "later", True, 10.0)
    assert again.status is QueueStatus.QUEUED
    assert await store.dequeue(1, LEASE) == []
    clock.advance(11)
    assert len(await store.dequeue(5, LEASE)) == 1


async def test_a_delay_without_retry_fails_at_once(
    store: QueueStore, clock: FakeClock
) -> None:
    req = make_request(clock, max_attempts=5)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    final = await store.fail(job.queue_id, job.lease_id, "bad prompt", False, 10.0)
    assert final.status is QueueStatus.FAILED and final.reason == "bad prompt"


@pytest.mark.slow
async def test_wait_for_work_wakes_when_a_delay_ends(
    store: QueueStore, clock: FakeClock
) -> None:
    await _failed_with_delay(store, clock, 5.0)
    clock.advance(6)
    # The delay ended without any enqueue or requeue: the store must notice by itself.
    await asyncio.wait_for(store.wait_for_work(30), 10)
    assert len(await store.dequeue(1, LEASE)) == 1


# -- fail with counts false: the delivery is not counted, only the TTL bounds the wait ---------


async def _leased(
    store: QueueStore, clock: FakeClock, *, max_attempts: int = 3, ttl_s: float = 3600.0
) -> QueuedRequest:
    req = make_request(clock, queue_id="waits", max_attempts=max_attempts, ttl_s=ttl_s)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None and job.attempts == 1
    return job


async def test_an_uncounted_fail_never_exhausts_the_attempts(
    store: QueueStore, clock: FakeClock
) -> None:
    job = await _leased(store, clock, max_attempts=2)
    for _ in range(5):  # more waits than max_attempts
        assert job.lease_id is not None
        back = await store.fail(job.queue_id, job.lease_id, "provider 503", True, 0.0, False)
        assert (back.status, back.attempts, back.reason) == (
            QueueStatus.QUEUED,
            0,
            "provider 503",
        )
        [job] = await store.dequeue(1, LEASE)
        assert job.attempts == 1  # each delivery it was handed out in is given back
    st = await store.status(job.queue_id)
    assert st is not None and st.status is QueueStatus.PROCESSING and st.attempts == 1


async def test_a_counted_fail_still_exhausts_the_attempts_after_uncounted_ones(
    store: QueueStore, clock: FakeClock
) -> None:
    job = await _leased(store, clock, max_attempts=2)
    assert job.lease_id is not None
    await store.fail(job.queue_id, job.lease_id, "provider down", True, 0.0, False)
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None
    back = await store.fail(job.queue_id, job.lease_id, "worker error", True)
    assert back.status is QueueStatus.QUEUED and back.attempts == 1
    [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None and job.attempts == 2
    final = await store.fail(job.queue_id, job.lease_id, "worker error", True)
    assert (final.status, final.reason) == (
        QueueStatus.FAILED,
        "attempts_exhausted: worker error",
    )
    assert await store.dequeue(1, LEASE) == []


async def test_a_lapsed_lease_still_counts_after_an_uncounted_fail(
    store: QueueStore, clock: FakeClock
) -> None:
    job = await _leased(store, clock, max_attempts=1)
    assert job.lease_id is not None
    await store.fail(job.queue_id, job.lease_id, "provider down", True, 0.0, False)
    [job] = await store.dequeue(1, LEASE)
    assert job.attempts == 1
    clock.advance(LEASE + 1)
    st = await store.status(job.queue_id)
    assert st is not None and st.status is QueueStatus.FAILED
    assert st.reason == "attempts_exhausted: lease_expired"


async def test_an_uncounted_wait_ends_at_the_ttl(store: QueueStore, clock: FakeClock) -> None:
    job = await _leased(store, clock, max_attempts=1, ttl_s=100)
    for _ in range(3):
        assert job.lease_id is not None
        back = await store.fail(job.queue_id, job.lease_id, "provider down", True, 30.0, False)
        assert back.status is QueueStatus.QUEUED
        clock.advance(31)
        [job] = await store.dequeue(1, LEASE)
    assert job.lease_id is not None  # now 93 s old: the next wait passes its TTL
    await store.fail(job.queue_id, job.lease_id, "provider down", True, 30.0, False)
    clock.advance(8)
    st = await store.status(job.queue_id)
    assert st is not None and (st.status, st.reason) == (QueueStatus.EXPIRED, "ttl_elapsed")
    assert await store.dequeue(1, LEASE) == []
    stats = await store.stats()
    assert (stats.queued, stats.expired, stats.failed) == (0, 1, 0) and stats.balanced, stats


async def test_an_uncounted_fail_repeats_without_giving_back_twice(
    store: QueueStore, clock: FakeClock
) -> None:
    first = await _leased(store, clock)
    assert first.lease_id is not None
    await store.fail(first.queue_id, first.lease_id, "later", True, 0.0, False)
    [job] = await store.dequeue(1, LEASE)  # attempts 1 again
    assert job.lease_id is not None and job.attempts == 1
    back = await store.fail(job.queue_id, job.lease_id, "later", True, 10.0, False)
    assert back.attempts == 0
    for _ in range(2):  # a client's retry, or the same script run again
        again = await store.fail(job.queue_id, job.lease_id, "later", True, 10.0, False)
        assert (again.status, again.attempts) == (QueueStatus.QUEUED, 0)
    with pytest.raises(InvalidState):  # an older lease is no repeat, and changes nothing
        await store.fail(first.queue_id, first.lease_id, "later", True, 0.0, False)
    st = await store.status(job.queue_id)
    assert st is not None and st.attempts == 0
    clock.advance(11)
    [again_job] = await store.dequeue(1, LEASE)
    assert again_job.attempts == 1


async def test_an_uncounted_fail_holds_the_request_for_its_delay(
    store: QueueStore, clock: FakeClock
) -> None:
    job = await _leased(store, clock)
    assert job.lease_id is not None
    back = await store.fail(job.queue_id, job.lease_id, "provider 429", True, 10.0, False)
    assert back.status is QueueStatus.QUEUED and back.attempts == 0
    assert await store.dequeue(1, LEASE) == []
    clock.advance(9.5)
    assert await store.dequeue(1, LEASE) == []
    stats = await store.stats()
    assert stats.queued == 1 and stats.balanced, stats
    clock.advance(1)
    [again] = await store.dequeue(1, LEASE)
    assert again.queue_id == job.queue_id and again.attempts == 1


async def test_counts_false_without_retry_fails_for_good_and_counts(
    store: QueueStore, clock: FakeClock
) -> None:
    job = await _leased(store, clock, max_attempts=5)
    assert job.lease_id is not None
    final = await store.fail(job.queue_id, job.lease_id, "bad prompt", False, 0.0, False)
    assert (final.status, final.reason, final.attempts) == (QueueStatus.FAILED, "bad prompt", 1)


# -- QUEUE_RETENTION_HOURS=0: a terminal record is forgotten at once ----------------------------


async def test_without_retention_an_expired_request_is_not_found_at_once(
    store_no_retention: QueueStore, clock: FakeClock
) -> None:
    store = store_no_retention
    req = make_request(clock, ttl_s=10)
    await store.enqueue([req])
    queued = await store.status(req.queue_id)
    assert queued is not None and queued.status is QueueStatus.QUEUED
    assert await store.status(req.queue_id) == queued  # a read changes nothing
    clock.advance(11)
    # Past its retention the moment it expired: the first read already finds nothing, and
    # no read hands back a record it stamped.
    assert await store.status(req.queue_id) is None
    assert await store.status(req.queue_id) is None
    stats = await store.stats()
    assert stats.expired == 1 and stats.queued == 0
    assert stats.balanced


async def test_without_retention_a_lease_lapsed_past_its_ttl_is_not_found(
    store_no_retention: QueueStore, clock: FakeClock
) -> None:
    store = store_no_retention
    req = make_request(clock, ttl_s=LEASE / 2)
    await store.enqueue([req])
    [job] = await store.dequeue(1, LEASE)
    clock.advance(LEASE + 1)
    assert await store.status(job.queue_id) is None
    assert (await store.stats()).expired == 1
