"""LocalQueue: the bounded in-memory store (min-heap, strict limits, watermark breaker).

It never evicts what it holds. Its state is a dict of records plus heaps that only index it,
and every change of a record is one explicit transition (`_to_*`), so a journal can later log
each transition with the raw payload bytes it already keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import msgspec

from sidecar.errors import InvalidState, LeaseMismatch, NotFound, QueueFull
from sidecar.models import (
    REASON_ATTEMPTS_EXHAUSTED,
    REASON_CANCELLED,
    REASON_TTL,
    EnqueueResult,
    HealthReport,
    QueuedRequest,
    QueueStats,
    QueueStatus,
)
from sidecar.queue.base import new_lease_id

Clock = Callable[[], float]


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


class LocalQueue:
    """The in-memory store; bounded by item count and payload memory, never evicting."""

    name = "local"

    def __init__(
        self,
        *,
        max_items: int,
        max_bytes: int,
        high_watermark: float,
        low_watermark: float,
        retention_s: float,
        retry_after_s: float = 5.0,
        max_retained: int = 100_000,
        clock: Clock = time.time,
    ) -> None:
        self.max_items = max_items
        self.max_retained = max_retained
        self.max_bytes = max_bytes
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.retention_s = retention_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._records: dict[str, QueuedRequest] = {}
        # (priority, seq, queue_id) of queued requests; entries of requests that left the
        # queued state stay until popped and are skipped then (lazy deletion).
        self._ready: list[tuple[int, int, str]] = []
        # (expires_at, seq, queue_id) of queued requests, lazily deleted like _ready.
        self._expiry: list[tuple[float, int, str]] = []
        # (lease_expires_at, lease_id, queue_id) of leases; stale once the lease changes.
        self._leases: list[tuple[float, str, str]] = []
        # (purge_at, queue_id) of terminal records, in the order they became terminal.
        self._purge: deque[tuple[float, str]] = deque()
        self._seq = itertools.count(1)
        self._items = 0
        self._bytes = 0
        self._retained_bytes = 0
        self._retention_cut = 0
        self._breaker_open = False
        self._counts = {"accepted": 0, "completed": 0, "failed": 0, "expired": 0, "moved_out": 0}
        self._queued = 0
        self._processing = 0
        self._rejections: dict[str, int] = {}
        self._max_expired_age_s: float | None = None
        self._work = asyncio.Event()

    async def start(self) -> None:
        """Nothing to connect: the local queue is ready at construction."""

    async def close(self) -> None:
        """Nothing to release; a journal will flush here."""

    # -- the contract ------------------------------------------------------------------------

    async def enqueue(self, requests: Sequence[QueuedRequest]) -> list[EnqueueResult]:
        """Store new requests all-or-none; existing queue_ids come back unchanged."""
        now = self._tick()
        fresh: dict[str, QueuedRequest] = {}
        for req in requests:
            if req.queue_id not in self._records and req.queue_id not in fresh:
                fresh[req.queue_id] = req
        if fresh:
            self._admit(list(fresh.values()))
        results: list[EnqueueResult] = []
        stored: set[str] = set()
        for req in requests:
            created = req.queue_id in fresh and req.queue_id not in stored
            if created:
                self._to_queued_new(fresh[req.queue_id], now)
                stored.add(req.queue_id)
            results.append(EnqueueResult(request=self._view(req.queue_id), created=created))
        if fresh:
            self._notify_work()
        return results

    async def dequeue(self, max_items: int, lease_s: float) -> list[QueuedRequest]:
        """Lease the most urgent queued requests, skipping any that expired."""
        now = self._tick()
        out: list[QueuedRequest] = []
        for rec in self._pop_ready(max_items, now):
            self._to_processing(rec, now, lease_s)
            out.append(msgspec.structs.replace(rec))
        return out

    async def extend(self, queue_id: str, lease_id: str, lease_s: float) -> QueuedRequest:
        """Push a live lease's end to now + lease_s."""
        now = self._tick()
        rec = self._leased(queue_id, lease_id)
        rec.lease_expires_at = now + lease_s
        rec.updated_at = now
        heapq.heappush(self._leases, (rec.lease_expires_at, lease_id, queue_id))
        return msgspec.structs.replace(rec)

    async def complete(self, queue_id: str, lease_id: str) -> QueuedRequest:
        """Complete a leased request; a repeat with the same lease returns the completed record."""
        now = self._tick()
        rec = self._get(queue_id)
        if rec.status is QueueStatus.COMPLETED and rec.lease_id == lease_id:
            return msgspec.structs.replace(rec)
        rec = self._leased(queue_id, lease_id)
        self._to_terminal(rec, now, QueueStatus.COMPLETED, None)
        return msgspec.structs.replace(rec)

    async def fail(self, queue_id: str, lease_id: str, reason: str, retry: bool) -> QueuedRequest:
        """End a lease with a failure; requeue while attempts remain and retry is asked."""
        now = self._tick()
        rec = self._leased(queue_id, lease_id)
        if retry and rec.attempts < rec.max_attempts:
            self._to_requeued(rec, now, reason)
        else:
            final = reason if not retry else f"{REASON_ATTEMPTS_EXHAUSTED}: {reason}"
            self._to_terminal(rec, now, QueueStatus.FAILED, final)
        return msgspec.structs.replace(rec)

    async def cancel(self, queue_id: str) -> QueuedRequest:
        """Fail a queued request with the reason `cancelled`."""
        now = self._tick()
        rec = self._get(queue_id)
        if rec.status is not QueueStatus.QUEUED:
            raise InvalidState(
                f"request {queue_id} is {rec.status.value}; only a queued request can be cancelled",
                {"queue_id": queue_id, "status": rec.status.value},
            )
        self._to_terminal(rec, now, QueueStatus.FAILED, REASON_CANCELLED)
        return msgspec.structs.replace(rec)

    async def status(self, queue_id: str) -> QueuedRequest | None:
        """The request as held now, or None."""
        self._tick()
        rec = self._records.get(queue_id)
        return None if rec is None else msgspec.structs.replace(rec)

    async def stats(self) -> QueueStats:
        """Counts, usage against limits, breaker state and rejections."""
        now = self._tick()
        oldest = min(
            (
                self._records[qid].created_at
                for _, seq, qid in self._ready
                if self._is_ready_entry(seq, qid)
            ),
            default=None,
        )
        return QueueStats(
            store=self.name,
            queued=self._queued,
            processing=self._processing,
            accepted=self._counts["accepted"],
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            expired=self._counts["expired"],
            items=self._items,
            bytes=self._bytes,
            max_items=self.max_items,
            max_bytes=self.max_bytes,
            usage=round(self._usage(), 4),
            breaker_open=self._breaker_open,
            rejections=dict(self._rejections),
            oldest_queued_age_s=None if oldest is None else max(0.0, now - oldest),
            max_expired_age_s=self._max_expired_age_s,
            retained=len(self._purge),
            retained_bytes=self._retained_bytes,
            retention_cut=self._retention_cut,
            warnings=[
                f"{self._retention_cut} finished requests were forgotten before their "
                f"retention ended: more than {self.max_retained} were retained"
            ]
            if self._retention_cut
            else [],
            moved_out=self._counts["moved_out"],
        )

    async def health(self) -> HealthReport:
        """Healthy unless the breaker is open (then degraded: new requests are refused)."""
        self._tick()
        if self._breaker_open:
            return HealthReport(
                status="degraded", mode="local_only", reasons=["local queue above its watermark"]
            )
        return HealthReport(status="ok", mode="local_only")

    async def wait_for_work(self, timeout: float) -> None:
        """Wait for an enqueue or requeue here, or for the next lease to lapse."""
        now = self._tick()
        if self._ready:
            return
        if self._leases:
            timeout = min(timeout, max(0.0, self._leases[0][0] - now))
        event = self._work
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # -- hand-over to another store (the failover manager's migration) -----------------------

    def holds(self, queue_id: str) -> bool:
        """Whether this queue has a record of queue_id (pending or retained)."""
        return queue_id in self._records

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def processing(self) -> int:
        return self._processing

    def take_queued(self, max_items: int) -> list[QueuedRequest]:
        """Remove up to max_items queued requests, most urgent first, to move them elsewhere.

        They leave this queue entirely (no retained record): the receiving store answers for
        them from now on. Expired ones are expired here instead of being moved.
        """
        out = list(self._pop_ready(max_items, self._tick()))
        for rec in out:
            self._to_moved_out(rec)
        return out

    def drop_queued(self, queue_id: str) -> bool:
        """Remove one queued request that another store already holds; False if not queued."""
        self._tick()
        rec = self._records.get(queue_id)
        if rec is None or rec.status is not QueueStatus.QUEUED:
            return False
        self._to_moved_out(rec)
        return True

    # -- capacity ----------------------------------------------------------------------------

    def _usage(self) -> float:
        return max(self._items / self.max_items, self._bytes / self.max_bytes)

    def _admit(self, fresh: list[QueuedRequest]) -> None:
        """Raise QueueFull unless every fresh request fits; nothing is stored either way."""
        add_bytes = sum(held_cost(r) for r in fresh)
        reason = None
        if self._breaker_open:
            reason = "high_watermark"
        elif self._items + len(fresh) > self.max_items:
            reason = "max_size"
        elif self._bytes + add_bytes > self.max_bytes:
            reason = "max_memory"
        if reason is None:
            return
        self._rejections[reason] = self._rejections.get(reason, 0) + len(fresh)
        raise QueueFull(
            f"local queue is full ({reason}): {self._items}/{self.max_items} items, "
            f"{self._bytes}/{self.max_bytes} bytes",
            {
                "reason": reason,
                "items": self._items,
                "max_items": self.max_items,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "usage": round(self._usage(), 4),
                "retry_after_s": self.retry_after_s,
            },
        )

    def _update_breaker(self) -> None:
        usage = self._usage()
        if self._breaker_open:
            if usage <= self.low_watermark:
                self._breaker_open = False
        elif usage >= self.high_watermark:
            self._breaker_open = True

    # -- transitions: every change of a record happens in exactly one of these ----------------

    def _to_queued_new(self, req: QueuedRequest, now: float) -> None:
        req.seq = next(self._seq)
        req.status = QueueStatus.QUEUED
        req.updated_at = now
        self._records[req.queue_id] = req
        self._items += 1
        self._bytes += held_cost(req)
        self._queued += 1
        self._counts["accepted"] += 1
        self._push_ready(req)
        self._update_breaker()

    def _to_processing(self, rec: QueuedRequest, now: float, lease_s: float) -> None:
        rec.status = QueueStatus.PROCESSING
        rec.attempts += 1
        rec.lease_id = new_lease_id()
        rec.lease_expires_at = now + lease_s
        rec.updated_at = now
        self._queued -= 1
        self._processing += 1
        heapq.heappush(self._leases, (rec.lease_expires_at, rec.lease_id, rec.queue_id))

    def _to_requeued(self, rec: QueuedRequest, now: float, reason: str | None) -> None:
        # The request keeps its seq: back in line where it arrived, ahead of younger peers.
        rec.status = QueueStatus.QUEUED
        rec.lease_id = None
        rec.lease_expires_at = None
        rec.updated_at = now
        rec.reason = reason
        self._processing -= 1
        self._queued += 1
        self._push_ready(rec)
        self._notify_work()

    def _to_moved_out(self, rec: QueuedRequest) -> None:
        del self._records[rec.queue_id]
        self._queued -= 1
        self._items -= 1
        self._bytes -= held_cost(rec)
        self._counts["moved_out"] += 1
        self._update_breaker()

    def _to_expired(self, rec: QueuedRequest, now: float) -> None:
        age = now - rec.created_at
        if self._max_expired_age_s is None or age > self._max_expired_age_s:
            self._max_expired_age_s = age
        self._to_terminal(rec, now, QueueStatus.EXPIRED, REASON_TTL)

    def _to_terminal(
        self, rec: QueuedRequest, now: float, status: QueueStatus, reason: str | None
    ) -> None:
        if rec.status is QueueStatus.QUEUED:
            self._queued -= 1
        else:
            self._processing -= 1
        self._items -= 1
        self._bytes -= held_cost(rec)
        rec.status = status
        rec.reason = reason
        rec.updated_at = now
        rec.lease_expires_at = None
        rec.payload = None  # only metadata outlives the request
        self._counts[status.value] += 1
        self._purge.append((now + self.retention_s, rec.queue_id))
        self._retained_bytes += RETAINED_OVERHEAD_BYTES + sys.getsizeof(rec.queue_id)
        self._update_breaker()

    # -- timers, run lazily at the start of every call -----------------------------------------

    def _tick(self) -> float:
        """Apply every expiry, lease lapse and retention end that is due; return now."""
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, seq, qid = heapq.heappop(self._expiry)
            rec = self._records.get(qid)
            if rec is not None and rec.status is QueueStatus.QUEUED and rec.seq == seq:
                self._to_expired(rec, now)
        while self._leases and self._leases[0][0] <= now:
            _, lease_id, qid = heapq.heappop(self._leases)
            rec = self._records.get(qid)
            if rec is None or rec.status is not QueueStatus.PROCESSING or rec.lease_id != lease_id:
                continue
            if rec.lease_expires_at is not None and rec.lease_expires_at > now:
                continue  # extended; a newer heap entry stands for it
            self._lapse(rec, now)
        while self._purge and self._purge[0][0] <= now:
            self._forget_oldest_terminal()
        # Terminal records are metadata only, but a busy local-only daemon makes millions a
        # day: past the cap the oldest go early, counted, so memory stays bounded.
        while len(self._purge) > self.max_retained:
            self._forget_oldest_terminal()
            self._retention_cut += 1
        # Both heaps keep entries of requests that left the queued state; rebuild them once
        # the stale entries outnumber the live ones, so they stay within twice the backlog.
        stale_bound = 64 + 2 * self._queued
        if len(self._ready) > stale_bound or len(self._expiry) > stale_bound:
            self._compact()
        return now

    def _forget_oldest_terminal(self) -> None:
        _, qid = self._purge.popleft()
        if self._records.pop(qid, None) is not None:
            self._retained_bytes -= RETAINED_OVERHEAD_BYTES + sys.getsizeof(qid)

    def _lapse(self, rec: QueuedRequest, now: float) -> None:
        """A lease ran out: the request goes back while attempts remain, else it fails."""
        if rec.expires_at <= now:
            self._to_expired(rec, now)
        elif rec.attempts < rec.max_attempts:
            self._to_requeued(rec, now, "lease_expired")
        else:
            final = f"{REASON_ATTEMPTS_EXHAUSTED}: lease_expired"
            self._to_terminal(rec, now, QueueStatus.FAILED, final)

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the live ones (after many cancels)."""
        self._ready = [e for e in self._ready if self._is_ready_entry(e[1], e[2])]
        heapq.heapify(self._ready)
        self._expiry = [e for e in self._expiry if self._is_ready_entry(e[1], e[2])]
        heapq.heapify(self._expiry)

    # -- helpers --------------------------------------------------------------------------------

    def _pop_ready(self, max_items: int, now: float) -> Iterator[QueuedRequest]:
        """Pop up to max_items live queued requests, most urgent first; expire the stale ones.

        The caller moves each one out of the queued state before asking for the next.
        """
        taken = 0
        while self._ready and taken < max_items:
            _, seq, qid = heapq.heappop(self._ready)
            rec = self._records.get(qid)
            if rec is None or rec.status is not QueueStatus.QUEUED or rec.seq != seq:
                continue
            if rec.expires_at <= now:
                self._to_expired(rec, now)
                continue
            taken += 1
            yield rec

    def _push_ready(self, rec: QueuedRequest) -> None:
        heapq.heappush(self._ready, (rec.priority, rec.seq, rec.queue_id))
        heapq.heappush(self._expiry, (rec.expires_at, rec.seq, rec.queue_id))

    def _is_ready_entry(self, seq: int, qid: str) -> bool:
        rec = self._records.get(qid)
        return rec is not None and rec.status is QueueStatus.QUEUED and rec.seq == seq

    def _notify_work(self) -> None:
        # Waking every waiter and starting a fresh event means no waiter can miss a notice.
        self._work.set()
        self._work = asyncio.Event()

    def _get(self, queue_id: str) -> QueuedRequest:
        rec = self._records.get(queue_id)
        if rec is None:
            raise NotFound(f"no request {queue_id}", {"queue_id": queue_id})
        return rec

    def _leased(self, queue_id: str, lease_id: str) -> QueuedRequest:
        rec = self._get(queue_id)
        if rec.status is not QueueStatus.PROCESSING:
            raise InvalidState(
                f"request {queue_id} is {rec.status.value}, not processing",
                {"queue_id": queue_id, "status": rec.status.value},
            )
        if rec.lease_id != lease_id:
            raise LeaseMismatch(
                f"lease {lease_id} is not the current lease of {queue_id}",
                {"queue_id": queue_id},
            )
        return rec

    def _view(self, queue_id: str) -> QueuedRequest:
        return msgspec.structs.replace(self._records[queue_id])
