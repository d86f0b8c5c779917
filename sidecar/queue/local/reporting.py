"""The local store's transitions reported to its StoreHooks (sidecar.queue.hooks), which the
metrics count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sidecar.models import REASON_TTL, QueuedRequest, QueueStatus
from sidecar.queue.hooks import RETRY_LEASE_EXPIRED, RETRY_WORKER, StoreHooks, failure_kind
from sidecar.queue.local.events import AnyEvent, Finished, Leased, Requeued
from sidecar.queue.local.state import Sink


def report_transitions(store: str, hooks: StoreHooks, records: dict[str, QueuedRequest]) -> Sink:
    """The LocalState observer that calls the hooks for each transition worth counting.

    Called with each live event before it applies, so the record still shows where it came from
    (its attempts before a lease).

    Dispatch is one dict lookup by the event's type: an enqueue, the hot path, finds nothing
    (0.1 us, against 0.5 us for a `match` over the classes).
    """

    def leased(event: Leased) -> None:
        rec = records[event.qid]
        # attempts is 0 again after a fail that did not count; its reason tells them apart.
        if rec.attempts == 0 and rec.reason is None:
            hooks.first_leased(store, event.at - rec.created_at)

    def requeued(event: Requeued) -> None:
        reason = RETRY_LEASE_EXPIRED if event.failed_lease is None else RETRY_WORKER
        hooks.retried(store, reason, 1)

    def finished(event: Finished) -> None:
        if event.status is QueueStatus.EXPIRED:
            hooks.expired(store, event.reason or REASON_TTL, 1)
        elif event.status is QueueStatus.FAILED:
            hooks.failed(store, failure_kind(event.reason), 1)

    table: dict[type, Callable[[Any], None]] = {
        Leased: leased,
        Requeued: requeued,
        Finished: finished,
    }

    def report(event: AnyEvent) -> None:
        handler = table.get(type(event))
        if handler is not None:
            handler(event)

    return report
