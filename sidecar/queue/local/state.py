"""The local store's state machine: records, the heaps that index them, and the books.

Every change of a record is one transition that builds an event and applies it; `apply` is the
only code that mutates, and replay runs the journal's events through the same `apply`, so the
state after a restart is the state that was acknowledged. The caller's `sink` receives each
event of a live transition (the journal appends it). Nothing here awaits or reads the clock:
the store passes `now` in.
"""

from __future__ import annotations

import heapq
import sys
from collections import deque
from collections.abc import Callable, Iterator

from sidecar.models import (
    REASON_ATTEMPTS_EXHAUSTED,
    REASON_TTL,
    QueuedRequest,
    QueueStatus,
    is_dead_letter,
)
from sidecar.queue.local.cost import RETAINED_OVERHEAD_BYTES, dead_cost, held_cost
from sidecar.queue.local.dead import DeadLetters
from sidecar.queue.local.events import (
    AnyEvent,
    Enqueued,
    Extended,
    Finished,
    Forgotten,
    Held,
    Leased,
    MovedOut,
    Purged,
    Requeued,
    Resolved,
    Returned,
    Revived,
    SnapshotHead,
    Taken,
    Unaccepted,
)
from sidecar.queue.local.snapshot import Snapshots

Sink = Callable[[AnyEvent], None]


class LocalState(DeadLetters, Snapshots):
    """The records of the local store and every transition between their statuses."""

    def __init__(
        self,
        *,
        max_items: int,
        max_bytes: int,
        high_watermark: float,
        low_watermark: float,
        retention_s: float,
        max_retained: int,
        sink: Sink | None = None,
        dead_retention_s: float | None = None,
        max_dead: int = 10_000,
        max_dead_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """dead_retention_s: how long dead letters stay (default: retention_s); max_dead and
        max_dead_bytes: the most kept (count, heap bytes), past which the oldest go (counted as
        dead_dropped). Any of the three at 0 keeps none: metadata only, as retention_s says."""
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.breaker_open = False
        self.retention_s = retention_s
        self.max_retained = max_retained
        self.dead_retention_s = retention_s if dead_retention_s is None else dead_retention_s
        self.max_dead = max_dead
        self.max_dead_bytes = max_dead_bytes
        self.sink: Sink | None = sink
        # Sees each live transition's event before it applies, while the record still shows
        # where it came from (the store's metrics hooks); replay does not call it.
        self.observer: Sink | None = None
        self.records: dict[str, QueuedRequest] = {}
        # (priority, seq, queue_id) of queued requests; entries of requests that left the
        # queued state stay until popped and are skipped then (lazy deletion).
        self.ready: list[tuple[int, int, str]] = []
        # (expires_at, seq, queue_id) of queued requests, lazily deleted like ready.
        self.expiry: list[tuple[float, int, str]] = []
        # (lease_expires_at, lease_id, queue_id) of leases; stale once the lease changes.
        self.leases: list[tuple[float, str, str]] = []
        # (not_before, seq, queue_id) of queued requests held back by a fail with delay_s; a
        # request is in `not_before` while it waits, and tick moves it into ready when due.
        self.delayed: list[tuple[float, int, str]] = []
        self.not_before: dict[str, float] = {}
        # (purge_at, queue_id) of terminal records, in the order they became terminal.
        self.purge: deque[tuple[float, str]] = deque()
        # (purge_at, queue_id) of dead letters (is_dead_letter, payload kept), oldest first.
        self.dead: deque[tuple[float, str]] = deque()
        self.dead_bytes = 0
        # Queued requests taken for the hand-over to Redis: they read queued, are never
        # dequeued, and end confirmed (moved out) or returned.
        self.taken: set[str] = set()
        # Requests held here whose Redis write timed out and may still land there.
        self.uncertain: set[str] = set()
        self.next_seq = 1
        self.requeues = 0  # lets the store wake waiting dequeues after a lease lapsed
        self.items = 0
        self.bytes = 0
        self.retained_bytes = 0
        self.retention_cut = 0
        self.counts = {
            "accepted": 0, "completed": 0, "failed": 0, "expired": 0, "moved_out": 0,
            "dead_dropped": 0,
        }  # fmt: skip
        self.queued = 0
        self.processing = 0
        self.rejections: dict[str, int] = {}
        self.max_expired_age_s: float | None = None

    # -- transitions: each builds its event and applies it ---------------------------------------

    def _emit(self, event: AnyEvent) -> AnyEvent:
        if self.observer is not None:
            self.observer(event)
        self.apply(event)
        if self.sink is not None:
            self.sink(event)
        return event

    def enqueue(self, req: QueuedRequest, now: float, uncertain: bool = False) -> None:
        req.seq = self.next_seq
        req.status = QueueStatus.QUEUED
        req.updated_at = now
        self._emit(Enqueued(rec=req, uncertain=uncertain))

    def lease(self, rec: QueuedRequest, now: float, lease_s: float, lease_id: str) -> None:
        self._emit(Leased(qid=rec.queue_id, lease_id=lease_id, until=now + lease_s, at=now))

    def extend(self, rec: QueuedRequest, now: float, lease_s: float) -> None:
        self._emit(Extended(qid=rec.queue_id, until=now + lease_s, at=now))

    def requeue(
        self,
        rec: QueuedRequest,
        now: float,
        reason: str | None,
        failed_lease: str | None = None,
        not_before: float | None = None,
        refund: bool = False,
    ) -> None:
        self._emit(
            Requeued(qid=rec.queue_id, at=now, reason=reason, failed_lease=failed_lease,
                     not_before=not_before, refund=refund)
        )  # fmt: skip

    def finish(
        self,
        rec: QueuedRequest,
        now: float,
        status: QueueStatus,
        reason: str | None,
        failed_lease: str | None = None,
    ) -> None:
        self._emit(
            Finished(
                qid=rec.queue_id, status=status, reason=reason, at=now, failed_lease=failed_lease
            )
        )

    def take(self, qids: list[str]) -> None:
        self._emit(Taken(qids=qids))

    def give_back(self, qids: list[str], uncertain: bool = False) -> None:
        self._emit(Returned(qids=qids, uncertain=uncertain))

    def move_out(self, qids: list[str]) -> None:
        self._emit(MovedOut(qids=qids))

    def resolve(self, qid: str) -> None:
        self._emit(Resolved(qid=qid))

    def unaccept(self, qids: list[str]) -> None:
        self._emit(Unaccepted(qids=qids))

    def lapse(self, rec: QueuedRequest, now: float) -> None:
        """A lease ran out: the request goes back while attempts remain, else it fails."""
        if rec.expires_at <= now:
            self.finish(rec, now, QueueStatus.EXPIRED, REASON_TTL)
        elif rec.attempts < rec.max_attempts:
            self.requeue(rec, now, "lease_expired")
        else:
            self.finish(rec, now, QueueStatus.FAILED, f"{REASON_ATTEMPTS_EXHAUSTED}: lease_expired")

    # -- apply: the only code that changes a record ---------------------------------------------

    def apply(self, event: AnyEvent) -> None:
        """Apply one event, live or replayed."""
        match event:
            case Enqueued(rec=rec, uncertain=uncertain):
                self._add(rec, uncertain)
                self.counts["accepted"] += 1
            case Leased():
                self._lease(event)
            case Extended(qid=qid, until=until, at=at):
                rec = self.records[qid]
                rec.lease_expires_at = until
                rec.updated_at = at
                assert rec.lease_id is not None
                heapq.heappush(self.leases, (until, rec.lease_id, qid))
            case Requeued():
                self._requeue(event)
            case Finished(qid=qid, status=status, reason=reason, at=at):
                rec = self.records[qid]
                self._finish(rec, status, reason, at)
                rec.failed_lease = event.failed_lease
            case Forgotten(qid=qid, cut=cut):
                if self._forget(qid):
                    self.counts["dead_dropped"] += cut
                else:
                    self.retention_cut += cut
            case Revived(qids=qids, at=at):
                self._revive(qids, at)
            case Purged(qids=qids, at=at):
                self._purge(qids, at)
            case Taken(qids=qids):
                self.taken.update(qids)
            case Returned(qids=qids, uncertain=uncertain):
                self._returned(qids, uncertain)
            case MovedOut(qids=qids):
                for qid in qids:
                    self._remove_queued(self.records[qid])
                    self.counts["moved_out"] += 1
            case Resolved(qid=qid):
                self.uncertain.discard(qid)
            case Unaccepted(qids=qids):
                for qid in qids:
                    self._remove_queued(self.records[qid])
                    self.counts["accepted"] -= 1
            case SnapshotHead():
                self._restore_head(event)
            case Held(rec=rec, uncertain=uncertain, purge_at=purge_at):
                self._restore(rec, uncertain, purge_at, event.not_before)
        self._update_breaker()

    def _returned(self, qids: list[str], uncertain: bool) -> None:
        for qid in qids:
            if qid in self.taken:
                self.taken.discard(qid)
                # Held back still: a fresh delayed entry (tick dropped it while taken).
                nb = self.not_before.get(qid)
                if nb is None:
                    self._push_ready(self.records[qid])
                else:
                    self._push_delayed(self.records[qid], nb)
        if uncertain:
            self.uncertain.update(qids)

    def _lease(self, event: Leased) -> None:
        rec = self.records[event.qid]
        rec.status = QueueStatus.PROCESSING
        rec.attempts += 1
        rec.lease_id = event.lease_id
        rec.failed_lease = None  # a new lease: a fail naming an earlier lease is not a repeat
        rec.lease_expires_at = event.until
        rec.updated_at = event.at
        self.not_before.pop(event.qid, None)  # a take leases a held-back request too
        self.queued -= 1
        self.processing += 1
        heapq.heappush(self.leases, (event.until, event.lease_id, event.qid))

    def _requeue(self, event: Requeued) -> None:
        rec = self.records[event.qid]
        # The request keeps its seq: back in line where it arrived.
        rec.status = QueueStatus.QUEUED
        rec.lease_id = None
        rec.lease_expires_at = None
        rec.updated_at = event.at
        rec.reason = event.reason
        rec.failed_lease = event.failed_lease
        if event.refund and rec.attempts > 0:
            rec.attempts -= 1  # the delivery this fail ended is not counted
        self.processing -= 1
        self.queued += 1
        if event.not_before is None:
            self.requeues += 1
            self._push_ready(rec)
        else:
            self._push_delayed(rec, event.not_before)

    def _add(self, rec: QueuedRequest, uncertain: bool, not_before: float | None = None) -> None:
        self.next_seq = max(self.next_seq, rec.seq + 1)
        self.records[rec.queue_id] = rec
        self.items += 1
        self.bytes += held_cost(rec)
        self.queued += 1
        if uncertain:
            self.uncertain.add(rec.queue_id)
        if not_before is None:
            self._push_ready(rec)
        else:
            self._push_delayed(rec, not_before)

    def _finish(
        self, rec: QueuedRequest, status: QueueStatus, reason: str | None, at: float
    ) -> None:
        if rec.status is QueueStatus.QUEUED:
            self.queued -= 1
            self.not_before.pop(rec.queue_id, None)
        else:
            self.processing -= 1
        if status is QueueStatus.EXPIRED:
            age = at - rec.created_at
            if self.max_expired_age_s is None or age > self.max_expired_age_s:
                self.max_expired_age_s = age
        self.items -= 1
        self.bytes -= held_cost(rec)
        rec.status = status
        rec.reason = reason
        rec.updated_at = at
        rec.lease_expires_at = None
        dead = is_dead_letter(status, reason) and self.keeps_dead
        if not dead:
            rec.payload = None  # only a dead letter keeps its payload, for a requeue
        self.counts[status.value] += 1
        # An uncertain mark outlives the request: a Redis copy of a finished one must still go.
        self.taken.discard(rec.queue_id)
        self._retain(rec, at + (self.dead_retention_s if dead else self.retention_s))

    def _forget(self, qid: str) -> bool:
        """Forget a terminal record; whether it was a dead letter."""
        # Its entry is the oldest one of its kind (retention ends in order).
        if self.purge and self.purge[0][1] == qid:
            self.purge.popleft()
        elif self.dead and self.dead[0][1] == qid:
            self.dead.popleft()
        rec = self.records.pop(qid, None)
        self.uncertain.discard(qid)
        if rec is None:
            return False
        if self._kept_dead(rec):
            self.dead_bytes -= dead_cost(rec)
            return True
        self.retained_bytes -= RETAINED_OVERHEAD_BYTES + sys.getsizeof(qid)
        return False

    def _remove_queued(self, rec: QueuedRequest) -> None:
        del self.records[rec.queue_id]
        self.not_before.pop(rec.queue_id, None)
        self.taken.discard(rec.queue_id)
        self.uncertain.discard(rec.queue_id)
        self.queued -= 1
        self.items -= 1
        self.bytes -= held_cost(rec)

    def usage(self) -> float:
        return max(self.items / self.max_items, self.bytes / self.max_bytes)

    def _update_breaker(self) -> None:
        usage = self.usage()
        if self.breaker_open:
            if usage <= self.low_watermark:
                self.breaker_open = False
        elif usage >= self.high_watermark:
            self.breaker_open = True

    # -- timers ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Apply every expiry, lease lapse and retention end that is due."""
        while self.expiry and self.expiry[0][0] <= now:
            _, seq, qid = heapq.heappop(self.expiry)
            if self.is_queued_entry(seq, qid):
                self.finish(self.records[qid], now, QueueStatus.EXPIRED, REASON_TTL)
        self._promote_delayed(now)
        while self.leases and self.leases[0][0] <= now:
            _, lease_id, qid = heapq.heappop(self.leases)
            rec = self.records.get(qid)
            if rec is None or rec.status is not QueueStatus.PROCESSING or rec.lease_id != lease_id:
                continue
            if rec.lease_expires_at is not None and rec.lease_expires_at > now:
                continue  # extended; a newer heap entry stands for it
            self.lapse(rec, now)
        while self.purge and self.purge[0][0] <= now:
            self._emit(Forgotten(qid=self.purge[0][1], cut=False))
        # Terminal records are metadata only, but a busy local-only daemon makes millions a
        # day: past the cap the oldest go early, counted, so memory stays bounded.
        while len(self.purge) > self.max_retained:
            self._emit(Forgotten(qid=self.purge[0][1], cut=True))
        self._trim_dead(now)
        # Both heaps keep entries of requests that left the queued state; rebuild them once
        # the stale entries outnumber the live ones, so they stay within twice the backlog.
        stale_bound = 64 + 2 * self.queued
        if max(len(self.ready), len(self.expiry), len(self.delayed)) > stale_bound:
            self._compact_heaps()

    def _compact_heaps(self) -> None:
        self.ready = [e for e in self.ready if self.is_ready_entry(e[1], e[2])]
        heapq.heapify(self.ready)
        self.expiry = [e for e in self.expiry if self.is_queued_entry(e[1], e[2])]
        heapq.heapify(self.expiry)
        self.delayed = [e for e in self.delayed if self.not_before.get(e[2]) == e[0]]
        heapq.heapify(self.delayed)

    def pop_ready(
        self,
        max_items: int,
        now: float,
        max_bytes: int | None = None,
        cost: Callable[[QueuedRequest], int] | None = None,
    ) -> Iterator[QueuedRequest]:
        """Pop up to max_items live queued requests, most urgent first; expire the stale ones.

        With max_bytes, stop before (and leave queued) the first whose cost would pass it; the
        first one is always taken. The caller moves each one out of the ready state before
        asking for the next.
        """
        taken = 0
        room = max_bytes
        while self.ready and taken < max_items:
            _, seq, qid = self.ready[0]
            if not self.is_ready_entry(seq, qid):
                heapq.heappop(self.ready)
                continue
            rec = self.records[qid]
            if rec.expires_at <= now:
                heapq.heappop(self.ready)
                self.finish(rec, now, QueueStatus.EXPIRED, REASON_TTL)
                continue
            if room is not None and cost is not None:
                room -= cost(rec)
                if room < 0 and taken:
                    return  # left in the heap, first in line
            heapq.heappop(self.ready)
            taken += 1
            yield rec

    def _push_ready(self, rec: QueuedRequest) -> None:
        heapq.heappush(self.ready, (rec.priority, rec.seq, rec.queue_id))
        heapq.heappush(self.expiry, (rec.expires_at, rec.seq, rec.queue_id))

    def _push_delayed(self, rec: QueuedRequest, not_before: float) -> None:
        # It still expires on its TTL while it waits; it joins ready only when due.
        self.not_before[rec.queue_id] = not_before
        heapq.heappush(self.delayed, (not_before, rec.seq, rec.queue_id))
        heapq.heappush(self.expiry, (rec.expires_at, rec.seq, rec.queue_id))

    def _promote_delayed(self, now: float) -> None:
        """Delayed requests whose time has come join ready with their seq (their old place).

        Not an event: the time it happens follows from the journaled not_before, so replay
        and the next tick reach the same state.
        """
        while self.delayed and self.delayed[0][0] <= now:
            not_before, seq, qid = heapq.heappop(self.delayed)
            if self.is_queued_entry(seq, qid) and self.not_before.get(qid) == not_before:
                del self.not_before[qid]
                heapq.heappush(self.ready, (self.records[qid].priority, seq, qid))
                self.requeues += 1  # wakes waiting dequeues

    def next_ready_at(self) -> float | None:
        """When the earliest delayed request may be handed out, if any waits."""
        return self.delayed[0][0] if self.delayed else None

    def is_queued_entry(self, seq: int, qid: str) -> bool:
        """Whether a heap entry stands for a request that is queued here and not being moved."""
        rec = self.records.get(qid)
        return (
            rec is not None
            and rec.status is QueueStatus.QUEUED
            and rec.seq == seq
            and qid not in self.taken
        )

    def is_ready_entry(self, seq: int, qid: str) -> bool:
        """Whether a ready entry may be handed out: queued here, not moved, not held back."""
        return self.is_queued_entry(seq, qid) and qid not in self.not_before

    def oldest_queued_created_at(self) -> float | None:
        ready = (qid for _, seq, qid in self.ready if self.is_ready_entry(seq, qid))
        return min((self.records[qid].created_at for qid in ready), default=None)
