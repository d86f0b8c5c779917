"""The local store's side of the manager over both stores: where a request is held, and the
hand-over of the backlog to Redis (taken, then confirmed or returned) and the reconciliation of
uncertain copies after an outage.

Every change here is a transition of LocalState, journaled like any other, so a crash in the
middle of a move leaves each request here, marked for reconciliation with Redis.
"""

from __future__ import annotations

import heapq
from typing import Protocol

import msgspec

from sidecar.errors import StorageUnavailable
from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.local.state import LocalState


def _held_back(state: LocalState, max_items: int) -> list[QueuedRequest]:
    """Up to max_items queued requests held back by a delay (not being moved), most urgent
    first. Changes nothing: the delayed heap's stale entries are skipped, not popped."""
    live = {
        qid: state.records[qid]
        for nb, seq, qid in state.delayed
        if state.is_queued_entry(seq, qid) and state.not_before.get(qid) == nb
    }
    return heapq.nsmallest(max_items, live.values(), key=lambda r: (r.priority, r.seq))


class _Store(Protocol):
    """What the hand-over uses of the store it is part of (LocalQueue)."""

    _state: LocalState

    def _tick(self) -> float: ...

    def _notify_work(self) -> None: ...

    async def _commit(self) -> None: ...

    async def _commit_quietly(self) -> None: ...


class HandoverSide:
    """LocalQueue's calls for the manager over both stores (ResilientQueue)."""

    def holds(self: _Store, queue_id: str) -> bool:
        """Whether this store has a record of queue_id (pending, being moved, or retained)."""
        return queue_id in self._state.records

    @property
    def empty(self: _Store) -> bool:
        """No record at all: holds() is False for every queue_id."""
        return not self._state.records

    @property
    def queued(self: _Store) -> int:
        """Queued here and not being moved: what the hand-over still has to move."""
        return self._state.queued - len(self._state.taken)

    @property
    def processing(self: _Store) -> int:
        return self._state.processing

    @property
    def moving(self: _Store) -> int:
        return len(self._state.taken)

    async def take_for_handover(self: _Store, max_items: int) -> list[QueuedRequest]:
        """Take up to max_items queued requests, most urgent first, for the move to Redis.

        The ready ones go first, then those held back by a delay (`held_until` tells until
        when), so a delayed request moves with the rest of the backlog; the batch is in line
        order (priority, then arrival), the order Redis numbers them in.

        They stay here, read `queued` and are never dequeued until `confirm_handover` or
        `return_handover`; the taking is on disk before this returns, so a crash in the
        middle of the move leaves each one here, marked for reconciliation with Redis.
        """
        now = self._tick()
        picked = {rec.queue_id: rec for rec in self._state.pop_ready(max_items, now)}
        if len(picked) < max_items:
            for rec in _held_back(self._state, max_items - len(picked)):
                picked[rec.queue_id] = rec
            picked = dict(sorted(picked.items(), key=lambda kv: (kv[1].priority, kv[1].seq)))
        if not picked:
            await self._commit()
            return []
        self._state.take(list(picked))
        try:
            await self._commit()
        except StorageUnavailable:
            self._state.give_back(list(picked))
            return []
        return [msgspec.structs.replace(rec) for rec in picked.values()]

    def held_until(self: _Store, queue_ids: list[str]) -> dict[str, float]:
        """Of these requests, those held back by a delay, with the time it ends."""
        nb = self._state.not_before
        return {q: nb[q] for q in queue_ids if q in nb}

    async def confirm_handover(self: _Store, queue_ids: list[str]) -> None:
        """Redis holds these requests now: forget them here."""
        held = [q for q in queue_ids if q in self._state.taken]
        if held:
            self._state.move_out(held)
        await self._commit_quietly()

    async def return_handover(
        self: _Store, queue_ids: list[str], *, uncertain: bool = False
    ) -> None:
        """The move failed: the requests are queued here again (dequeue, cancel, expiry).

        `uncertain`: Redis may still store them (a timed-out write); recovery settles it.
        """
        held = [q for q in queue_ids if q in self._state.taken]
        if held:
            self._state.give_back(held, uncertain)
            self._notify_work()
        await self._commit_quietly()

    def uncertain_ids(self: _Store) -> list[str]:
        """Requests that may also exist in Redis (a timed-out write, an interrupted move)."""
        return sorted(self._state.uncertain)

    async def drop_queued(self: _Store, queue_id: str) -> bool:
        """Remove one queued request that Redis already holds; False if not queued here."""
        self._tick()
        rec = self._state.records.get(queue_id)
        if rec is None or rec.status is not QueueStatus.QUEUED or queue_id in self._state.taken:
            return False
        self._state.move_out([queue_id])
        await self._commit_quietly()
        return True

    async def resolve_uncertain(self: _Store, queue_id: str) -> None:
        """Redis was checked for this request's copy; the one held here is the real one."""
        if queue_id in self._state.uncertain:
            self._state.resolve(queue_id)
            await self._commit_quietly()
