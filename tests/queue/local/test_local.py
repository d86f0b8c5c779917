"""LocalQueue beyond the shared contract: limits, the watermark breaker, memory accounting."""

from __future__ import annotations

import gc
import random
import tracemalloc
from pathlib import Path

import msgspec
import pytest

from sidecar.config import Settings
from sidecar.errors import QueueFull
from sidecar.protocol import Enqueue, EnqueueItem, decode_request, encode_frame
from sidecar.queue.local import LocalQueue
from sidecar.server.ops import Ops
from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request


async def fill(queue: LocalQueue, clock: FakeClock, n: int) -> None:
    for i in range(n):
        await queue.enqueue([make_request(clock, i)])


async def test_breaker_opens_at_high_and_closes_at_low(clock: FakeClock) -> None:
    q = make_local(clock, max_items=10, high_watermark=0.8, low_watermark=0.5)
    await fill(q, clock, 8)  # 8/10 = the high watermark: the breaker opens
    assert (await q.stats()).breaker_open
    with pytest.raises(QueueFull) as info:
        await q.enqueue([make_request(clock)])
    assert info.value.details["reason"] == "high_watermark"
    assert info.value.details["items"] == 8
    assert info.value.details["retry_after_s"] >= 0
    assert (await q.health()).status == "degraded"
    jobs = await q.dequeue(3, 30)
    for job in jobs[:2]:
        assert job.lease_id is not None
        await q.complete(job.queue_id, job.lease_id)
    # 6/10 is between the watermarks: still refusing, so the breaker does not flap.
    with pytest.raises(QueueFull):
        await q.enqueue([make_request(clock)])
    assert jobs[2].lease_id is not None
    await q.complete(jobs[2].queue_id, jobs[2].lease_id)  # 5/10: the low watermark
    await q.enqueue([make_request(clock)])
    stats = await q.stats()
    assert not stats.breaker_open
    assert stats.rejections == {"high_watermark": 2}
    assert stats.accepted == 9 and stats.balanced


async def test_hard_limits_hold_with_watermarks_at_the_top(clock: FakeClock) -> None:
    q = make_local(clock, max_items=5, high_watermark=1.0, low_watermark=0.99)
    await fill(q, clock, 4)
    with pytest.raises(QueueFull) as info:
        await q.enqueue([make_request(clock, i) for i in range(2)])
    assert info.value.details["reason"] == "max_size"
    assert (await q.stats()).items == 4  # all or none: the batch stored nothing
    await fill(q, clock, 1)
    with pytest.raises(QueueFull):
        await q.enqueue([make_request(clock)])
    assert (await q.stats()).items == 5


async def test_memory_limit_refuses_what_does_not_fit(clock: FakeClock) -> None:
    q = make_local(clock, max_bytes=50_000, high_watermark=1.0, low_watermark=0.9)
    await q.enqueue([make_request(clock, "x" * 20_000)])
    with pytest.raises(QueueFull) as info:
        await q.enqueue([make_request(clock, "y" * 40_000)])
    assert info.value.details["reason"] == "max_memory"
    stats = await q.stats()
    assert stats.items == 1 and stats.bytes <= 50_000


async def test_nothing_queued_is_evicted_when_full(clock: FakeClock) -> None:
    q = make_local(clock, max_items=100, high_watermark=0.5, low_watermark=0.2)
    ids = []
    rejected = 0
    for i in range(300):
        try:
            [res] = await q.enqueue([make_request(clock, i)])
            ids.append(res.request.queue_id)
        except QueueFull:
            rejected += 1
    assert len(ids) == 50 and rejected == 250
    for qid in ids:
        st = await q.status(qid)
        assert st is not None and st.status.value == "queued"


async def test_existing_ids_are_returned_even_when_full(clock: FakeClock) -> None:
    q = make_local(clock, max_items=2, high_watermark=1.0, low_watermark=0.5)
    await q.enqueue([make_request(clock, queue_id="a"), make_request(clock, queue_id="b")])
    [again] = await q.enqueue([make_request(clock, queue_id="a")])
    assert not again.created


@pytest.mark.slow
@pytest.mark.parametrize("journaled", [False, True])
async def test_reported_bytes_match_the_real_heap_cost(
    clock: FakeClock, tmp_path: Path, journaled: bool
) -> None:
    """Within ±10% of tracemalloc, for thousands of requests of mixed sizes (10 B to 16 KiB).

    The requests arrive the way the server receives them: as Enqueue frames decoded by the
    real codec and turned into records by the real op handler. With the journal too: what it
    keeps in memory (nothing per request once written) must not escape the count.
    """
    rnd = random.Random(7)
    frames = []
    for i in range(4000):
        size = int(10 * (1600 ** rnd.random()))
        item = EnqueueItem(
            payload=msgspec.Raw(msgspec.msgpack.encode({"prompt": "p" * size})),
            priority=rnd.randint(0, 9),
        )
        frames.append(encode_frame(Enqueue(id=i, items=[item]))[4:])
    queue = make_local(clock, tmp_path if journaled else None, max_items=10**6, max_bytes=10**10)
    await queue.start()
    ops = Ops(Settings.from_env({}), queue, clock=clock)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in frames:
            await ops.handle(decode_request(body))
            clock.advance(0.001)
        # Lease a third of them, so processing requests are counted as well.
        await queue.dequeue(1300, 60)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    reported = (await queue.stats()).bytes
    print(f"tracemalloc={used} reported={reported} ratio={reported / used:.3f}")
    assert 0.9 * used <= reported <= 1.1 * used


async def test_index_heaps_stay_bounded_when_drained_as_filled(clock: FakeClock) -> None:
    q = make_local(clock, retention_s=0)
    for i in range(2000):
        await q.enqueue([make_request(clock, i, ttl_s=4 * 3600)])
        [job] = await q.dequeue(1, 30)
        assert job.lease_id is not None
        await q.complete(job.queue_id, job.lease_id)
    assert len(q._state.expiry) <= 64 + 1 and len(q._state.ready) <= 64 + 1
    assert (await q.stats()).items == 0


async def test_retained_records_are_capped_and_the_cut_is_reported(clock: FakeClock) -> None:
    q = LocalQueue(
        max_items=100,
        max_bytes=10**8,
        high_watermark=0.8,
        low_watermark=0.6,
        retention_s=3600,
        max_retained=10,
        clock=clock,
    )
    ids = []
    for i in range(15):
        [res] = await q.enqueue([make_request(clock, i)])
        await q.cancel(res.request.queue_id)
        ids.append(res.request.queue_id)
    stats = await q.stats()
    assert stats.retained == 10 and stats.retention_cut == 5
    assert stats.warnings and "forgotten before their retention ended" in stats.warnings[0]
    assert [await q.status(i) for i in ids[:5]] == [None] * 5  # the oldest went first
    assert None not in [await q.status(i) for i in ids[5:]]
    assert stats.balanced
