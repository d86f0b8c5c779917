"""The ops: validate limits, apply defaults, call the queue manager and shape the results.

Validation of types and ranges happens in the wire types (msgspec constraints); what depends on
the settings (payload size, batch size, defaults) happens here, once, above every store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar, assert_never, cast

import msgspec
import structlog

from sidecar import PROTOCOL_VERSION, __version__
from sidecar.config import Settings
from sidecar.errors import (
    InvalidMessage,
    PayloadTooLarge,
    SidecarError,
    UnknownQueue,
    UnsupportedProtocol,
)
from sidecar.models import (
    EnqueueOutcome,
    HealthStatus,
    QueuedRequest,
    QueueName,
    QueueStats,
    QueueStatus,
)
from sidecar.observe import ConnectionCount
from sidecar.protocol import (
    MAX_PAYLOAD_DEPTH,
    AnyRequest,
    Cancel,
    Complete,
    Completed,
    CompleteMany,
    CompleteManyResult,
    CompleteNext,
    CompleteNextResult,
    Dequeue,
    DequeueResult,
    Enqueue,
    EnqueuedItem,
    EnqueueItem,
    EnqueueResult,
    Extend,
    Fail,
    Health,
    HealthResult,
    Hello,
    HelloResult,
    Job,
    LimitAcquire,
    LimitPause,
    LimitReport,
    Limits,
    LimitSettle,
    List,
    Metrics,
    MetricsResult,
    Purge,
    RequestInfo,
    Requeue,
    Stats,
    StatsResult,
    Status,
    Take,
    TakeResult,
    error_body,
    payload_depth_exceeds,
)
from sidecar.queue.base import QueueStore, new_request, settle_then_lease
from sidecar.queue.limit import Limiter, LocalLimiter
from sidecar.server.limits import LimitOps
from sidecar.server.operators import OperatorOps

log = structlog.get_logger("sidecar.ops")

# The protocol numbers a hello may name; any other is refused (protocol.md 8.1, 11).
SUPPORTED_PROTOCOLS = (PROTOCOL_VERSION,)
REASON_UNSPECIFIED = "unspecified"
# The reply's own envelope around the jobs (id, ok, result, items), rounded up.
REPLY_OVERHEAD_BYTES = 64
# What one settle's entry adds to a complete_next or complete_many reply beyond its queue_id
# (protocol.md 3): the larger of an info map (eleven keys, three float64s and four ints) and an
# error map whose message is at most MAX_ERROR_MESSAGE_BYTES, rounded up; the jobs leased beside
# the settles get only the room these leave (tests/server/test_reply_bound.py checks it).
RESULT_FIXED_BYTES = 384
# The Prometheus text exposition format, as a scraper's Content-Type.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
W = TypeVar("W", bound=msgspec.Struct)


class Ops:
    """Answers every request the server decodes; raises SidecarError for an error reply."""

    def __init__(
        self,
        settings: Settings,
        queue: QueueStore,
        *,
        stopping: asyncio.Event | None = None,
        connections: ConnectionCount | None = None,
        render_metrics: Callable[[], Awaitable[bytes]] | None = None,
        clock: Callable[[], float] = time.time,
        outbox: Mapping[str, QueueStore] | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        """stopping, connections and render_metrics come from app.py; the defaults serve ops
        that nothing shares (a store under test, no server): no metrics renders empty text.
        queue is the `requests` queue; outbox the other named queues by name (none: the
        daemon serves `requests` alone)."""
        self.settings = settings
        self.queue = queue
        self.queues: dict[str, QueueStore] = {QueueName.REQUESTS.value: queue, **(outbox or {})}
        # Set when the daemon begins to drain: long-polling dequeues answer at once.
        self._stopping = stopping or asyncio.Event()
        self._connections = connections or ConnectionCount()
        self._render_metrics = render_metrics
        self._clock = clock
        self.operators = OperatorOps(
            payloads_allowed=settings.ops_payloads,
            max_reply_bytes=settings.max_frame_bytes - REPLY_OVERHEAD_BYTES,
        )
        # The fleet's limiter (app.py builds it beside the queue; by default one in memory).
        self.pacing = LimitOps(limiter or LocalLimiter())
        self._started = time.monotonic()
        self._limits = Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_payload_bytes=settings.max_payload_bytes,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_s,
            default_ttl_s=settings.request_ttl_s,
            default_lease_s=settings.queue_lease_s,
            default_max_attempts=settings.queue_max_attempts,
        )

    async def handle(self, req: AnyRequest) -> object:
        """The result of one request; SidecarError becomes the error reply."""
        match req:
            case Enqueue():
                return await self._enqueue(req)
            case Dequeue():
                return await self._dequeue(req)
            case Complete():
                store = self.store(req.queue)
                return info(await store.complete(req.queue_id, req.lease_id))
            case CompleteNext():
                return await self._complete_next(req)
            case CompleteMany():
                return await self._complete_many(req)
            case Fail():
                return info(await self._fail(req))
            case Extend():
                lease_s = req.lease_s or self.settings.queue_lease_s
                store = self.store(req.queue)
                return info(await store.extend(req.queue_id, req.lease_id, lease_s))
            case Cancel():
                return info(await self.store(req.queue).cancel(req.queue_id))
            case Take():
                return await self._take(req)
            case Status():
                return await self.operators.status(req, self.store(req.queue))
            case List():
                return await self.operators.list_page(req, self.store(req.queue))
            case Requeue() | Purge():
                return await self.act(req, None)
            case LimitAcquire():
                return await self.pacing.acquire(req)
            case LimitSettle():
                return await self.pacing.settle(req)
            case LimitPause():
                return await self.pacing.pause(req)
            case LimitReport():
                return await self.pacing.report(req)
            case Stats():
                return stats_result(await self.store(req.queue).stats())
            case Health():
                return await self.health()
            case Hello():
                return await self._hello(req)
            case Metrics():
                render = self._render_metrics
                text = (await render()).decode() if render is not None else ""
                return MetricsResult(content_type=METRICS_CONTENT_TYPE, text=text)
            case _:
                # Exhaustive: an op of protocol.REGISTRY without a case above fails mypy here,
                # 'Argument 1 to "assert_never" has incompatible type "Metrics"; expected
                # "Never"' (seen with the Metrics case removed).
                assert_never(req)

    async def _hello(self, req: Hello) -> HelloResult:
        if req.protocol not in SUPPORTED_PROTOCOLS:
            raise UnsupportedProtocol(
                f"this daemon speaks protocol {PROTOCOL_VERSION}, not {req.protocol}",
                {"protocol": req.protocol, "supported": list(SUPPORTED_PROTOCOLS)},
            )
        report = await self.queue.health()
        return HelloResult(
            server="sidecar",
            version=__version__,
            protocol=PROTOCOL_VERSION,
            mode=report.mode,
            limits=self._limits,
            queues=list(self.queues),
        )

    async def act(self, req: Requeue | Purge, peer_uid: int | None) -> object:
        """An operator's requeue or purge, logged with who asked (the peer's uid, SO_PEERCRED:
        the connection passes it)."""
        store = self.store(req.queue)
        if isinstance(req, Requeue):
            return await self.operators.requeue(req, store, peer_uid)
        return await self.operators.purge(req, store, peer_uid)

    def store(self, name: str) -> QueueStore:
        """The store of the named queue; UnknownQueue for a name this daemon does not serve."""
        found = self.queues.get(name)
        if found is None:
            served = list(self.queues)
            raise UnknownQueue(
                f"no queue {name!r}: this daemon serves {', '.join(served)}",
                {"queue": name, "queues": served},
            )
        return found

    async def health(self) -> HealthResult:
        """One answer for the daemon: the request queue's, and an outbox queue's own reasons
        (its journal, its breaker) prefixed with its name."""
        report = await self.queue.health()
        status, reasons = report.status, list(report.reasons)
        for name, store in self.queues.items():
            if store is self.queue:
                continue
            own = await store.health()
            extra = [f"{name}: {r}" for r in own.reasons if r not in report.reasons]
            if extra:
                reasons += extra
                if status is HealthStatus.OK:
                    status = HealthStatus.DEGRADED
        return HealthResult(
            status=status,
            mode=report.mode,
            reasons=reasons,
            version=__version__,
            uptime_s=round(time.monotonic() - self._started, 3),
            connections=self._connections.open,
        )

    async def _fail(self, req: Fail) -> QueuedRequest:
        # An empty reason is recorded as "unspecified" (protocol.md 8.6): a failed status
        # always says why, and a client cannot tell "" from a missing value in every language.
        reason = req.reason or REASON_UNSPECIFIED
        store = self.store(req.queue)
        rec = await store.fail(
            req.queue_id, req.lease_id, reason, req.retry, req.delay_s, req.counts
        )
        if rec.status is QueueStatus.QUEUED and rec.expires_at <= self._clock():
            # Back in line past its TTL: the next read will say expired, so say it now rather
            # than answer "queued" for a request that can never be handed out again.
            # The fail itself took effect: a read that fails now must not turn it into an error.
            try:
                now = await store.status(req.queue_id)
            except SidecarError:
                now = None
            if now is not None:
                return now
        return rec

    def _check_batch(self, items: int) -> None:
        limit = self.settings.max_batch
        if items > limit:
            raise InvalidMessage(
                f"batch of {items} items is over the limit of {limit}",
                {"items": items, "max_batch": limit},
            )

    async def _enqueue(self, req: Enqueue) -> EnqueueResult:
        s = self.settings
        store = self.store(req.queue)
        self._check_batch(len(req.items))
        now = self._clock()
        # Read once per request, not per item: request_ttl_s is a computed property.
        ttl_s, max_attempts = s.request_ttl_s, s.queue_max_attempts
        records: list[QueuedRequest] = []
        for index, item in enumerate(req.items):
            records.append(
                new_request(
                    payload=self._checked_payload(index, item),
                    priority=item.priority,
                    ttl_s=item.ttl_s or ttl_s,
                    max_attempts=item.max_attempts or max_attempts,
                    now=now,
                    queue_id=item.queue_id,
                )
            )
        results = await store.enqueue(records)
        return EnqueueResult(items=[enqueued(r) for r in results])

    def _checked_payload(self, index: int, item: EnqueueItem) -> bytes:
        """The item's payload as bytes, once it is known to be within the limits."""
        size = len(item.payload)
        limit = self.settings.max_payload_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"payload of item {index} is {size} bytes, over the limit of {limit}",
                {"index": index, "size": size, "max_payload_bytes": limit},
            )
        # A copy: the Raw is a view into the whole frame, which must not stay alive.
        payload = bytes(item.payload)
        if payload_depth_exceeds(payload):
            raise InvalidMessage(
                f"payload of item {index} nests arrays and maps more than "
                f"{MAX_PAYLOAD_DEPTH} levels deep",
                {"index": index, "max_payload_depth": MAX_PAYLOAD_DEPTH},
            )
        return payload

    async def _dequeue(self, req: Dequeue) -> DequeueResult:
        s = self.settings
        store = self.store(req.queue)
        max_items = min(req.max_items, s.max_batch)
        lease_s = req.lease_s or s.queue_lease_s
        deadline = time.monotonic() + min(req.wait_s, s.max_wait_s)
        while True:
            got = await self._lease_within_frame(store, max_items, lease_s)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0 or self._stopping.is_set():
                return DequeueResult(items=[job(r) for r in got])
            await self._wait_for_work(store, remaining)

    async def _take(self, req: Take) -> TakeResult:
        """Lease the one request queue_id names if it is queued, else nil (protocol.md, take)."""
        store = self.store(req.queue)
        rec = await store.take(req.queue_id, req.lease_s or self.settings.queue_lease_s)
        return TakeResult(item=None if rec is None else job(rec))

    async def _lease_within_frame(
        self, store: QueueStore, max_items: int, lease_s: float
    ) -> list[QueuedRequest]:
        """Up to max_items leases whose reply fits in max_frame_bytes; the rest stay queued.

        One store call with the frame's room as its byte budget. One job is always allowed, so
        a payload that was accepted can always be handed out (its reply passes max_frame_bytes
        by at most the job's overhead and REPLY_OVERHEAD_BYTES).
        """
        room = self.settings.max_frame_bytes - REPLY_OVERHEAD_BYTES
        return await store.dequeue(max_items, lease_s, max_bytes=room)

    def _room_beside(self, queue_ids: list[str]) -> int:
        """The bytes left for leased jobs in a reply that also carries these settles' entries."""
        results = sum(result_bytes(q) for q in queue_ids)
        return self.settings.max_frame_bytes - REPLY_OVERHEAD_BYTES - results

    async def _complete_next(self, req: CompleteNext) -> CompleteNextResult:
        """Settle one job and lease up to max_items more, never waiting (protocol.md 8.12)."""
        room = self._room_beside([req.queue_id])
        got = await self.store(req.queue).complete_next(
            req.queue_id,
            req.lease_id,
            # No room left beside the settle's entry: lease nothing rather than pass the bound.
            min(req.max_items, self.settings.max_batch) if room > 0 else 0,
            req.lease_s or self.settings.queue_lease_s,
            room,
        )
        return CompleteNextResult(
            completed=None if got.completed is None else info(got.completed),
            error=None if got.error is None else error_body(got.error),
            items=[job(r) for r in got.leased],
        )

    async def _complete_many(self, req: CompleteMany) -> CompleteManyResult:
        """Settle each item on its own and lease up to max_items more, never waiting
        (protocol.md 8.13). All go to the store at once: on Redis the completes fold into one
        script run, and the leasing shares its round trip."""
        s = self.settings
        store = self.store(req.queue)
        self._check_batch(len(req.items))
        settle = store.complete if req.info else store.complete_brief
        # The jobs get only the room the settles' entries may take leave (protocol.md 3).
        room = self._room_beside([item.queue_id for item in req.items])
        outcomes, leased = await settle_then_lease(
            [settle(item.queue_id, item.lease_id) for item in req.items],
            store,
            min(req.max_items, s.max_batch) if room > 0 else 0,
            req.lease_s or s.queue_lease_s,
            room,
        )
        # A settle's own error is its item's answer (settle_then_lease raises any other).
        results = [
            Completed(error=error_body(o)) if isinstance(o, SidecarError)
            else Completed(completed=None if o is None else info(o))
            for o in outcomes
        ]  # fmt: skip
        return CompleteManyResult(results=results, items=[job(r) for r in leased])

    async def _wait_for_work(self, store: QueueStore, timeout: float) -> None:
        """Wait for work or for the daemon to stop, whichever comes first."""
        work = asyncio.ensure_future(store.wait_for_work(timeout))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((work, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            stop.cancel()


# -- the wire views of the stores' records: each filled by field name, never by a copied list --


def compile_view(wire: type[W], source: type[msgspec.Struct], *given: str) -> Callable[..., W]:
    """A function (record, *given) -> wire struct, each other wire field read from the record's
    field of the same name. A wire field the record lacks is refused here, at import.

    Written out and compiled once, as dataclasses does, so a view costs what a hand-written
    constructor call costs (reading the names in a loop per call costs three times as much, on
    the path of every dequeue and settle).
    """
    names = wire.__struct_fields__
    missing = [n for n in names if n not in given and n not in source.__struct_fields__]
    if missing:
        raise TypeError(f"{wire.__name__} fields {missing} are not fields of {source.__name__}")
    args = ", ".join(f"{n}={n}" if n in given else f"{n}=src.{n}" for n in names)
    namespace: dict[str, object] = {"Wire": wire}
    exec(f"def view(src, {', '.join(given)}):\n    return Wire({args})\n", namespace)
    return cast(Callable[..., W], namespace["view"])


_info = compile_view(RequestInfo, QueuedRequest, "status")
_job = compile_view(Job, QueuedRequest, "payload")
_enqueued = compile_view(EnqueuedItem, QueuedRequest, "status", "created")


def result_bytes(queue_id: str) -> int:
    """An upper bound of one settle's entry (its info, or its error) in a reply."""
    return RESULT_FIXED_BYTES + len(queue_id)


def info(rec: QueuedRequest) -> RequestInfo:
    """The metadata view of a stored request."""
    return _info(rec, rec.status.value)


def job(rec: QueuedRequest) -> Job:
    """The worker's view of a leased request, with its payload bytes as they arrived."""
    assert rec.lease_id is not None and rec.lease_expires_at is not None
    assert rec.payload is not None
    return _job(rec, msgspec.Raw(rec.payload))


def enqueued(outcome: EnqueueOutcome) -> EnqueuedItem:
    """What enqueue answers for one item: the stored request, and whether this call made it."""
    req = outcome.request
    return _enqueued(req, req.status.value, outcome.created)


def stats_result(stats: QueueStats) -> StatsResult:
    """The stats reply: the store's counts, nested stores included, converted by field name."""
    return msgspec.convert(stats, StatsResult, from_attributes=True)
