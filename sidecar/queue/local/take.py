"""The local store's `take`: lease the one request a queue_id names, if it is queued.

The pick-up of a result by its caller (protocol.md, take): take, hand the result over,
complete. The lease is the same transition as a dequeue's (`Leased`), journaled like every
other change, so a taker that crashes loses nothing: its lease lapses and the request can be
taken again.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.base import new_lease_id
from sidecar.queue.local.state import LocalState


class _Store(Protocol):
    """What take uses of the store it is part of (LocalQueue)."""

    _state: LocalState

    def _tick(self) -> float: ...

    async def _done(self, rec: QueuedRequest) -> QueuedRequest: ...


class TakeSide:
    """LocalQueue's take, and what the manager over both stores asks about it."""

    async def take(self: _Store, queue_id: str, lease_s: float) -> QueuedRequest | None:
        """Lease queue_id if it is queued here (ready or held back by a delay, not expired);
        None when it is not, or while it is being moved to Redis (see `moving_now`)."""
        now = self._tick()  # expires what is due first: an expired request is never taken
        st = self._state
        rec = st.records.get(queue_id)
        if rec is None or rec.status is not QueueStatus.QUEUED or queue_id in st.taken:
            return None
        st.lease(rec, now, lease_s, new_lease_id())
        return await self._done(rec)

    def moving_now(self: _Store, queue_id: str) -> bool:
        """Whether queue_id is in a batch being moved to Redis (taken, not yet confirmed or
        returned): a take must wait for the move to end to know which store has it."""
        return queue_id in self._state.taken
