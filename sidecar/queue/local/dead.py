"""Dead letters of the local store: what is kept of them, an operator's requeue and purge.

A mixin of LocalState. A dead letter (models.is_dead_letter: failed for good, or expired before
it was processed) keeps its payload for the dead retention, in `dead` (bounded by max_dead),
apart from the metadata-only records of `purge`; `dead_bytes` counts what they hold.
"""

from __future__ import annotations

import sys
from collections import deque

from sidecar.models import REASON_PURGED, QueuedRequest, QueueStatus, is_dead_letter
from sidecar.queue.local.cost import RETAINED_OVERHEAD_BYTES, dead_cost
from sidecar.queue.local.events import AnyEvent, Purged, Revived


class DeadLetters:
    """Dead letters and the operators' transitions; LocalState provides the fields below."""

    records: dict[str, QueuedRequest]
    purge: deque[tuple[float, str]]
    dead: deque[tuple[float, str]]
    dead_bytes: int
    retained_bytes: int
    uncertain: set[str]
    next_seq: int
    counts: dict[str, int]

    def _emit(self, event: AnyEvent) -> AnyEvent:
        raise NotImplementedError  # LocalState's

    def _add(self, rec: QueuedRequest, uncertain: bool, not_before: float | None = None) -> None:
        raise NotImplementedError  # LocalState's

    def _finish(
        self, rec: QueuedRequest, status: QueueStatus, reason: str | None, at: float
    ) -> None:
        raise NotImplementedError  # LocalState's

    @staticmethod
    def _kept_dead(rec: QueuedRequest) -> bool:
        """Whether a terminal record is held as a dead letter (one journaled before they kept
        their payload is an ordinary retained record)."""
        return rec.payload is not None and is_dead_letter(rec.status, rec.reason)

    def _retain(self, rec: QueuedRequest, purge_at: float) -> None:
        if self._kept_dead(rec):
            self.dead.append((purge_at, rec.queue_id))
            self.dead_bytes += dead_cost(rec)
            return
        self.purge.append((purge_at, rec.queue_id))
        self.retained_bytes += RETAINED_OVERHEAD_BYTES + sys.getsizeof(rec.queue_id)

    def _revive(self, qids: list[str], at: float) -> None:
        gone = set(qids)
        for qid in qids:
            rec = self.records[qid]
            self.dead_bytes -= dead_cost(rec)
            rec.expires_at = at + (rec.expires_at - rec.created_at)  # its TTL, anew
            rec.status = QueueStatus.QUEUED
            rec.attempts = 0
            rec.reason = rec.lease_id = rec.failed_lease = rec.lease_expires_at = None
            rec.updated_at = at
            rec.seq = self.next_seq  # last in line, as a new arrival
            self._add(rec, False)
            self.counts["accepted"] += 1  # accepted again: the books stay balanced
        self.dead = deque(e for e in self.dead if e[1] not in gone)

    def _purge(self, qids: list[str], at: float) -> None:
        for qid in qids:
            rec = self.records[qid]
            if rec.status in (QueueStatus.QUEUED, QueueStatus.PROCESSING):
                self._finish(rec, QueueStatus.FAILED, REASON_PURGED, at)
            # Taken out of the deques below, all at once.
            if self._kept_dead(rec):
                self.dead_bytes -= dead_cost(rec)
            else:
                self.retained_bytes -= RETAINED_OVERHEAD_BYTES + sys.getsizeof(qid)
            del self.records[qid]
            self.uncertain.discard(qid)
        gone = set(qids)
        self.purge = deque(e for e in self.purge if e[1] not in gone)
        self.dead = deque(e for e in self.dead if e[1] not in gone)

    def revive(self, qids: list[str], now: float) -> None:
        """Dead letters back to queued (the store checked each one)."""
        self._emit(Revived(qids=qids, at=now))

    def purge_now(self, qids: list[str], now: float) -> None:
        """Forget these records now (the store chose them; live ones end failed first)."""
        self._emit(Purged(qids=qids, at=now))
