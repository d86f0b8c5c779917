"""Dead letters in the local store beyond the contract: what they cost the heap."""

from __future__ import annotations

import gc
import random
import tracemalloc

import msgspec
import pytest

from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request

LEASE_S = 30.0


@pytest.mark.slow
async def test_dead_letter_bytes_match_the_real_heap_cost(clock: FakeClock) -> None:
    """Within ±10% of tracemalloc: thousands of dead letters of mixed sizes (10 B to 16 KiB),
    each failed for good with a reason of its own, payload kept."""
    rnd = random.Random(11)
    queue = make_local(clock, None, max_items=10**6, max_bytes=10**10, dead_retention_s=10**6)
    await queue.start()
    bodies = [{"prompt": "p" * int(10 * (1600 ** rnd.random()))} for _ in range(3000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, body in enumerate(bodies):
            req = make_request(clock, body, queue_id=f"dead-{i:06d}")
            # An exact copy, as the daemon keeps a payload (msgspec's encode over-allocates).
            req.payload = bytes(bytearray(req.payload or b""))
            await queue.enqueue([req])
        while jobs := await queue.dequeue(500, LEASE_S):
            for job in jobs:
                await queue.fail(job.queue_id, job.lease_id or "", f"bad {job.queue_id}", False)
        clock.advance(LEASE_S + 1)  # the lease entries fall due and go
        stats = await queue.stats()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert stats.dead_letters == len(bodies) and stats.items == 0
    reported = stats.retained_bytes  # the dead letters', and nothing else is retained
    assert reported == stats.dead_letters_bytes
    print(f"tracemalloc={used} reported={reported} ratio={reported / used:.3f}")
    assert 0.9 * used <= reported <= 1.1 * used
    rec = await queue.status("dead-000000")
    assert rec is not None and msgspec.msgpack.decode(rec.payload or b"") == bodies[0]
    await queue.close()
