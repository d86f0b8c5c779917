"""Wire types: every request under one tagged base (`op`), every result and reply.

New fields go last with defaults, so older clients keep working. protocol.md is the normative
description of everything here.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from sidecar.errors import SidecarError
from sidecar.models import (
    MAX_DELAY_S,
    MAX_LEASE_S,
    MAX_RETENTION_S,
    MAX_TTL_S,
    MAX_WAIT_S,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    QueueName,
    books_balance,
)

QueueId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[!-~]+\Z")
]  # printable ASCII, no spaces: fits a log line, a Redis key and a URL (`\Z`, since `$`
# would also admit one final newline)
Priority = Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
# Every duration is bounded above as well as below: the bound also refuses inf, and NaN fails
# every comparison, so only finite values in range reach a store (see MAX_TTL_S for why).
TtlSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_S)]
LeaseSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_LEASE_S)]
WaitSeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)]
DelaySeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_DELAY_S)]
Attempts = Annotated[int, msgspec.Meta(ge=1, le=1000)]
# Any short name: one the daemon does not serve is answered `unknown_queue` (not
# invalid_message), which names the queues it serves.
QueueField = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
DEFAULT_QUEUE = QueueName.REQUESTS.value


# -- requests ------------------------------------------------------------------------------------


class Request(msgspec.Struct, tag_field="op", kw_only=True):
    """Base of every request; `id` is chosen by the client and echoed in the reply."""

    id: int


class Hello(Request, tag="hello"):
    client: str = ""
    protocol: int = 1


class EnqueueItem(msgspec.Struct, kw_only=True):
    # Any MessagePack value; kept as the exact bytes it arrived as.
    payload: msgspec.Raw
    priority: Priority = PRIORITY_DEFAULT
    ttl_s: TtlSeconds | None = None
    queue_id: QueueId | None = None
    max_attempts: Attempts | None = None


class Enqueue(Request, tag="enqueue"):
    items: Annotated[list[EnqueueItem], msgspec.Meta(min_length=1)]
    queue: QueueField = DEFAULT_QUEUE


class Dequeue(Request, tag="dequeue"):
    max_items: Annotated[int, msgspec.Meta(ge=1)] = 1
    lease_s: LeaseSeconds | None = None
    wait_s: WaitSeconds = 0.0
    queue: QueueField = DEFAULT_QUEUE


class Extend(Request, tag="extend"):
    queue_id: QueueId
    lease_id: str
    lease_s: LeaseSeconds | None = None
    queue: QueueField = DEFAULT_QUEUE


class Complete(Request, tag="complete"):
    queue_id: QueueId
    lease_id: str
    queue: QueueField = DEFAULT_QUEUE


class CompleteNext(Request, tag="complete_next"):
    """Complete one leased request and lease up to max_items more, in one round trip."""

    queue_id: QueueId
    lease_id: str
    max_items: Annotated[int, msgspec.Meta(ge=1)] = 1
    lease_s: LeaseSeconds | None = None
    queue: QueueField = DEFAULT_QUEUE


class CompleteItem(msgspec.Struct, kw_only=True):
    queue_id: QueueId
    lease_id: str


class CompleteMany(Request, tag="complete_many"):
    """Complete several leased requests, each on its own, and lease up to max_items more."""

    items: Annotated[list[CompleteItem], msgspec.Meta(min_length=1)]
    max_items: Annotated[int, msgspec.Meta(ge=0)] = 0
    lease_s: LeaseSeconds | None = None
    # False: a settled item's entry carries no info (nor error), and the store need not read
    # the record back.
    info: bool = True
    queue: QueueField = DEFAULT_QUEUE


class Fail(Request, tag="fail"):
    queue_id: QueueId
    lease_id: str
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    retry: bool = True
    delay_s: DelaySeconds = 0.0
    # False: the delivery this fail ends is not counted against max_attempts (the provider was
    # unavailable, not the request at fault): `attempts` goes back by one. Only with retry.
    counts: bool = True
    queue: QueueField = DEFAULT_QUEUE


class Cancel(Request, tag="cancel"):
    queue_id: QueueId
    queue: QueueField = DEFAULT_QUEUE


class Status(Request, tag="status"):
    queue_id: QueueId
    # True: the reply carries the request's payload (when the daemon allows it, protocol.md 8.8).
    payload: bool = False
    queue: QueueField = DEFAULT_QUEUE


class Stats(Request, tag="stats"):
    queue: QueueField = DEFAULT_QUEUE


class Take(Request, tag="take"):
    """Lease the one request queue_id names, if it is queued (protocol.md: take)."""

    queue_id: QueueId
    queue: QueueField  # named every time: a take from the wrong queue would find nothing
    lease_s: LeaseSeconds | None = None


class Health(Request, tag="health"):
    pass


class Metrics(Request, tag="metrics"):
    pass


# The most records one page of `list` holds, and one `requeue` by filter moves (protocol.md 8.19).
MAX_LIST_LIMIT = 1000
MAX_REQUEUE_LIMIT = 10_000
MAX_CURSOR_CHARS = 512


class List(Request, tag="list"):
    """One page of the records of one status (protocol.md 8.19)."""

    # One of models.ListStatus; checked by the op so an unknown one names the choices.
    status: Annotated[str, msgspec.Meta(max_length=32)] = "queued"
    priority: Priority | None = None
    order: Annotated[str, msgspec.Meta(max_length=16)] = "oldest"
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_LIMIT)] = 50
    cursor: Annotated[str, msgspec.Meta(max_length=MAX_CURSOR_CHARS)] | None = None
    payload: bool = False
    queue: QueueField = DEFAULT_QUEUE


class Requeue(Request, tag="requeue"):
    """Dead letters back to queued: one by queue_id, or up to limit by filter (protocol.md 8.20)."""

    queue_id: QueueId | None = None
    status: Annotated[str, msgspec.Meta(max_length=32)] = "failed"
    priority: Priority | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_REQUEUE_LIMIT)] = 100
    queue: QueueField = DEFAULT_QUEUE


class Purge(Request, tag="purge"):
    """Forget the records of one status, or only those older than an age (protocol.md 8.21)."""

    status: Annotated[str, msgspec.Meta(max_length=32)] = "completed"
    older_than_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_RETENTION_S)] | None = None
    # Needed to purge queued, delayed or processing requests (refused without it).
    force: bool = False
    queue: QueueField = DEFAULT_QUEUE


# -- results -------------------------------------------------------------------------------------


class Limits(msgspec.Struct, kw_only=True):
    max_frame_bytes: int
    max_payload_bytes: int
    max_batch: int
    max_wait_s: float
    priority_min: int = PRIORITY_MIN
    priority_max: int = PRIORITY_MAX
    priority_default: int = PRIORITY_DEFAULT
    default_ttl_s: float
    default_lease_s: float
    default_max_attempts: int
    max_ttl_s: float = MAX_TTL_S
    max_lease_s: float = MAX_LEASE_S
    # The longest `delay_s` a fail may carry; a longer one is refused.
    max_delay_s: float = MAX_DELAY_S
    # The longest `wait_s` a dequeue may carry (refused above it); above max_wait_s it is lowered.
    max_request_wait_s: float = MAX_WAIT_S


class HelloResult(msgspec.Struct, kw_only=True):
    server: str
    version: str
    protocol: int
    mode: str
    limits: Limits
    # The named queues this daemon serves (the `queue` field of the ops).
    queues: list[str] = msgspec.field(default_factory=list)


class EnqueuedItem(msgspec.Struct, kw_only=True):
    queue_id: str
    status: str
    created: bool
    priority: int
    expires_at: float


class EnqueueResult(msgspec.Struct, kw_only=True):
    items: list[EnqueuedItem]


class Job(msgspec.Struct, kw_only=True):
    """A leased request as a worker receives it."""

    queue_id: str
    lease_id: str
    lease_expires_at: float
    payload: msgspec.Raw
    priority: int
    attempts: int
    max_attempts: int
    created_at: float
    expires_at: float


class DequeueResult(msgspec.Struct, kw_only=True):
    items: list[Job]


class TakeResult(msgspec.Struct, kw_only=True):
    """The request take leased, or nil when it was not queued (unknown, processing, finished)."""

    item: Job | None = None


class RequestInfo(msgspec.Struct, kw_only=True):
    """What status, extend, complete, fail and cancel answer: a request's metadata."""

    queue_id: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    created_at: float
    expires_at: float
    updated_at: float
    size_bytes: int
    lease_expires_at: float | None = None
    reason: str | None = None


class RequestDetail(RequestInfo, kw_only=True):
    """What status and list answer: RequestInfo, the store that holds the request, and its
    payload (absent unless asked for and allowed)."""

    store: str = ""
    payload: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class ListResult(msgspec.Struct, kw_only=True):
    """One page of `list`; next_cursor is None on the last page (protocol.md 8.19)."""

    items: list[RequestDetail]
    next_cursor: str | None = None


class RequeueResult(msgspec.Struct, kw_only=True):
    """How many dead letters went back to queued, their ids, and the ids that already were."""

    requeued: int
    ids: list[str]
    unchanged: list[str] = msgspec.field(default_factory=list)


class PurgeResult(msgspec.Struct, kw_only=True):
    purged: int


class CompleteNextResult(msgspec.Struct, kw_only=True):
    """The settle's outcome (completed, or the error complete would have answered) and the jobs
    leased: they are leased whether or not the settle succeeded (protocol.md 8.12)."""

    completed: RequestInfo | None = None
    error: ErrorBody | None = None
    items: list[Job]


class Completed(msgspec.Struct, kw_only=True):
    """One item's outcome in complete_many: its info, or the error complete would answer."""

    completed: RequestInfo | None = None
    error: ErrorBody | None = None


class CompleteManyResult(msgspec.Struct, kw_only=True):
    """Each item's outcome, in the order sent, and the jobs leased (protocol.md 8.13)."""

    results: list[Completed]
    items: list[Job]


class HealthResult(msgspec.Struct, kw_only=True):
    status: str
    mode: str
    reasons: list[str]
    version: str
    uptime_s: float
    connections: int


class StatsResult(msgspec.Struct, kw_only=True):
    """What stats answers: a store's counts (models.QueueStats is what the stores keep).

    Filled from the store's QueueStats by name (sidecar.server.ops.stats_result), so a field
    is added to the wire by adding it here; protocol.md 8.9 is checked against this type.
    """

    store: str
    queued: int
    processing: int
    accepted: int
    completed: int
    failed: int
    expired: int
    items: int
    bytes: int
    max_items: int | None = None
    max_bytes: int | None = None
    usage: float = 0.0
    breaker_open: bool = False
    rejections: dict[str, int] = msgspec.field(default_factory=dict)
    oldest_queued_age_s: float | None = None
    max_expired_age_s: float | None = None
    retained: int = 0
    retained_bytes: int = 0
    retention_cut: int = 0
    warnings: list[str] = msgspec.field(default_factory=list)
    moved_out: int = 0
    mode: str = ""
    stores: dict[str, StatsResult] = msgspec.field(default_factory=dict)
    failovers: int = 0
    recoveries: int = 0
    degraded_s: float = 0.0
    redis_data_lost: int = 0
    dead_letters: int = 0
    dead_letters_bytes: int = 0
    dead_letters_dropped: int = 0

    @property
    def balanced(self) -> bool:
        """The books balance (protocol.md 8.9), as the store's own QueueStats.balanced says."""
        return books_balance(self)


class MetricsResult(msgspec.Struct, kw_only=True):
    content_type: str
    text: str


# -- replies -------------------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] | None = None


class OkReply(msgspec.Struct, kw_only=True):
    id: int | None
    ok: bool = True
    result: Any = None


class ErrorReply(msgspec.Struct, kw_only=True):
    id: int | None
    ok: bool = False
    error: ErrorBody


class Reply(msgspec.Struct, kw_only=True):
    """A reply as a client decodes it; `result` stays raw until the client knows its type."""

    id: int | None
    ok: bool
    # Raw cannot share a union with None; an absent result decodes as an empty Raw.
    result: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: ErrorBody | None = None


# The most an error's message takes, in UTF-8 bytes (protocol.md 4.2): a message may echo what
# the client sent (a foreign lease_id of any length), and an echo must not grow a reply.
MAX_ERROR_MESSAGE_BYTES = 256
_CUT_MARK = "..."


def bounded_message(message: str) -> str:
    """message, or its start and "..." when its UTF-8 encoding is over MAX_ERROR_MESSAGE_BYTES."""
    raw = message.encode()
    if len(raw) <= MAX_ERROR_MESSAGE_BYTES:
        return message
    head = raw[: MAX_ERROR_MESSAGE_BYTES - len(_CUT_MARK)].decode(errors="ignore")
    return head + _CUT_MARK


def error_body(err: SidecarError) -> ErrorBody:
    """An error as an error reply carries it (section 4.2); results that hold one use it too."""
    return ErrorBody(
        code=err.code, message=bounded_message(err.message), details=err.details or None
    )


def error_reply(request_id: int | None, err: SidecarError) -> ErrorReply:
    return ErrorReply(id=request_id, error=error_body(err))
