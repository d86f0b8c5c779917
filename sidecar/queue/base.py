"""The interface every store keeps (QueueStore), what every store does alike (BaseStore), and
the bookkeeping done once above the stores."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from sidecar.errors import SidecarError
from sidecar.models import (
    EnqueueOutcome,
    FailoverCounters,
    HealthReport,
    ListPosition,
    ListQuery,
    ListStatus,
    QueuedRequest,
    QueueStats,
    QueueStatus,
    RecordPage,
    RequeueOutcome,
)

# Each store's clock: epoch seconds (time.time, or a fake one in tests).
Clock = Callable[[], float]


class QueueStore(Protocol):
    """A store of requests: LocalQueue, RedisQueue, or ResilientQueue over both, which the
    server talks to exactly as to a single store. One contract suite tests them all.

    Every method that names a request raises NotFound when the store does not hold it,
    InvalidState when its status does not allow the operation and LeaseMismatch when the
    lease named is not its current one. A rejected call never changes state.
    """

    name: str

    async def start(self) -> None:
        """Connect or prepare; called once before any other method."""

    async def close(self, timeout_s: float = 5.0) -> None:
        """Release connections and timers; a manager over two stores first hands its local
        backlog to Redis, for at most timeout_s."""

    async def enqueue(self, requests: Sequence[QueuedRequest]) -> list[EnqueueOutcome]:
        """Store new requests (status queued), all or none; an existing queue_id is returned as is.

        The store assigns `seq` (arrival order). Raises QueueFull, storing nothing, when the
        new requests do not fit.
        """
        ...

    async def dequeue(
        self, max_items: int, lease_s: float, max_bytes: int | None = None
    ) -> list[QueuedRequest]:
        """Lease up to max_items of the most urgent queued requests, oldest first among equals.

        With max_bytes, stop before the request whose job_bytes would take the total past it
        (that request stays queued, first in line); at least one is always handed out.
        """
        ...

    async def extend(self, queue_id: str, lease_id: str, lease_s: float) -> QueuedRequest:
        """Push a live lease's end to now + lease_s."""
        ...

    async def complete(self, queue_id: str, lease_id: str) -> QueuedRequest:
        """Mark a leased request completed (repeating it with the same lease is harmless)."""
        ...

    async def complete_brief(self, queue_id: str, lease_id: str) -> None:
        """complete, for a caller that needs no record back (a store may skip reading it)."""
        ...

    async def complete_next(
        self, queue_id: str, lease_id: str, max_items: int, lease_s: float, max_bytes: int | None
    ) -> CompleteNextOutcome:
        """complete, and dequeue up to max_items, in one call (BaseStore.complete_next)."""
        ...

    async def fail(
        self,
        queue_id: str,
        lease_id: str,
        reason: str,
        retry: bool,
        delay_s: float = 0.0,
        counts: bool = True,
    ) -> QueuedRequest:
        """End a lease with a failure: queued again (not before now + delay_s) or failed.

        With retry and not counts, the delivery it ends is not counted (`attempts` goes back by
        one), so max_attempts never runs out this way: only the TTL bounds the request.
        """
        ...

    async def cancel(self, queue_id: str) -> QueuedRequest:
        """Fail a queued request with the reason `cancelled`."""
        ...

    async def take(self, queue_id: str, lease_s: float) -> QueuedRequest | None:
        """Lease this one request if it is queued (ready or held back, not expired), as
        dequeue would; None when it is not (unknown, processing, finished). Of two
        concurrent takes, one gets it."""
        ...

    async def status(self, queue_id: str) -> QueuedRequest | None:
        """The request as stored now, or None when unknown or past its retention."""
        ...

    def holder(self, queue_id: str) -> str:
        """The name of the store that holds the request, as far as this store knows without
        asking Redis (BaseStore: its own name)."""
        ...

    async def list_records(self, query: ListQuery, after: ListPosition | None) -> RecordPage:
        """One page of the records of query.status in the store's order for it (protocol.md
        8.19), starting after `after`; payloads only with query.payload. A page may hold fewer
        than query.limit while `next` is set (a priority filter skips records, within a bound)."""
        ...

    async def requeue_dead(self, queue_ids: Sequence[str]) -> RequeueOutcome:
        """Dead letters back to queued with attempts 0, id and payload kept, last in line; a
        queued one is unchanged. NotFound / InvalidState (a completed or cancelled one, or
        one without its payload) for the first that cannot, before anything changes."""
        ...

    async def purge_records(self, status: ListStatus, older_than_s: float | None) -> int:
        """Forget the records of a status (all, or those older than older_than_s: since they
        finished, or since they arrived for live ones); a live request purged counts as failed
        with the reason `purged`. The caller checks the force flag. Returns how many."""
        ...

    async def stats(self) -> QueueStats:
        """Counts, usage and breaker state."""
        ...

    async def health(self) -> HealthReport:
        """Whether the store can serve, and why not."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a request may have become available, or after timeout seconds."""

    # -- what the metrics read at scrape time, never on the request path ----------------------

    @property
    def store_names(self) -> tuple[str, ...]:
        """The names of the stores requests are held in: this store's own, or both under a
        manager (the `store` label of the metrics)."""
        ...

    async def queued_by_priority(self) -> dict[str, dict[int, int]]:
        """Requests waiting in line (not delayed, not being moved) per priority, per store name.

        A manager leaves out its Redis while Redis cannot be read; a RedisQueue alone raises
        BackendUnavailable then.
        """
        ...

    def failover_counters(self) -> FailoverCounters | None:
        """The failover manager's counters; None from a single store."""
        ...


@dataclass(slots=True)
class CompleteNextOutcome:
    """What complete_next did: the completed record or the settle's error, and the new leases."""

    completed: QueuedRequest | None
    error: SidecarError | None
    leased: list[QueuedRequest]


# One settle's outcome in settle_then_lease: the record (None from complete_brief), or the
# SidecarError that settle answered.
Settled = QueuedRequest | None | SidecarError


async def settle_then_lease(
    settles: Sequence[Awaitable[QueuedRequest | None]],
    store: QueueStore,
    max_items: int,
    lease_s: float,
    max_bytes: int | None,
) -> tuple[list[Settled], list[QueuedRequest]]:
    """The settles, then (when max_items > 0) the store's dequeue, run as tasks of one loop
    pass: the settles start first, and on Redis they all go out together, one round trip. The
    leases stand whether or not a settle succeeds: a settle's SidecarError (lease lost, not
    found, Redis away for a request held there) is returned in its place, not raised, so a
    worker's free slots are filled either way (protocol.md 8.12, 8.13). An error of the dequeue,
    or any other error of a settle, is raised once all have ended.
    """
    leasing = [store.dequeue(max_items, lease_s, max_bytes)] if max_items > 0 else []
    outcomes = await asyncio.gather(*settles, *leasing, return_exceptions=True)
    leased = outcomes.pop() if leasing else []
    if isinstance(leased, BaseException):
        raise leased
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, SidecarError):
            raise outcome
    return cast(list[Settled], outcomes), cast(list[QueuedRequest], leased)


class BaseStore(QueueStore):
    """What every store does the same way, written once; each store implements the rest of
    QueueStore (its own calls to its own data)."""

    async def complete_next(
        self, queue_id: str, lease_id: str, max_items: int, lease_s: float, max_bytes: int | None
    ) -> CompleteNextOutcome:
        """Complete one lease and lease up to max_items more (protocol.md 8.12): the store's
        complete, then its dequeue, in one loop pass (settle_then_lease)."""
        [settled], leased = await settle_then_lease(
            [self.complete(queue_id, lease_id)], self, max_items, lease_s, max_bytes
        )
        if isinstance(settled, SidecarError):
            return CompleteNextOutcome(None, settled, leased)
        return CompleteNextOutcome(settled, None, leased)

    def holder(self, queue_id: str) -> str:
        return self.name

    @property
    def store_names(self) -> tuple[str, ...]:
        return (self.name,)

    def failover_counters(self) -> FailoverCounters | None:
        return None


# What a job adds to a dequeue reply beyond its payload, queue_id and lease_id: nine keys (96
# bytes), their headers, three float64s and three ints (135 bytes at most), rounded up.
JOB_FIXED_BYTES = 160


def job_bytes(size_bytes: int, queue_id: str, lease_id: str) -> int:
    """An upper bound of what one leased request costs in a dequeue reply (max_bytes counts it)."""
    return size_bytes + JOB_FIXED_BYTES + len(queue_id) + len(lease_id)


# 80 random bits per process, then a 48-bit counter: unique across hosts and restarts like a
# UUID4, without a getrandom syscall and a UUID object on every enqueue (9% of the daemon's
# time in the enqueue bench). Guessable within a process, which is fine: the socket is 0660.
_ID_PREFIX = os.urandom(10).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_queue_id() -> str:
    """A fresh queue_id: 32 hex digits, unique without coordination."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def new_lease_id() -> str:
    """A lease token that a worker must present to settle the request it was handed."""
    return secrets.token_hex(8)


def new_request(
    *,
    payload: bytes,
    priority: int,
    ttl_s: float,
    max_attempts: int,
    now: float,
    queue_id: str | None = None,
) -> QueuedRequest:
    """Build the record of a request about to be enqueued (seq is assigned by the store)."""
    return QueuedRequest(
        queue_id=queue_id or new_queue_id(),
        priority=priority,
        seq=0,
        created_at=now,
        expires_at=now + ttl_s,
        status=QueueStatus.QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        updated_at=now,
        payload=payload,
        size_bytes=len(payload),
    )
