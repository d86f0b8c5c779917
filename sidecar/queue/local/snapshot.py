"""The local store's state as a snapshot of events, and the restore of one (replay).

A mixin of LocalState: the snapshot the journal writes when it starts a fresh segment, and
the two events (SnapshotHead, Held) that rebuild the state from it through `apply`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator

from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.local.events import AnyEvent, Held, SnapshotHead


class Snapshots:
    """snapshot() and the restore of its events; LocalState provides the fields below."""

    records: dict[str, QueuedRequest]
    leases: list[tuple[float, str, str]]
    not_before: dict[str, float]
    purge: deque[tuple[float, str]]
    dead: deque[tuple[float, str]]
    taken: set[str]
    uncertain: set[str]
    next_seq: int
    counts: dict[str, int]
    retention_cut: int
    max_expired_age_s: float | None
    rejections: dict[str, int]
    queued: int
    processing: int

    def _add(self, rec: QueuedRequest, uncertain: bool, not_before: float | None = None) -> None:
        raise NotImplementedError  # LocalState's

    def _retain(self, rec: QueuedRequest, purge_at: float) -> None:
        raise NotImplementedError  # LocalState's

    def retained_records(self) -> Iterator[tuple[float, QueuedRequest]]:
        """(purge_at, record) of every terminal record, each kind in the order it ends."""
        for index in (self.purge, self.dead):
            for purge_at, qid in index:
                done = self.records.get(qid)
                if done is not None:
                    yield purge_at, done

    def snapshot(self) -> Iterator[AnyEvent]:
        """The whole state as events: a head, the live records, then the retained ones in order.

        A request taken for the hand-over is written as queued and uncertain: after a restart
        nobody knows whether Redis took it, and the reconciliation settles which copy stays.
        """
        yield SnapshotHead(
            next_seq=self.next_seq,
            counts=dict(self.counts),
            retention_cut=self.retention_cut,
            max_expired_age_s=self.max_expired_age_s,
            rejections=dict(self.rejections),
        )
        for qid, rec in self.records.items():
            if rec.status in (QueueStatus.QUEUED, QueueStatus.PROCESSING):
                uncertain = qid in self.uncertain or qid in self.taken
                nb = self.not_before.get(qid)
                yield Held(rec=rec, uncertain=uncertain, purge_at=None, not_before=nb)
        for purge_at, done in self.retained_records():
            yield Held(rec=done, uncertain=done.queue_id in self.uncertain, purge_at=purge_at)

    def _restore_head(self, head: SnapshotHead) -> None:
        self.next_seq = max(self.next_seq, head.next_seq)
        self.counts.update(head.counts)
        self.retention_cut = head.retention_cut
        self.max_expired_age_s = head.max_expired_age_s
        self.rejections = dict(head.rejections)

    def _restore(
        self,
        rec: QueuedRequest,
        uncertain: bool,
        purge_at: float | None,
        not_before: float | None = None,
    ) -> None:
        if purge_at is not None:
            self.records[rec.queue_id] = rec
            self._retain(rec, purge_at)
            if uncertain:
                self.uncertain.add(rec.queue_id)
            return
        status = rec.status
        if status is not QueueStatus.QUEUED:
            not_before = None
        self._add(rec, uncertain, not_before)  # counted as queued; a lease moves it to processing
        if status is QueueStatus.PROCESSING:
            assert rec.lease_expires_at is not None and rec.lease_id is not None
            self.queued -= 1
            self.processing += 1
            heapq.heappush(self.leases, (rec.lease_expires_at, rec.lease_id, rec.queue_id))
