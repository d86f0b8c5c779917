"""Dead letters of the local store: what is kept of them, an operator's requeue and purge.

A mixin of LocalState. A dead letter (models.is_dead_letter: failed for good, or expired before
it was processed) keeps its payload for the dead retention, in `dead` (bounded by max_dead and
max_dead_bytes), apart from the metadata-only records of `purge`; `dead_bytes` counts what they
hold. With any of the three bounds at 0 no dead letter is kept: such a request is an ordinary
terminal record (metadata only, for the ordinary retention), as in the Redis store.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from itertools import chain

import structlog

from sidecar.models import REASON_PURGED, QueuedRequest, QueueStatus, is_dead_letter
from sidecar.queue.local.cost import RETAINED_OVERHEAD_BYTES, dead_cost
from sidecar.queue.local.events import AnyEvent, Forgotten, Purged, Revived

log = structlog.get_logger("sidecar.local")

# The most ids in one Revived or Purged record: a purge of every dead letter must not write one
# record longer than the journal's torn-tail limit (16 MiB), which would stop the next start.
MAX_IDS_PER_EVENT = 10_000


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
    max_dead: int
    max_dead_bytes: int
    dead_retention_s: float

    def _emit(self, event: AnyEvent) -> AnyEvent:
        raise NotImplementedError  # LocalState's

    def _add(self, rec: QueuedRequest, uncertain: bool, not_before: float | None = None) -> None:
        raise NotImplementedError  # LocalState's

    def _finish(
        self, rec: QueuedRequest, status: QueueStatus, reason: str | None, at: float
    ) -> None:
        raise NotImplementedError  # LocalState's

    @property
    def keeps_dead(self) -> bool:
        """Whether a request that fails for good or expires is kept as a dead letter."""
        return self.max_dead > 0 and self.max_dead_bytes > 0 and self.dead_retention_s > 0

    def _trim_dead(self, now: float) -> None:
        """Forget the dead letters whose retention ended, then the oldest past either cap
        (counted as dead_dropped, each logged by the store's observer)."""
        while self.dead and self.dead[0][0] <= now:
            self._emit(Forgotten(qid=self.dead[0][1], cut=False))
        # They keep their payloads: a count and a byte cap bound them, the oldest going first.
        while self.dead and (
            len(self.dead) > self.max_dead or self.dead_bytes > self.max_dead_bytes
        ):
            qid = self.dead[0][1]
            rec = self.records[qid]
            # Never silently, and by the store itself (the outbox stores have no hooks); a
            # live tick only, so a replay does not log the same drop again.
            cap = "max_dead" if len(self.dead) > self.max_dead else "max_dead_bytes"
            log.warning("dead_letter_dropped", queue_id=qid, status=rec.status.value,
                        reason=rec.reason, bytes=len(rec.payload or b""), cap=cap)  # fmt: skip
            self._emit(Forgotten(qid=qid, cut=True))

    def dead_journal_bytes(self) -> int:
        """About what the dead letters take in the journal (a little less): each one's payload,
        queue_id and reason are there once, in the snapshot or in the segment that enqueued it
        (a Finished record carries no payload); the heap's per-record overhead is not."""
        return self.dead_bytes - len(self.dead) * RETAINED_OVERHEAD_BYTES

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
        self.dead = _without(self.dead, gone, len(gone))

    def _purge(self, qids: list[str], at: float) -> None:
        in_dead = 0
        for qid in qids:
            rec = self.records[qid]
            if rec.status in (QueueStatus.QUEUED, QueueStatus.PROCESSING):
                self._finish(rec, QueueStatus.FAILED, REASON_PURGED, at)
            # Taken out of the deques below, all at once.
            if self._kept_dead(rec):
                self.dead_bytes -= dead_cost(rec)
                in_dead += 1
            else:
                self.retained_bytes -= RETAINED_OVERHEAD_BYTES + sys.getsizeof(qid)
            del self.records[qid]
            self.uncertain.discard(qid)
        gone = set(qids)
        self.purge = _without(self.purge, gone, len(gone) - in_dead)
        self.dead = _without(self.dead, gone, in_dead)

    def revive(self, qids: list[str], now: float) -> None:
        """Dead letters back to queued (the store checked each one)."""
        for chunk in self._chunks(qids):
            self._emit(Revived(qids=chunk, at=now))

    def purge_now(self, qids: list[str], now: float) -> None:
        """Forget these records now (the store chose them; live ones end failed first)."""
        for chunk in self._chunks(qids):
            self._emit(Purged(qids=chunk, at=now))

    def _chunks(self, qids: list[str]) -> Iterator[list[str]]:
        """qids in records of at most MAX_IDS_PER_EVENT, all appended in this loop pass (one
        group commit writes them); in the order of the deques, so a purge of the oldest (or of
        all) takes each chunk off their heads instead of rebuilding them once per chunk."""
        if len(qids) > MAX_IDS_PER_EVENT:
            at = {qid: i for i, (_, qid) in enumerate(chain(self.purge, self.dead))}
            qids = sorted(qids, key=lambda qid: at.get(qid, -1))
        for i in range(0, len(qids), MAX_IDS_PER_EVENT):
            yield qids[i : i + MAX_IDS_PER_EVENT]


def _without(
    index: deque[tuple[float, str]], gone: set[str], count: int
) -> deque[tuple[float, str]]:
    """index without its `count` entries of `gone`: off either end while they are there (the
    oldest, or live records just retained by their purge), else in one rebuild."""
    while count and index and index[0][1] in gone:
        index.popleft()
        count -= 1
    while count and index and index[-1][1] in gone:
        index.pop()
        count -= 1
    return deque(e for e in index if e[1] not in gone) if count else index
