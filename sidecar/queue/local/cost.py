"""What holding a request costs the heap: the bytes the local store counts against its
memory limit (QUEUE_MAX_MEMORY_MB), payload and record overhead together."""

from __future__ import annotations

import sys
import time

from sidecar.models import QueuedRequest, QueueStatus


def _calibrate_overhead() -> int:
    """Heap bytes a held request costs beyond its payload and queue_id, measured on this Python.

    A record Struct with its float fields, the dict slot that finds it, and its entries in the
    ready and expiry heaps. Measured once from real objects rather than guessed, so the count
    stays true across Python and msgspec versions; checked against tracemalloc by the tests.
    """
    now = time.time()
    rec = QueuedRequest(
        queue_id="",
        priority=5,
        seq=1 << 20,
        created_at=now,
        expires_at=now + 1.5,
        status=QueueStatus.QUEUED,
        attempts=0,
        max_attempts=3,
        updated_at=now + 0.5,
        payload=b"",
        size_bytes=1 << 20,
    )
    floats = 3 * sys.getsizeof(now)  # created_at, expires_at, updated_at are separate objects
    seq_int = sys.getsizeof(1 << 20) * 2  # seq, plus size_bytes beyond the small-int cache
    heap_entries = 2 * (sys.getsizeof((0, 0, "")) + 8)  # ready + expiry tuples and list slots
    dict_slot = 32  # hash, key and value pointers (24) plus index bytes, amortised over growth
    return sys.getsizeof(rec) + floats + seq_int + heap_entries + dict_slot


RECORD_OVERHEAD_BYTES = _calibrate_overhead()
# A terminal record keeps metadata only: no payload, no heap entries.
RETAINED_OVERHEAD_BYTES = RECORD_OVERHEAD_BYTES - 2 * (sys.getsizeof((0, 0, "")) + 8)


def held_cost(req: QueuedRequest) -> int:
    """What holding one request costs the heap: payload, queue_id and record overhead."""
    payload = req.payload if req.payload is not None else b""
    return sys.getsizeof(payload) + sys.getsizeof(req.queue_id) + RECORD_OVERHEAD_BYTES


def dead_cost(req: QueuedRequest) -> int:
    """What a dead letter costs the heap: a retained record that keeps its payload, its reason
    and the id of its last lease (its fields do not change while it is dead)."""
    payload = req.payload if req.payload is not None else b""
    extra = sum(sys.getsizeof(s) for s in (req.reason, req.lease_id) if s is not None)
    return RETAINED_OVERHEAD_BYTES + sys.getsizeof(req.queue_id) + sys.getsizeof(payload) + extra
