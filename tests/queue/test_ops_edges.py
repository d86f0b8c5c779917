"""The ops layer above every store: the dequeue reply fits a frame, and fail says what happened.

Run against every store of the contract suite (the `store` fixture of conftest.py: local, a real
redis-server, fakeredis, and the failover manager), with the fake clock.
"""

from __future__ import annotations

import sys

import msgspec
import pytest

from sidecar.config import Settings
from sidecar.protocol import (
    Dequeue,
    DequeueResult,
    Enqueue,
    EnqueueItem,
    Fail,
    OkReply,
    RequestInfo,
    Status,
    encode_frame,
)
from sidecar.queue.base import QueueStore
from sidecar.server.ops import Ops
from tests.support.helpers import FakeClock

FRAME = 64 * 1024
PAYLOAD = 16 * 1024


def ops_for(store: QueueStore, clock: FakeClock, **settings: object) -> Ops:
    values: dict[str, object] = {"max_frame_bytes": FRAME, "max_payload_bytes": PAYLOAD}
    values.update(settings)
    return Ops(Settings(**values), store, clock=clock)  # type: ignore[arg-type]


def payload_of(size: int) -> msgspec.Raw:
    """A bin payload whose encoding is exactly `size` bytes."""
    return msgspec.Raw(msgspec.msgpack.encode(b"x" * (size - 3)))


async def enqueue(ops: Ops, count: int, size: int, ttl_s: float | None = None) -> list[str]:
    items = [EnqueueItem(payload=payload_of(size), ttl_s=ttl_s) for _ in range(count)]
    result = await ops.handle(Enqueue(id=1, items=items))
    return [i.queue_id for i in result.items]  # type: ignore[attr-defined]


def reply_size(result: object) -> int:
    """The frame body length of the reply carrying result, with the widest possible id."""
    return len(encode_frame(OkReply(id=-(2**63), result=result))) - 4


async def test_a_dequeue_reply_never_passes_the_frame_limit(
    store: QueueStore, clock: FakeClock
) -> None:
    """Item 15: 20 payloads of 15 KiB asked at once: as many as fit, the rest stay queued."""
    ops = ops_for(store, clock)
    await enqueue(ops, 20, 15 * 1024)
    result = await ops.handle(Dequeue(id=2, max_items=20))
    assert isinstance(result, DequeueResult)
    taken = len(result.items)
    assert 1 <= taken < 20
    assert reply_size(result) <= FRAME
    stats = await store.stats()
    assert (stats.processing, stats.queued) == (taken, 20 - taken)
    assert stats.balanced
    # Nothing left out was touched: the rest come out whole, over later dequeues.
    seen = {j.queue_id for j in result.items}
    while True:
        more = await ops.handle(Dequeue(id=3, max_items=20))
        assert isinstance(more, DequeueResult)
        if not more.items:
            break
        assert reply_size(more) <= FRAME
        assert all(j.attempts == 1 for j in more.items)
        seen |= {j.queue_id for j in more.items}
    assert len(seen) == 20


async def test_small_payloads_still_come_out_in_one_batch(
    store: QueueStore, clock: FakeClock
) -> None:
    ops = ops_for(store, clock)
    await enqueue(ops, 150, 40)
    result = await ops.handle(Dequeue(id=2, max_items=150))
    assert isinstance(result, DequeueResult)
    assert len(result.items) == 150
    assert reply_size(result) <= FRAME


async def test_one_job_is_always_handed_out(store: QueueStore, clock: FakeClock) -> None:
    """A payload that nearly fills a frame still comes out, within the documented slack."""
    ops = ops_for(store, clock, max_frame_bytes=4096, max_payload_bytes=8192)
    await enqueue(ops, 2, 4000)
    result = await ops.handle(Dequeue(id=2, max_items=5))
    assert isinstance(result, DequeueResult)
    assert len(result.items) == 1
    assert reply_size(result) <= 4096 + 1024  # the slack protocol.md section 3 promises


async def test_fail_with_retry_after_the_ttl_answers_expired(
    store: QueueStore, clock: FakeClock
) -> None:
    """Item 13: the reply to the fail and the next status agree (no 'queued' then 'expired')."""
    ops = ops_for(store, clock)
    [queue_id] = await enqueue(ops, 1, 10, ttl_s=10.0)
    leased = await ops.handle(Dequeue(id=2, lease_s=60.0))
    assert isinstance(leased, DequeueResult)
    [job] = leased.items
    clock.advance(20)
    failed = await ops.handle(Fail(id=3, queue_id=queue_id, lease_id=job.lease_id, reason="x"))
    assert isinstance(failed, RequestInfo)
    after = await ops.handle(Status(id=4, queue_id=queue_id))
    assert isinstance(after, RequestInfo)
    assert (
        (failed.status, failed.reason) == (after.status, after.reason) == ("expired", "ttl_elapsed")
    )
    assert (await store.stats()).balanced


async def test_fail_with_retry_before_the_ttl_still_answers_queued(
    store: QueueStore, clock: FakeClock
) -> None:
    ops = ops_for(store, clock)
    [queue_id] = await enqueue(ops, 1, 10, ttl_s=100.0)
    leased = await ops.handle(Dequeue(id=2, lease_s=60.0))
    assert isinstance(leased, DequeueResult)
    clock.advance(20)
    failed = await ops.handle(Fail(id=3, queue_id=queue_id, lease_id=leased.items[0].lease_id))
    assert isinstance(failed, RequestInfo)
    assert (failed.status, failed.reason) == ("queued", "unspecified")


async def test_status_of_an_unknown_id_while_redis_is_down_is_backend_unavailable(
    clock: FakeClock,
) -> None:
    """Item 13, as documented in protocol.md 7.8: never not_found while Redis cannot answer."""
    import fakeredis

    from sidecar.errors import BackendUnavailable, NotFound
    from sidecar.queue.local import LocalQueue
    from sidecar.queue.redis import RedisQueue
    from sidecar.queue.resilient import ResilientQueue

    server = fakeredis.FakeServer()
    redis = RedisQueue(
        fakeredis.FakeAsyncRedis(server=server), retention_s=600, clock=clock,
        check_eviction_policy=False, sweep_interval_s=None,
    )  # fmt: skip
    local = LocalQueue(
        max_items=100, max_bytes=10**6, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock,
    )  # fmt: skip
    queue = ResilientQueue(redis, local, probe_initial_s=60, probe_max_s=60)
    await queue.start()
    try:
        ops = ops_for(queue, clock)
        with pytest.raises(NotFound):
            await ops.handle(Status(id=1, queue_id="never-enqueued"))
        server.connected = False
        await enqueue(ops, 1, 10)  # fails over: Redis is now known to be down
        with pytest.raises(BackendUnavailable) as info:
            await ops.handle(Status(id=2, queue_id="never-enqueued"))
        assert info.value.details == {"queue_id": "never-enqueued", "kind": "down"}
    finally:
        await queue.close()


def _at_depth(frames: int, data: bytes) -> bool:
    """payload_depth_exceeds called from `frames` extra Python frames down the stack."""
    from sidecar.protocol import payload_depth_exceeds

    return _at_depth(frames - 1, data) if frames else payload_depth_exceeds(data)


@pytest.mark.parametrize("frames", [0, 7, 300])
@pytest.mark.parametrize(
    "level",
    [b"\x91", b"\x81\xa1k", b"\x82\xa1a\xc0\xa1k", b"\x92\xc0"],
    ids=["array", "map-value", "map-second-value", "array-second-item"],
)
def test_the_depth_limit_is_exact_from_any_stack(frames: int, level: bytes) -> None:
    """256 levels pass and 257 do not, whatever the caller's stack depth and the kind of level."""
    from sidecar.protocol import MAX_PAYLOAD_DEPTH

    limit = sys.getrecursionlimit()
    assert _at_depth(frames, level * MAX_PAYLOAD_DEPTH + b"\xc0") is False
    assert _at_depth(frames, level * (MAX_PAYLOAD_DEPTH + 1) + b"\xc0") is True
    assert _at_depth(frames, level * 5000 + b"\xc0") is True
    assert sys.getrecursionlimit() == limit  # restored


def test_wide_payloads_are_not_deep() -> None:
    from sidecar.protocol import payload_depth_exceeds

    wide = msgspec.msgpack.encode([[{"k": [1.5] * 50}] * 20 for _ in range(300)])
    assert payload_depth_exceeds(wide) is False


async def test_fail_past_the_ttl_still_answers_when_the_reread_fails(clock: FakeClock) -> None:
    """The fail took effect; a status read that fails right after must not turn it into an error."""
    from sidecar.errors import BackendUnavailable
    from sidecar.queue.local import LocalQueue

    class StatusFails(LocalQueue):
        async def status(self, queue_id: str) -> None:
            raise BackendUnavailable("redis unavailable (connection)", {"kind": "connection"})

    store = StatusFails(
        max_items=100, max_bytes=10**6, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=clock,
    )  # fmt: skip
    ops = ops_for(store, clock)
    [queue_id] = await enqueue(ops, 1, 10, ttl_s=10.0)
    leased = await ops.handle(Dequeue(id=2, lease_s=60.0))
    assert isinstance(leased, DequeueResult)
    clock.advance(20)
    failed = await ops.handle(Fail(id=3, queue_id=queue_id, lease_id=leased.items[0].lease_id))
    assert isinstance(failed, RequestInfo)
    assert failed.status == "queued"  # what the store answered; the next read will say expired
