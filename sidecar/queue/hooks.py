"""What the stores tell an observer (the metrics) when a request changes in a way worth counting.

The stores call these where the change happens; the default does nothing, so a store built
without an observer (the unit tests) pays one no-op call. Reasons are a small fixed set, never a
worker's free text, so they can be metric labels.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.models import REASON_ATTEMPTS_EXHAUSTED, REASON_CANCELLED

# Why a request went back to the queue.
RETRY_WORKER = "worker_retry"  # a worker's fail with retry
RETRY_LEASE_EXPIRED = "lease_expired"  # the lease lapsed (a crashed or stalled worker)
# Why a request ended failed.
FAILED_CANCELLED = REASON_CANCELLED
FAILED_EXHAUSTED = REASON_ATTEMPTS_EXHAUSTED  # retries (or lapsed leases) used every attempt
FAILED_WORKER = "worker_failed"  # a worker's fail without retry


def failure_kind(reason: str | None) -> str:
    """The label for a failed request's recorded reason (free text) as one of three kinds."""
    if reason == REASON_CANCELLED:
        return FAILED_CANCELLED
    if reason is not None and reason.startswith(REASON_ATTEMPTS_EXHAUSTED):
        return FAILED_EXHAUSTED
    return FAILED_WORKER


class StoreHooks(Protocol):
    """Counted events of a store; `store` is the store's name (local or redis)."""

    def expired(self, store: str, reason: str, count: int) -> None:
        """Requests expired (reason: the record's reason, ttl_elapsed)."""

    def retried(self, store: str, reason: str, count: int) -> None:
        """Requests went back to queued (RETRY_WORKER or RETRY_LEASE_EXPIRED)."""

    def failed(self, store: str, reason: str, count: int) -> None:
        """Requests ended failed (one of the FAILED_* kinds)."""

    def first_leased(self, store: str, wait_s: float) -> None:
        """A request was handed out for the first time, wait_s after it was enqueued."""

    def rejected(self, store: str, reason: str, count: int) -> None:
        """An enqueue of `count` requests was refused for capacity (reason as in queue_full)."""


class NoHooks:
    """The default observer: counts nothing."""

    def expired(self, store: str, reason: str, count: int) -> None:
        pass

    def retried(self, store: str, reason: str, count: int) -> None:
        pass

    def failed(self, store: str, reason: str, count: int) -> None:
        pass

    def first_leased(self, store: str, wait_s: float) -> None:
        pass

    def rejected(self, store: str, reason: str, count: int) -> None:
        pass


NO_HOOKS: StoreHooks = NoHooks()
