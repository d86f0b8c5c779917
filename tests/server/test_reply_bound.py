"""The reply bound of protocol.md section 3 for the ops that settle and lease in one reply.

complete_next and complete_many carry each settle's entry (its info, or its error) beside the
jobs they lease: the jobs get only the room those entries may take leave, and no entry grows
with what the client sent (an error's message is bounded, however long a foreign lease_id).
Reproduces issue 24 (SIDECAR_MAX_FRAME_BYTES=17000, SIDECAR_MAX_BATCH=100, 128-character ids):
30,735 bytes for a complete_many, 32,360 for a complete_next with a long foreign lease id.
"""

from __future__ import annotations

import msgspec

from sidecar.config import Settings
from sidecar.protocol import (
    CompleteItem,
    CompleteMany,
    CompleteManyResult,
    CompleteNext,
    CompleteNextResult,
    Dequeue,
    DequeueResult,
    Enqueue,
    EnqueueItem,
    OkReply,
    encode_frame,
)
from sidecar.queue.base import QueueStore
from sidecar.server.ops import REPLY_OVERHEAD_BYTES, Ops
from tests.support.helpers import FakeClock

FRAME = 17_000
BATCH = 100
# What protocol.md section 3 promises per settle entry, and so what a client must accept.
ENTRY_BYTES = 512
BOUND = FRAME + 1024 + BATCH * ENTRY_BYTES


def ops_for(store: QueueStore, clock: FakeClock) -> Ops:
    return Ops(Settings(max_frame_bytes=FRAME, max_batch=BATCH), store, clock=clock)


def reply_size(result: object) -> int:
    """The frame body length of the reply carrying result, with the widest possible id."""
    return len(encode_frame(OkReply(id=-(2**63), result=result))) - 4


def entry_size(entry: object) -> int:
    return len(msgspec.msgpack.encode(entry))


async def fill(ops: Ops, first: int, count: int, size: int = 150) -> None:
    """count requests with 128-character queue_ids and payloads of `size` bytes."""
    payload = msgspec.Raw(msgspec.msgpack.encode(b"x" * size))
    items = [EnqueueItem(payload=payload, queue_id=f"{first + i:0128d}") for i in range(count)]
    await ops.handle(Enqueue(id=1, items=items))


async def lease_all(ops: Ops, count: int) -> list[CompleteItem]:
    got: list[CompleteItem] = []
    while len(got) < count:
        result = await ops.handle(Dequeue(id=2, max_items=BATCH))
        assert isinstance(result, DequeueResult) and result.items
        got += [CompleteItem(queue_id=j.queue_id, lease_id=j.lease_id) for j in result.items]
    return got


async def test_a_full_complete_many_stays_within_the_bound(
    store: QueueStore, clock: FakeClock
) -> None:
    ops = ops_for(store, clock)
    await fill(ops, 0, BATCH)
    await fill(ops, 1000, BATCH)  # more work, for the leasing to take
    items = await lease_all(ops, BATCH)
    result = await ops.handle(CompleteMany(id=3, items=items[:BATCH], max_items=BATCH))
    assert isinstance(result, CompleteManyResult)
    assert all(r.completed is not None for r in result.results)
    size = reply_size(result)
    assert size <= BOUND, size
    assert all(entry_size(r) <= ENTRY_BYTES for r in result.results)
    # The results alone take more than a frame here: no job is leased beside them.
    assert not result.items
    assert size <= REPLY_OVERHEAD_BYTES + BATCH * ENTRY_BYTES


async def test_complete_many_leases_only_into_the_room_its_results_leave(
    store: QueueStore, clock: FakeClock
) -> None:
    """41 settles and more work: the jobs fill what the entries leave, not a whole frame."""
    ops = ops_for(store, clock)
    await fill(ops, 0, 60)
    await fill(ops, 1000, BATCH)
    items = await lease_all(ops, 60)
    for count in (5, 20, 41):
        result = await ops.handle(CompleteMany(id=3, items=items[:count], max_items=BATCH))
        items = items[count:]
        assert isinstance(result, CompleteManyResult)
        size = reply_size(result)
        assert size <= FRAME + 1024, (count, size)
        assert all(entry_size(r) <= ENTRY_BYTES for r in result.results)


async def test_a_long_foreign_lease_id_is_not_echoed_whole(
    store: QueueStore, clock: FakeClock
) -> None:
    ops = ops_for(store, clock)
    await fill(ops, 0, 1)
    await fill(ops, 1000, BATCH)
    [mine] = await _one(ops)
    foreign = "L" * (FRAME - 240)  # as long as a request frame allows (beside its other fields)
    request = CompleteNext(id=4, queue_id=mine.queue_id, lease_id=foreign, max_items=BATCH)
    assert len(encode_frame(request)) - 4 <= FRAME
    result = await ops.handle(request)
    assert isinstance(result, CompleteNextResult)
    assert result.error is not None and result.error.code == "lease_mismatch"
    assert entry_size(result.error) <= ENTRY_BYTES
    assert result.items  # the leasing went on, into the room left
    size = reply_size(result)
    assert size <= FRAME + 1024 + ENTRY_BYTES, size
    # The same through complete_many.
    many = await ops.handle(
        CompleteMany(id=5, items=[CompleteItem(queue_id=mine.queue_id, lease_id=foreign)])
    )
    assert isinstance(many, CompleteManyResult)
    assert all(entry_size(r) <= ENTRY_BYTES for r in many.results)


async def _one(ops: Ops) -> list[CompleteItem]:
    result = await ops.handle(Dequeue(id=2, max_items=1))
    assert isinstance(result, DequeueResult)
    return [CompleteItem(queue_id=j.queue_id, lease_id=j.lease_id) for j in result.items]
