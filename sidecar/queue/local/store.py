"""LocalQueue: the bounded local store (min-heap, strict limits, watermark breaker, journal).

It never evicts what it holds. Every change is a transition of `LocalState` whose event the
journal appends; each call awaits the commit of its loop pass before it returns, so a reply
never promises what a crash of the daemon could take back. Without a journal (unit tests)
the same store runs in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import msgspec
import structlog

from sidecar.errors import InvalidState, LeaseMismatch, NotFound, QueueFull, StorageUnavailable
from sidecar.models import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    REASON_ATTEMPTS_EXHAUSTED,
    REASON_CANCELLED,
    EnqueueOutcome,
    HealthReport,
    HealthStatus,
    QueuedRequest,
    QueueStats,
    QueueStatus,
    ServingMode,
)
from sidecar.queue.base import BaseStore, Clock, job_bytes, new_lease_id
from sidecar.queue.hooks import NO_HOOKS, StoreHooks
from sidecar.queue.local.cost import held_cost
from sidecar.queue.local.handover import HandoverSide
from sidecar.queue.local.journal import Journal
from sidecar.queue.local.operators import OperatorSide
from sidecar.queue.local.reporting import report_transitions
from sidecar.queue.local.state import LocalState
from sidecar.queue.local.take import TakeSide
from sidecar.queue.local.trim import EmptyTrim, glibc_malloc_trim

log = structlog.get_logger("sidecar.local")


def _glibc_trim(held: Callable[[], int]) -> EmptyTrim:
    return EmptyTrim(glibc_malloc_trim(), held)


# While the journal cannot write, an enqueue retries it (a snapshot) at most this often.
RECOVER_EVERY_S = 1.0


class LocalQueue(TakeSide, HandoverSide, OperatorSide, BaseStore):
    """The local store; bounded by item count and payload memory, never evicting.

    Its side of the manager over both stores (where a request is, the hand-over to Redis) is
    HandoverSide, in handover.py; its take (lease one request by queue_id) is in take.py.
    """

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
        journal: Journal | None = None,
        recover_every_s: float = RECOVER_EVERY_S,
        hooks: StoreHooks = NO_HOOKS,
        trim: Callable[[Callable[[], int]], EmptyTrim] | None = None,
        dead_retention_s: float | None = None,
        max_dead: int = 10_000,
        max_dead_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """trim: makes the EmptyTrim given how many requests are held (a seam for tests); by
        default glibc's malloc_trim once the store empties (trim.py)."""
        self.retry_after_s = retry_after_s
        self.recover_every_s = recover_every_s
        self._hooks = hooks
        self._clock = clock
        self._journal = journal
        self._state = LocalState(
            max_items=max_items,
            max_bytes=max_bytes,
            high_watermark=high_watermark,
            low_watermark=low_watermark,
            retention_s=retention_s,
            max_retained=max_retained,
            dead_retention_s=dead_retention_s,
            max_dead=max_dead,
            max_dead_bytes=max_dead_bytes,
        )
        if hooks is not NO_HOOKS:
            self._state.observer = report_transitions(self.name, hooks, self._state.records)
        self._work = asyncio.Event()
        self._last_recover = 0.0
        # Requests acknowledged but not kept on disk at close (no journal, or it failed).
        self.unkept_at_close = 0
        self._empty_trim = (trim or _glibc_trim)(lambda: self._state.items)

    @property
    def max_items(self) -> int:
        return self._state.max_items

    @property
    def max_bytes(self) -> int:
        return self._state.max_bytes

    async def start(self) -> None:
        """Replay the journal (snapshot, then segments) and open a fresh segment."""
        if self._journal is None:
            return
        began = time.monotonic()
        skipped = 0
        for event in self._journal.open():
            try:
                self._state.apply(event)
            except KeyError:
                # A change to a request this replay never saw: the file that held it was moved
                # aside after damage. The request is gone either way; its later changes go too.
                skipped += 1
        if skipped:
            log.warning("journal_changes_skipped", count=skipped, reason="unknown request")
        self._state.sink = self._journal.append
        self._journal.snapshot_source = self._state.snapshot
        self._journal.start()
        if self._state.taken:
            # The daemon died inside a hand-over: whether Redis took the batch is unknown, so
            # it is queued here again and marked for the reconciliation with Redis.
            self._state.give_back(sorted(self._state.taken), uncertain=True)
        self._state.tick(self._clock())  # leases that lapsed while the daemon was down
        await self._commit()
        log.info(
            "journal_replayed",
            directory=str(self._journal.directory),
            records=self._journal.records_replayed,
            queued=self._state.queued,
            processing=self._state.processing,
            uncertain=len(self._state.uncertain),
            seconds=round(time.monotonic() - began, 3),
        )

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write the final snapshot; count what could not be kept on disk (timeout_s: unused,
        a local store has nothing to hand over)."""
        self._empty_trim.cancel()
        held = self._state.queued + self._state.processing
        if self._journal is None:
            self.unkept_at_close = held
            return
        kept = await self._journal.close()
        self.unkept_at_close = 0 if kept else held

    # -- the contract ------------------------------------------------------------------------

    async def enqueue(
        self, requests: Sequence[QueuedRequest], *, uncertain: bool = False
    ) -> list[EnqueueOutcome]:
        """Store new requests all-or-none; existing queue_ids come back unchanged.

        `uncertain`: a Redis write of these requests timed out and may still land there.
        """
        now = self._tick()
        fresh: dict[str, QueuedRequest] = {}
        for req in requests:
            if req.queue_id not in self._state.records and req.queue_id not in fresh:
                fresh[req.queue_id] = req
        if fresh:
            self._check_storage()
            self._admit(list(fresh.values()))
        results: list[EnqueueOutcome] = []
        stored: set[str] = set()
        for req in requests:
            created = req.queue_id in fresh and req.queue_id not in stored
            if created:
                self._state.enqueue(fresh[req.queue_id], now, uncertain)
                stored.add(req.queue_id)
            results.append(EnqueueOutcome(request=self._view(req.queue_id), created=created))
        try:
            await self._commit()
        except StorageUnavailable:
            self._undo(list(fresh.values()))
            raise
        if fresh:
            self._notify_work()
        return results

    async def dequeue(
        self, max_items: int, lease_s: float, max_bytes: int | None = None
    ) -> list[QueuedRequest]:
        """Lease the most urgent queued requests, skipping any that expired, within max_bytes."""
        now = self._tick()
        out: list[QueuedRequest] = []
        lease_ids = [new_lease_id() for _ in range(max(max_items, 0))]

        def cost(rec: QueuedRequest) -> int:
            return job_bytes(rec.size_bytes, rec.queue_id, lease_ids[len(out)])

        for rec in self._state.pop_ready(max_items, now, max_bytes, cost):
            self._state.lease(rec, now, lease_s, lease_ids[len(out)])
            out.append(msgspec.structs.replace(rec))
        await self._commit()
        return out

    async def extend(self, queue_id: str, lease_id: str, lease_s: float) -> QueuedRequest:
        """Push a live lease's end to now + lease_s."""
        now = self._tick()
        rec = self._leased(queue_id, lease_id)
        self._state.extend(rec, now, lease_s)
        return await self._done(rec)

    async def complete(self, queue_id: str, lease_id: str) -> QueuedRequest:
        """Complete a leased request; a repeat with the same lease returns the completed record."""
        now = self._tick()
        rec = self._get(queue_id)
        if rec.status is QueueStatus.COMPLETED and rec.lease_id == lease_id:
            return await self._done(rec)
        rec = self._leased(queue_id, lease_id)
        self._state.finish(rec, now, QueueStatus.COMPLETED, None)
        return await self._done(rec)

    async def complete_brief(self, queue_id: str, lease_id: str) -> None:
        """complete: the record is at hand here, so there is nothing to spare."""
        await self.complete(queue_id, lease_id)

    async def fail(
        self,
        queue_id: str,
        lease_id: str,
        reason: str,
        retry: bool,
        delay_s: float = 0.0,
        counts: bool = True,
    ) -> QueuedRequest:
        """End a lease with a failure; requeue (not before now + delay_s) while attempts remain.

        With retry and not counts, the delivery is not counted: attempts goes back by one and
        the request is always requeued. A repeat is answered before anything changes, so it
        never gives an attempt back twice.
        """
        now = self._tick()
        rec = self._get(queue_id)
        if rec.failed_lease == lease_id and rec.status is not QueueStatus.PROCESSING:
            return await self._done(rec)  # a repeat: answer the record as it is now
        rec = self._leased(queue_id, lease_id)
        if retry and (not counts or rec.attempts < rec.max_attempts):
            not_before = now + delay_s if delay_s > 0 else None
            self._state.requeue(rec, now, reason, lease_id, not_before, refund=not counts)
            # Wakes waiting dequeues: they lease it now, or shorten their wait to not_before.
            self._notify_work()
        else:
            final = reason if not retry else f"{REASON_ATTEMPTS_EXHAUSTED}: {reason}"
            self._state.finish(rec, now, QueueStatus.FAILED, final, failed_lease=lease_id)
        return await self._done(rec)

    async def cancel(self, queue_id: str) -> QueuedRequest:
        """Fail a queued request with the reason `cancelled`."""
        now = self._tick()
        rec = self._get(queue_id)
        if queue_id in self._state.taken:
            raise InvalidState(
                f"request {queue_id} is being moved to Redis; cancel it again once the move ends",
                {"queue_id": queue_id, "status": rec.status.value},
            )
        if rec.status is not QueueStatus.QUEUED:
            raise InvalidState(
                f"request {queue_id} is {rec.status.value}; only a queued request can be cancelled",
                {"queue_id": queue_id, "status": rec.status.value},
            )
        self._state.finish(rec, now, QueueStatus.FAILED, REASON_CANCELLED)
        return await self._done(rec)

    async def status(self, queue_id: str) -> QueuedRequest | None:
        """The request as held now, or None."""
        self._tick()
        await self._settle_reads()
        rec = self._state.records.get(queue_id)
        return None if rec is None else msgspec.structs.replace(rec)

    async def stats(self) -> QueueStats:
        """Counts, usage against limits, breaker state, rejections and the journal's state."""
        now = self._tick()
        await self._settle_reads()
        st = self._state
        oldest = st.oldest_queued_created_at()
        warnings = []
        if st.retention_cut:
            warnings.append(
                f"{st.retention_cut} finished requests were forgotten before their "
                f"retention ended: more than {st.max_retained} were retained"
            )
        if self._journal is not None and self._journal.failed is not None:
            warnings.append(self._storage_reason())
        return QueueStats(
            store=self.name,
            queued=st.queued,
            processing=st.processing,
            accepted=st.counts["accepted"],
            completed=st.counts["completed"],
            failed=st.counts["failed"],
            expired=st.counts["expired"],
            items=st.items,
            bytes=st.bytes,
            max_items=st.max_items,
            max_bytes=st.max_bytes,
            usage=round(st.usage(), 4),
            breaker_open=st.breaker_open,
            rejections=dict(st.rejections),
            oldest_queued_age_s=None if oldest is None else max(0.0, now - oldest),
            max_expired_age_s=st.max_expired_age_s,
            retained=len(st.purge) + len(st.dead),
            retained_bytes=st.retained_bytes + st.dead_bytes,
            dead_letters=len(st.dead),
            dead_letters_bytes=st.dead_bytes,
            dead_letters_dropped=st.counts["dead_dropped"],
            retention_cut=st.retention_cut,
            warnings=warnings,
            moved_out=st.counts["moved_out"],
        )

    async def health(self) -> HealthReport:
        """ok, or degraded while the breaker is open or the journal cannot write."""
        self._tick()
        reasons = []
        if self._state.breaker_open:
            reasons.append("local queue above its watermark")
        if self._journal is not None and self._journal.failed is not None:
            self._maybe_recover()
        if self._journal is not None and self._journal.failed is not None:
            reasons.append(self._storage_reason())
        status = HealthStatus.DEGRADED if reasons else HealthStatus.OK
        return HealthReport(status=status, mode=ServingMode.LOCAL_ONLY, reasons=reasons)

    async def wait_for_work(self, timeout: float) -> None:
        """Wait for an enqueue or requeue here, the next lease to lapse or delay to end."""
        now = self._tick()
        if self._state.ready:
            return
        if self._state.leases:
            timeout = min(timeout, max(0.0, self._state.leases[0][0] - now))
        ready_at = self._state.next_ready_at()
        if ready_at is not None:
            timeout = min(timeout, max(0.0, ready_at - now))
        event = self._work
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def queued_by_priority(self) -> dict[str, dict[int, int]]:
        """Requests waiting in line (not delayed, not being moved) per priority.

        One pass over the records: read at scrape time only, never on the request path.
        """
        counts = dict.fromkeys(range(PRIORITY_MIN, PRIORITY_MAX + 1), 0)
        st = self._state
        for qid, rec in st.records.items():
            if rec.status is QueueStatus.QUEUED and qid not in st.not_before:
                counts[rec.priority] += qid not in st.taken
        return {self.name: counts}

    # -- capacity and storage -----------------------------------------------------------------

    def _admit(self, fresh: list[QueuedRequest]) -> None:
        """Raise QueueFull unless every fresh request fits; nothing is stored either way."""
        st = self._state
        add_bytes = sum(held_cost(r) for r in fresh)
        reason = None
        if st.breaker_open:
            reason = "high_watermark"
        elif st.items + len(fresh) > st.max_items:
            reason = "max_size"
        elif st.bytes + add_bytes > st.max_bytes:
            reason = "max_memory"
        elif self._journal is not None and (
            # Dead letters never refuse a request: their own caps bound them, so what they take
            # on disk is left out (not a share of the budget: what the queue can take must not
            # depend on what an outage left behind).
            self._journal.disk_bytes - st.dead_journal_bytes() + add_bytes > self._journal.max_bytes
        ):
            reason = "max_journal"
        if reason is None:
            return
        st.rejections[reason] = st.rejections.get(reason, 0) + len(fresh)
        self._hooks.rejected(self.name, reason, len(fresh))
        raise QueueFull(
            f"local queue is full ({reason}): {st.items}/{st.max_items} items, "
            f"{st.bytes}/{st.max_bytes} bytes",
            {
                "reason": reason,
                "items": st.items,
                "max_items": st.max_items,
                "bytes": st.bytes,
                "max_bytes": st.max_bytes,
                "usage": round(st.usage(), 4),
                "retry_after_s": self.retry_after_s,
            },
        )

    def _check_storage(self) -> None:
        if self._journal is None or self._journal.failed is None:
            return
        if self._maybe_recover():
            return
        raise StorageUnavailable(
            f"{self._storage_reason()}; the request was not accepted",
            {"reason": self._journal.failed, "retry_after_s": self.retry_after_s},
        )

    def _maybe_recover(self) -> bool:
        assert self._journal is not None
        now = time.monotonic()
        if now - self._last_recover < self.recover_every_s:
            return False
        self._last_recover = now
        return self._journal.try_recover()

    def _storage_reason(self) -> str:
        assert self._journal is not None
        return (
            f"local journal cannot write ({self._journal.failed}): new requests are refused "
            "(storage_unavailable)"
        )

    def _undo(self, fresh: list[QueuedRequest]) -> None:
        """The enqueue's records never reached the disk: take back those still untouched."""
        undo = [
            r.queue_id
            for r in fresh
            if self._state.records.get(r.queue_id) is r
            and r.status is QueueStatus.QUEUED
            and r.queue_id not in self._state.taken
        ]
        if undo:
            self._state.unaccept(undo)

    async def _commit(self) -> None:
        self._empty_trim.note(self._state.items)  # every change commits, so emptying is seen
        if self._journal is not None and self._journal.pending:
            await self._journal.flushed()

    async def _commit_quietly(self) -> None:
        # A change whose record failed to reach the disk stays in memory (and in the next
        # snapshot); what it protects is then re-checked after a restart, never lost.
        with contextlib.suppress(StorageUnavailable):
            await self._commit()

    async def _settle_reads(self) -> None:
        # A read waits for the changes of its loop pass, so it never shows what a crash could undo.
        await self._commit_quietly()

    async def _done(self, rec: QueuedRequest) -> QueuedRequest:
        await self._commit()
        return msgspec.structs.replace(rec)

    # -- helpers --------------------------------------------------------------------------------

    def _tick(self) -> float:
        now = self._clock()
        requeues = self._state.requeues
        self._state.tick(now)
        if self._state.requeues != requeues:
            self._notify_work()
        return now

    def _notify_work(self) -> None:
        # Waking every waiter and starting a fresh event means no waiter can miss a notice.
        self._work.set()
        self._work = asyncio.Event()

    def _get(self, queue_id: str) -> QueuedRequest:
        rec = self._state.records.get(queue_id)
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
        return msgspec.structs.replace(self._state.records[queue_id])
