"""LocalQueue's side of the operators' ops: list, requeue of dead letters, purge.

A list page walks the records once and keeps the first `limit` in order (O(n log limit)):
the local store holds at most QUEUE_MAX_SIZE requests and QUEUE_MAX_DEAD dead letters, and a
page is read by an operator, never on the request path.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import Protocol

import msgspec

from sidecar.errors import InvalidState, NotFound
from sidecar.models import (
    ListPosition,
    ListQuery,
    ListStatus,
    QueuedRequest,
    QueueStatus,
    RecordPage,
    RequeueOutcome,
)
from sidecar.queue.local.state import LocalState

_TERMINAL = {
    ListStatus.COMPLETED: QueueStatus.COMPLETED,
    ListStatus.FAILED: QueueStatus.FAILED,
    ListStatus.EXPIRED: QueueStatus.EXPIRED,
}


class _Store(Protocol):
    """What these ops use of the store they are part of (LocalQueue)."""

    name: str
    _state: LocalState

    def _tick(self) -> float: ...

    def _notify_work(self) -> None: ...

    def _admit(self, fresh: list[QueuedRequest]) -> None: ...

    async def _commit(self) -> None: ...

    async def _settle_reads(self) -> None: ...


def _scored(st: LocalState, status: ListStatus) -> Iterator[tuple[float, QueuedRequest]]:
    """(score, record) of every record of a status, the score in this store's order for it
    (protocol.md 8.19): arrival (seq) for queued, not_before for delayed, the lease's end for
    processing, the time it finished for the rest (dead letters only for failed/expired)."""
    for qid, rec in st.records.items():
        if status is ListStatus.QUEUED:
            if rec.status is QueueStatus.QUEUED and qid not in st.not_before:
                yield float(rec.seq), rec
        elif status is ListStatus.DELAYED:
            nb = st.not_before.get(qid)
            if nb is not None and rec.status is QueueStatus.QUEUED:
                yield nb, rec
        elif status is ListStatus.PROCESSING:
            if rec.status is QueueStatus.PROCESSING and rec.lease_expires_at is not None:
                yield rec.lease_expires_at, rec
        elif rec.status is _TERMINAL[status] and (
            status is ListStatus.COMPLETED or st._kept_dead(rec)
        ):
            yield rec.updated_at, rec


class OperatorSide:
    """LocalQueue's list, requeue_dead and purge_records (sidecar.queue.base.QueueStore)."""

    async def list_records(
        self: _Store, query: ListQuery, after: ListPosition | None
    ) -> RecordPage:
        """One page in this store's order for the status, after `after` (protocol.md 8.19)."""
        self._tick()
        await self._settle_reads()
        sign = -1.0 if query.newest else 1.0
        # Rows sort by (sign * score, queue_id): ties on a score keep one order both ways.
        start = None if after is None else (sign * after.score, after.queue_id)
        rows = (
            ((sign * score, rec.queue_id), rec)
            for score, rec in _scored(self._state, query.status)
            if query.priority is None or rec.priority == query.priority
        )
        if start is not None:
            rows = (row for row in rows if row[0] > start)
        page = heapq.nsmallest(query.limit + 1, rows, key=lambda row: row[0])
        more = len(page) > query.limit
        page = page[: query.limit]
        items = [(self.name, _view(rec, query.payload)) for _, rec in page]
        last = page[-1][0] if more else None
        nxt = None if last is None else ListPosition(self.name, sign * last[0], last[1])
        return RecordPage(items=items, next=nxt)

    async def requeue_dead(self: _Store, queue_ids: Sequence[str]) -> RequeueOutcome:
        """Dead letters back to queued; all checked before any changes (QueueStore)."""
        now = self._tick()
        st = self._state
        revive: list[str] = []
        unchanged: list[str] = []
        for qid in dict.fromkeys(queue_ids):
            rec = st.records.get(qid)
            if rec is None:
                raise NotFound(f"no request {qid}", {"queue_id": qid})
            if rec.status is QueueStatus.QUEUED:
                unchanged.append(qid)  # queued already (requeued before): nothing to do
            elif st._kept_dead(rec):
                revive.append(qid)
            else:
                raise InvalidState(
                    f"request {qid} is {rec.status.value} ({rec.reason or 'no reason'}); only a "
                    "dead letter (failed for good or expired, payload kept) can be requeued",
                    {"queue_id": qid, "status": rec.status.value},
                )
        if revive:
            self._admit([st.records[qid] for qid in revive])
            st.revive(revive, now)
            self._notify_work()
        await self._commit()
        return RequeueOutcome(requeued=revive, unchanged=unchanged)

    async def purge_records(self: _Store, status: ListStatus, older_than_s: float | None) -> int:
        """Forget the records of a status, or those older than older_than_s (QueueStore)."""
        now = self._tick()
        st = self._state
        live = status in (ListStatus.QUEUED, ListStatus.DELAYED, ListStatus.PROCESSING)
        chosen = [
            rec.queue_id
            for _, rec in _scored(st, status)
            if rec.queue_id not in st.taken
            and (
                older_than_s is None
                or now - (rec.created_at if live else rec.updated_at) >= older_than_s
            )
        ]
        if chosen:
            st.purge_now(chosen, now)
        await self._commit()
        return len(chosen)


def _view(rec: QueuedRequest, payload: bool) -> QueuedRequest:
    return msgspec.structs.replace(rec) if payload else msgspec.structs.replace(rec, payload=None)
