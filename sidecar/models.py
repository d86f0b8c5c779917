"""The records both stores keep and the statistics they report."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import msgspec

# Priority: 0 is the most urgent, 9 the least; the default sits in the middle so a producer can
# both raise and lower a request. The same range and direction hold in every store and on the wire.
PRIORITY_MIN = 0
PRIORITY_MAX = 9
PRIORITY_DEFAULT = 5

# Upper bounds of the durations a client or a setting may ask for. Every store must represent
# `now + duration` exactly: Redis scripts turn times into integer milliseconds in Lua doubles
# (exact only below 2^53 ms) and `PEXPIREAT` of an overflowed, negative time deletes the key.
# 30 days of TTL is far beyond any useful wait for an LLM call yet keeps every sum tiny; a day of
# lease outlasts the slowest batch job, and a worker that needs longer extends it. Retention
# (operator-set only) gets a year; a dequeue's long poll a day, before max_wait_s lowers it.
MAX_TTL_S = 30 * 24 * 3600.0
MAX_LEASE_S = 24 * 3600.0
MAX_WAIT_S = 24 * 3600.0
MAX_RETENTION_S = 365 * 24 * 3600.0
# A fail's delay before the request is handed out again: past the longest TTL it would expire
# first anyway.
MAX_DELAY_S = MAX_TTL_S


class QueueStatus(enum.StrEnum):
    """The five states of a request's life cycle."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    FAILED = "failed"


class ServingMode(enum.StrEnum):
    """Which store serves: the local one alone (no Redis configured), Redis, or the local
    fallback while Redis cannot serve."""

    LOCAL_ONLY = "local_only"
    REDIS = "redis"
    LOCAL_FALLBACK = "local_fallback"


class QueueName(enum.StrEnum):
    """The daemon's named queues, each a store of its own (protocol.md 7.11): requests, and
    the two outbox queues where results wait for their caller."""

    REQUESTS = "requests"  # the default: requests waiting for a worker
    DELIVERIES = "deliveries"  # results waiting to be POSTed to a callback URL
    PICKUPS = "pickups"  # results waiting for their caller to take them by queue_id


class HealthStatus(enum.StrEnum):
    """What a store or the daemon says of its health: ok, degraded (serving, with reasons), or
    unhealthy (a store that cannot serve)."""

    OK = "ok"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


# Reasons a request ends up failed or expired, recorded in QueuedRequest.reason.
REASON_CANCELLED = "cancelled"
REASON_ATTEMPTS_EXHAUSTED = "attempts_exhausted"
REASON_TTL = "ttl_elapsed"


# Ended by an operator's forced purge (someone meant it: not a dead letter).
REASON_PURGED = "purged"


class ListStatus(enum.StrEnum):
    """What an operator lists by (the `list` op): a QueueStatus, with queued split into the
    requests in line and those held back by a fail's delay (delayed)."""

    QUEUED = "queued"
    DELAYED = "delayed"
    PROCESSING = "processing"
    FAILED = "failed"
    COMPLETED = "completed"
    EXPIRED = "expired"


# The statuses whose records are finished (purge needs no force for them).
FINISHED_LIST_STATUSES = frozenset({ListStatus.FAILED, ListStatus.COMPLETED, ListStatus.EXPIRED})
# Dead letters: failed for good or expired before being processed, kept with their payload.
DEAD_LIST_STATUSES = frozenset({ListStatus.FAILED, ListStatus.EXPIRED})


def is_dead_letter(status: QueueStatus, reason: str | None) -> bool:
    """Whether a terminal record is a dead letter: expired, or failed other than by someone's
    intent (a cancel or a forced purge)."""
    if status is QueueStatus.EXPIRED:
        return True
    return status is QueueStatus.FAILED and reason not in (REASON_CANCELLED, REASON_PURGED)


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One page of a `list`: which records, in which order, how many, with payloads or not."""

    status: ListStatus
    priority: int | None = None
    newest: bool = False
    limit: int = 50
    payload: bool = False
    # The most bytes of records in the page (the page stops before the one that would pass it,
    # keeping at least one); None: no bound. A store may use it to stop early (Redis does).
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ListPosition:
    """Where a page of `list` ended: the store, the record's score in that store's order (see
    protocol.md 8.19) and its queue_id, which breaks ties."""

    store: str
    score: float
    queue_id: str


@dataclass(slots=True)
class RecordPage:
    """A page of records (each with its store's name) and where the next page starts."""

    items: list[tuple[str, QueuedRequest]]
    next: ListPosition | None


@dataclass(slots=True)
class RequeueOutcome:
    """What a requeue did: the dead letters queued again, and the ids already queued (a no-op)."""

    requeued: list[str]
    unchanged: list[str]


class QueuedRequest(msgspec.Struct, kw_only=True, gc=False):
    """One request as a store holds it: metadata plus the opaque MessagePack payload.

    gc=False: the fields are scalars and bytes, so no cycles are possible and the GC header
    (16 bytes per record) is saved.
    """

    queue_id: str
    priority: int
    # Arrival order, assigned by the store that accepted the request; breaks priority ties.
    seq: int
    created_at: float
    expires_at: float
    status: QueueStatus
    attempts: int
    max_attempts: int
    updated_at: float
    # The payload exactly as it arrived on the wire (raw MessagePack); None once terminal,
    # since only metadata is retained.
    payload: bytes | None
    size_bytes: int
    lease_id: str | None = None
    lease_expires_at: float | None = None
    reason: str | None = None
    # The lease whose `fail` last ended a lease of this request, so a repeated fail with it is
    # recognised and answered with the record as it is now (as a repeated complete is).
    failed_lease: str | None = None


class EnqueueOutcome(msgspec.Struct, kw_only=True, gc=False):
    """The outcome of one enqueued item: the stored request, and whether this call created it."""

    request: QueuedRequest
    created: bool


class QueueStats(msgspec.Struct, kw_only=True):
    """Counts, usage and breaker state of one store (or of the stores combined)."""

    store: str
    # Current counts.
    queued: int
    processing: int
    # Cumulative counts since the store's books began (cancelled requests count as failed).
    accepted: int
    completed: int
    failed: int
    expired: int
    # Requests held (queued + processing) and their payload bytes, against the limits.
    items: int
    bytes: int
    max_items: int | None = None
    max_bytes: int | None = None
    usage: float = 0.0
    breaker_open: bool = False
    rejections: dict[str, int] = msgspec.field(default_factory=dict)
    oldest_queued_age_s: float | None = None
    # Age (now - created_at) of the oldest request at the moment it expired.
    max_expired_age_s: float | None = None
    # Terminal records still readable by queue_id, and the bytes their metadata costs.
    retained: int = 0
    retained_bytes: int = 0
    # Terminal records dropped before their retention ended because the cap was reached.
    retention_cut: int = 0
    # Store-specific notes an operator should see (for example a wrong Redis eviction policy).
    warnings: list[str] = msgspec.field(default_factory=list)
    # Requests this store handed to another store (the local backlog moved to Redis).
    moved_out: int = 0
    # The failover manager's view; empty or zero for a single store (mode: a ServingMode).
    mode: str = ""
    stores: dict[str, QueueStats] = msgspec.field(default_factory=dict)
    failovers: int = 0
    recoveries: int = 0
    degraded_s: float = 0.0
    redis_data_lost: int = 0
    # Dead letters held (failed for good or expired, kept with their payload) and their bytes,
    # and how many were dropped before their retention ended because QUEUE_MAX_DEAD was reached.
    dead_letters: int = 0
    dead_letters_bytes: int = 0
    dead_letters_dropped: int = 0

    @property
    def balanced(self) -> bool:
        """The books: accepted = queued + processing + completed + failed + expired (+ moved)."""
        return books_balance(self)


class Books(Protocol):
    """The counts that balance: a store's QueueStats, or the stats reply on the wire."""

    @property
    def queued(self) -> int: ...
    @property
    def processing(self) -> int: ...
    @property
    def accepted(self) -> int: ...
    @property
    def completed(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def expired(self) -> int: ...
    @property
    def moved_out(self) -> int: ...


def books_balance(s: Books) -> bool:
    """Whether accepted = queued + processing + completed + failed + expired + moved_out."""
    total = s.queued + s.processing + s.completed + s.failed + s.expired
    return s.accepted == total + s.moved_out


class HealthReport(msgspec.Struct, kw_only=True):
    """What a store or the daemon says about its own health."""

    status: HealthStatus
    mode: ServingMode
    reasons: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FailoverCounters:
    """The failover manager's counters since it started (a single store has none)."""

    failovers: int  # times Redis stopped serving and the local store took over
    recoveries: int  # times Redis served again
    degraded_s: float  # seconds served from the local fallback
    data_lost: int  # times Redis came back without its data
    backlog: int  # local requests still to move to Redis (queued or being moved)
    moved: int  # requests moved from the local store to Redis
