"""The request record in Redis: metadata hash plus payload key, and hashes of the older format.

A request's payload sits in `<hash>:p` so the hash stays a compact listpack. Hashes written by
the previous version (payload as a field) must keep working after an upgrade, in every op.
"""

from __future__ import annotations

import msgspec
import pytest
from redis.asyncio import Redis

from sidecar.models import QueueStatus
from sidecar.queue.redis import RedisQueue
from sidecar.queue.redis.keys import PRIORITY_SHIFT
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)

LEASE_S = 30.0
OLD_PAYLOAD = msgspec.msgpack.encode({"prompt": "written before the upgrade", "pad": "x" * 900})


async def _old_enqueue(queue: RedisQueue, raw: Redis, now: float, queue_id: str) -> None:
    """What the previous enqueue.lua stored: every field in the hash, the payload among them."""
    keys = queue.keys
    seq = int(await raw.incr(keys.seq))
    await raw.hset(
        keys.request(queue_id),
        mapping={
            "queue_id": queue_id, "priority": 3, "seq": seq, "created_at": repr(now),
            "expires_at": repr(now + 3600), "status": "queued", "attempts": 0,
            "max_attempts": 3, "updated_at": repr(now), "payload": OLD_PAYLOAD,
            "size_bytes": len(OLD_PAYLOAD),
        },
    )  # fmt: skip
    await raw.zadd(keys.pending, {queue_id: 3 * PRIORITY_SHIFT + seq})
    await raw.zadd(keys.expiry, {queue_id: now + 3600})
    await raw.hincrby(keys.stats, "accepted", 1)
    await raw.hincrby(keys.stats, "bytes", len(OLD_PAYLOAD))


async def test_a_new_request_is_a_listpack_hash_and_a_payload_key(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    [res] = await queue.enqueue([make_request(clock, {"pad": "y" * 1500}, queue_id="new")])
    key = queue.keys.request("new")
    assert await raw.object("encoding", key) == b"listpack"
    assert not await raw.hexists(key, "payload")
    assert await raw.get(queue.keys.payload("new")) == res.request.payload
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.payload == res.request.payload
    assert job.lease_id is not None
    done = await queue.complete("new", job.lease_id)
    assert done.payload is None
    # Only metadata outlives the request.
    assert await raw.exists(queue.keys.payload("new")) == 0
    assert (await queue.stats()).bytes == 0


@pytest.mark.parametrize("op", ["complete", "fail", "fail_retry", "cancel", "discard", "status"])
async def test_a_request_stored_by_the_previous_version_keeps_working(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, op: str
) -> None:
    queue = await make_queue()
    await _old_enqueue(queue, raw, clock(), "old")
    st = await queue.status("old")
    assert st is not None and st.payload == OLD_PAYLOAD and st.status is QueueStatus.QUEUED
    if op == "status":
        return
    if op == "cancel":
        assert (await queue.cancel("old")).status is QueueStatus.FAILED
    elif op == "discard":
        assert await queue.discard_queued("old")
        assert await raw.exists(queue.keys.request("old")) == 0
    else:
        [job] = await queue.dequeue(1, LEASE_S)
        assert (job.queue_id, job.payload) == ("old", OLD_PAYLOAD)
        assert job.lease_id is not None
        if op == "complete":
            rec = await queue.complete("old", job.lease_id)
            assert rec.status is QueueStatus.COMPLETED
        else:
            rec = await queue.fail("old", job.lease_id, "no", retry=op == "fail_retry")
            if op == "fail_retry":
                assert (rec.status, rec.payload) == (QueueStatus.QUEUED, OLD_PAYLOAD)
                return
            assert rec.status is QueueStatus.FAILED
    if op != "discard":
        # Settled: the payload field is gone like a new record's payload key.
        assert not await raw.hexists(queue.keys.request("old"), "payload")
    stats = await queue.stats()
    assert stats.bytes == 0 and stats.balanced
