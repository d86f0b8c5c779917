"""protocol.md 7.3 / 8.2: what a resent enqueue answers, and how a producer reads it.

The first send stored the request but its reply was lost; the resend answers `created: false`
with the request the first send stored. A producer that names its requests with ids of its own
reads that as "my earlier send landed"; an id it never sent answering `created: false` is a
collision with another producer's request, whose payload is kept.
"""

from __future__ import annotations

import msgspec

from sidecar.config import Settings
from sidecar.protocol import Dequeue, DequeueResult, Enqueue, EnqueueItem, EnqueueResult
from sidecar.queue.base import QueueStore
from sidecar.server.ops import Ops
from tests.support.helpers import FakeClock


def item(queue_id: str, body: str, priority: int = 5) -> EnqueueItem:
    payload = msgspec.Raw(msgspec.msgpack.encode({"prompt": body}))
    return EnqueueItem(payload=payload, queue_id=queue_id, priority=priority)


async def send(ops: Ops, *items: EnqueueItem) -> EnqueueResult:
    result = await ops.handle(Enqueue(id=1, items=list(items)))
    assert isinstance(result, EnqueueResult)
    return result


async def test_a_resend_answers_created_false_with_the_first_send_s_request(
    store: QueueStore, clock: FakeClock
) -> None:
    ops = Ops(Settings(), store, clock=clock)
    first = await send(ops, item("mine-1", "hello"))  # its reply "lost" on the way back
    assert first.items[0].created
    clock.advance(1)
    again = await send(ops, item("mine-1", "hello"))
    [resent] = again.items
    # created: false, although no one else made it: the request is the first send's.
    assert not resent.created
    assert resent.status == "queued"
    assert resent.expires_at == first.items[0].expires_at
    # Stored once: one job to hand out, with the payload that was sent.
    leased = await ops.handle(Dequeue(id=2, max_items=10))
    assert isinstance(leased, DequeueResult)
    assert [j.queue_id for j in leased.items] == ["mine-1"]
    assert msgspec.msgpack.decode(leased.items[0].payload) == {"prompt": "hello"}


async def test_a_created_false_for_another_s_id_keeps_the_other_s_payload(
    store: QueueStore, clock: FakeClock
) -> None:
    """The daemon compares no payloads: what tells a resend from a collision is the producer's
    own record of the ids it sent."""
    ops = Ops(Settings(), store, clock=clock)
    await send(ops, item("shared", "theirs", priority=1))
    mine = await send(ops, item("shared", "mine", priority=7))
    assert not mine.items[0].created
    assert mine.items[0].priority == 1  # the other producer's request, not ours
    leased = await ops.handle(Dequeue(id=2, max_items=10))
    assert isinstance(leased, DequeueResult)
    assert [msgspec.msgpack.decode(j.payload) for j in leased.items] == [{"prompt": "theirs"}]
