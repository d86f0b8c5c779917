"""ResilientQueue's side of the operators' ops: one view over both stores.

A list walks Redis's records, then the local store's (oldest first; newest first the other
way round), each in its own order, every record named with its store; a requeue or purge goes
to the store that holds each record. While Redis is away only the local store is listed and
purged, and a cursor that points into Redis answers backend_unavailable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from sidecar.models import (
    ListPosition,
    ListQuery,
    ListStatus,
    QueuedRequest,
    RecordPage,
    RequeueOutcome,
)
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient.handover import Handover

T = TypeVar("T")


class _Manager(Protocol):
    local: LocalQueue
    redis: RedisQueue
    handover: Handover

    @property
    def redis_up(self) -> bool: ...

    async def _on_redis(self, call: Callable[[], Awaitable[T]], queue_id: str) -> T: ...


def _start_of(store: str) -> ListPosition:
    """A cursor position at the start of a store's records (nothing of it listed yet)."""
    return ListPosition(store=store, score=0.0, queue_id="")


class ResilientOperatorSide:
    """ResilientQueue's holder, list_records, requeue_dead and purge_records (QueueStore)."""

    def holder(self: _Manager, queue_id: str) -> str:
        """The local store when it has a record of queue_id, else Redis."""
        return self.local.name if self.local.holds(queue_id) else self.redis.name

    async def list_records(
        self: _Manager, query: ListQuery, after: ListPosition | None
    ) -> RecordPage:
        """Redis's page, then the local store's (reversed for newest first), one cursor."""
        order = [self.redis, self.local]
        if query.newest:
            order.reverse()
        if not self.redis_up:
            order = [s for s in order if s is not self.redis or (after and after.store == "redis")]
        index = 0
        if after is not None:
            index = next((i for i, s in enumerate(order) if s.name == after.store), 0)
        items: list[tuple[str, QueuedRequest]] = []
        while index < len(order):
            store = order[index]
            start = (
                None if after is None or after.store != store.name or not after.queue_id else after
            )
            left = query.limit - len(items)
            page = await store.list_records(_with_limit(query, left), start)
            items += page.items
            if page.next is not None:
                return RecordPage(items=items, next=page.next)
            index += 1
            after = None
            if len(items) >= query.limit:
                nxt = _start_of(order[index].name) if index < len(order) else None
                return RecordPage(items=items, next=nxt)
        return RecordPage(items=items, next=None)

    async def requeue_dead(self: _Manager, queue_ids: Sequence[str]) -> RequeueOutcome:
        """Each to the store that holds it; what the local store requeued moves on to Redis.

        Both stores are checked before either changes: Redis's ids first (a check-only script
        run), then the local store checks and requeues its own all or none, then Redis's are
        requeued (all or none). Only a Redis record that leaves in the instant between its
        check and its requeue (its retention ended, a trim) fails the call after the local
        store's were requeued (protocol.md, requeue)."""
        here = [q for q in queue_ids if self.local.holds(q)]
        there = [q for q in queue_ids if not self.local.holds(q)]
        out = RequeueOutcome(requeued=[], unchanged=[])
        if here and there:
            await self._on_redis(lambda: self.redis.check_requeue(there), there[0])
        if here:
            done = await self.local.requeue_dead(here)
            out.requeued += done.requeued
            out.unchanged += done.unchanged
            self.handover.maybe_move()
        if there:
            done = await self._on_redis(lambda: self.redis.requeue_dead(there), there[0])
            out.requeued += done.requeued
            out.unchanged += done.unchanged
        return out

    async def purge_records(self: _Manager, status: ListStatus, older_than_s: float | None) -> int:
        """Both stores' records of the status (the local store's alone while Redis is away)."""
        purged = await self.local.purge_records(status, older_than_s)
        if self.redis_up:
            purged += await self._on_redis(
                lambda: self.redis.purge_records(status, older_than_s), "(purge)"
            )
        return purged


def _with_limit(query: ListQuery, limit: int) -> ListQuery:
    return replace(query, limit=limit)
