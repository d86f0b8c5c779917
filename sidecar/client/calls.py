"""Each op's request, built once for both clients, and how each client method is derived.

A builder here takes a method's parameters, applies the client's defaults (names every enqueue
item, so a resend cannot store it twice) and returns a Call: the request plus what to return
from the reply. Resend-safety and the long-poll deadline come from the op's registry entry
(protocol.REGISTRY). AsyncClient and Client declare one line per op, `name = derive(builder)`,
so both have the same methods with the same parameters (tests/protocol/test_registry.py checks).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec

from sidecar.models import PRIORITY_DEFAULT, QueueName
from sidecar.protocol import (
    DEFAULT_QUEUE,
    SPECS,
    Cancel,
    Complete,
    CompleteItem,
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
    LimitGrant,
    LimitPause,
    LimitPaused,
    LimitReport,
    LimitSettle,
    LimitState,
    List,
    ListResult,
    Metrics,
    MetricsResult,
    OpSpec,
    Purge,
    PurgeResult,
    Request,
    RequestDetail,
    RequestInfo,
    Requeue,
    RequeueResult,
    Stats,
    StatsResult,
    Status,
    Take,
    TakeResult,
)

T = TypeVar("T")
CLIENT_NAME = "sidecar-python"
_encoder = msgspec.msgpack.Encoder()


class Call(Generic[T]):
    """One request about to be sent, its op's registry entry, and what the caller gets back."""

    __slots__ = ("fold", "request", "spec", "unwrap")

    def __init__(
        self, request: Request, unwrap: Callable[[Any], T] | None = None, *, fold: bool = False
    ) -> None:
        self.request = request
        # A single enqueue or complete, which AsyncClient may send as one request with the
        # others of its loop pass (sidecar.client.fold).
        self.fold = fold
        self.spec: OpSpec = SPECS[type(request)]
        # The result as decoded (the spec's result type) becomes the method's return value.
        self.unwrap: Callable[[Any], T] = unwrap or _same

    @property
    def extra_timeout_s(self) -> float:
        """How much longer than the client's deadline the reply may take (a long poll's wait)."""
        field = self.spec.long_poll
        return float(getattr(self.request, field)) if field else 0.0



def decode_payload(job: Job, type: type[T] | Any = Any) -> Any:
    """A job's payload as Python objects (or as `type`, validated)."""
    return msgspec.msgpack.decode(job.payload, type=type)

def _same(result: Any) -> Any:
    return result


def item(
    payload: object,
    *,
    priority: int | None = None,
    ttl_s: float | None = None,
    queue_id: str | None = None,
    max_attempts: int | None = None,
) -> EnqueueItem:
    """One request to enqueue; payload is any value MessagePack can encode."""
    return EnqueueItem(
        payload=msgspec.Raw(_encoder.encode(payload)),
        priority=PRIORITY_DEFAULT if priority is None else priority,
        ttl_s=ttl_s,
        queue_id=queue_id,
        max_attempts=max_attempts,
    )


def _new_id() -> str:
    """A fresh queue_id: 128 random bits as 32 hex digits, like the daemon's own. Not a uuid4
    object: building one cost a tenth of the client's CPU per enqueue."""
    return os.urandom(16).hex()


def _named(items: Sequence[EnqueueItem]) -> list[EnqueueItem]:
    """Items with a queue_id each (32 hex digits, as the daemon's), so a resend cannot duplicate."""
    return [i if i.queue_id is not None else msgspec.structs.replace(i, queue_id=_new_id())
            for i in items]  # fmt: skip


def _only_item(result: EnqueueResult) -> EnqueuedItem:
    [res] = result.items
    return res


def _items(result: EnqueueResult | DequeueResult) -> Any:
    return result.items


def _item(result: TakeResult) -> Job | None:
    return result.item


# -- the ops, one builder each ---------------------------------------------------------------


def hello() -> Call[HelloResult]:
    """The daemon's version, protocol number, mode and limits."""
    return Call(Hello(id=0, client=CLIENT_NAME))


def enqueue(payload: object, *, queue: str = DEFAULT_QUEUE, **options: Any) -> Call[EnqueuedItem]:
    """Enqueue one request; options are those of `item` (priority, ttl_s, queue_id, ...).

    queue: the named queue (`requests`, or an outbox queue: `deliveries`, `pickups`).
    """
    if options.get("queue_id") is None:
        options["queue_id"] = _new_id()  # named here, so a resend cannot duplicate it
    # Only the request queue's enqueues are folded (a folded batch names one queue).
    folds = queue == DEFAULT_QUEUE
    return Call(
        Enqueue(id=0, items=[item(payload, **options)], queue=queue), _only_item, fold=folds
    )


def enqueue_many(
    items: Sequence[EnqueueItem], *, queue: str = DEFAULT_QUEUE
) -> Call[list[EnqueuedItem]]:
    """Enqueue a batch, all or none; build items with `sidecar.client.item`.

    Items without a queue_id get one here, so a resend after a lost connection finds the
    stored request instead of storing it twice.
    """
    return Call(Enqueue(id=0, items=_named(items), queue=queue), _items)


def dequeue(
    max_items: int = 1,
    *,
    lease_s: float | None = None,
    wait_s: float = 0.0,
    queue: str = DEFAULT_QUEUE,
) -> Call[list[Job]]:
    """Lease up to max_items requests, waiting up to wait_s for one to arrive."""
    return Call(
        Dequeue(id=0, max_items=max_items, lease_s=lease_s, wait_s=wait_s, queue=queue), _items
    )


def extend(
    queue_id: str, lease_id: str, lease_s: float | None = None, *, queue: str = DEFAULT_QUEUE
) -> Call[RequestInfo]:
    """Extend a lease (by the daemon's default lease when lease_s is None)."""
    return Call(Extend(id=0, queue_id=queue_id, lease_id=lease_id, lease_s=lease_s, queue=queue))


def complete(queue_id: str, lease_id: str, *, queue: str = DEFAULT_QUEUE) -> Call[RequestInfo]:
    """Report a leased request done."""
    # AsyncClient sends the completes of one loop pass as one complete_many (sidecar.client.fold),
    # the request queue's only (a folded batch names one queue).
    return Call(
        Complete(id=0, queue_id=queue_id, lease_id=lease_id, queue=queue),
        fold=queue == DEFAULT_QUEUE,
    )


def take(
    queue_id: str, *, queue: str = QueueName.PICKUPS.value, lease_s: float | None = None
) -> Call[Job | None]:
    """Lease the one request queue_id names if it is queued (a result waiting in `pickups`,
    by default); None when it is not (unknown, being processed, finished). Pick-up is: take,
    hand the result over, complete (the entry is then deleted); a taker that crashes leaves
    its lease to lapse, and the entry can be taken again."""
    return Call(Take(id=0, queue_id=queue_id, queue=queue, lease_s=lease_s), _item)


def complete_many(
    leases: Sequence[tuple[str, str]],
    max_items: int = 0,
    *,
    lease_s: float | None = None,
    info: bool = True,
    queue: str = DEFAULT_QUEUE,
) -> Call[CompleteManyResult]:
    """Report several leased requests done, each (queue_id, lease_id) on its own, and lease up
    to max_items more in the same round trip.

    `results` has one entry per lease, in order: `completed` (its info) or `error` (what
    complete would have answered); with info=False a completed lease's entry has neither,
    which spares the daemon and Redis reading each record back. Never waits for work.
    """
    items = [CompleteItem(queue_id=q, lease_id=lease) for q, lease in leases]
    return Call(
        CompleteMany(
            id=0, items=items, max_items=max_items, lease_s=lease_s, info=info, queue=queue
        )
    )


def complete_next(
    queue_id: str,
    lease_id: str,
    max_items: int = 1,
    *,
    lease_s: float | None = None,
    queue: str = DEFAULT_QUEUE,
) -> Call[CompleteNextResult]:
    """Report a leased request done and lease up to max_items more in the same round trip.

    The jobs are leased whether or not the settle succeeded: `completed` is its info, or
    `error` says why it failed (as complete would have). Never waits for work.
    """
    return Call(
        CompleteNext(id=0, queue_id=queue_id, lease_id=lease_id, max_items=max_items,
                     lease_s=lease_s, queue=queue)
    )  # fmt: skip


def fail(
    queue_id: str,
    lease_id: str,
    reason: str = "",
    *,
    retry: bool = True,
    delay_s: float = 0.0,
    counts: bool = True,
    queue: str = DEFAULT_QUEUE,
) -> Call[RequestInfo]:
    """Report a leased request failed; retried after delay_s while attempts remain.

    counts=False (with retry): the delivery is not counted against max_attempts, for a request
    put back because the provider was unavailable; it waits until its TTL at most.
    """
    return Call(
        Fail(id=0, queue_id=queue_id, lease_id=lease_id, reason=reason, retry=retry,
             delay_s=delay_s, counts=counts, queue=queue)
    )  # fmt: skip


def cancel(queue_id: str, *, queue: str = DEFAULT_QUEUE) -> Call[RequestInfo]:
    """Cancel a queued request (it becomes failed, reason cancelled)."""
    return Call(Cancel(id=0, queue_id=queue_id, queue=queue))


def status(
    queue_id: str, *, payload: bool = False, queue: str = DEFAULT_QUEUE
) -> Call[RequestDetail]:
    """A request's metadata and the store that holds it; payload=True adds its payload (when
    the daemon allows it: SIDECAR_OPS_PAYLOADS, else `forbidden`)."""
    return Call(Status(id=0, queue_id=queue_id, payload=payload, queue=queue))


def list_(
    status: str = "failed",
    *,
    queue: str = DEFAULT_QUEUE,
    priority: int | None = None,
    order: str = "oldest",
    limit: int = 50,
    cursor: str | None = None,
    payload: bool = False,
) -> Call[ListResult]:
    """One page of the records of one status (queued, delayed, processing, failed, completed,
    expired), oldest or newest first; pass `next_cursor` back for the next page (None: last).

    Each item is a RequestDetail (its store named); payloads only with payload=True, when the
    daemon allows them.
    """
    return Call(
        List(id=0, status=status, priority=priority, order=order, limit=limit, cursor=cursor,
             payload=payload, queue=queue)
    )  # fmt: skip


# The op and the clients' method are `list`; the module keeps the builtin's name for itself.
list_.__name__ = list_.__qualname__ = "list"


def requeue(
    queue_id: str | None = None,
    *,
    queue: str = DEFAULT_QUEUE,
    status: str = "failed",
    priority: int | None = None,
    limit: int = 100,
) -> Call[RequeueResult]:
    """Dead letters back to queued (attempts reset, id and payload kept): the one named, or up
    to `limit` of a status (failed or expired), oldest first. A queued one is left as it is and
    listed in `unchanged`."""
    return Call(
        Requeue(id=0, queue_id=queue_id, status=status, priority=priority, limit=limit,
                queue=queue)
    )  # fmt: skip


def purge(
    status: str = "completed",
    *,
    queue: str = DEFAULT_QUEUE,
    older_than_s: float | None = None,
    force: bool = False,
) -> Call[PurgeResult]:
    """Forget the records of one status, only those older than older_than_s when given;
    queued, delayed or processing ones need force=True."""
    return Call(
        Purge(id=0, status=status, older_than_s=older_than_s, force=force, queue=queue)
    )


def stats(*, queue: str = DEFAULT_QUEUE) -> Call[StatsResult]:
    """Counts, usage and breaker state of the named queue's store."""
    return Call(Stats(id=0, queue=queue))


def health() -> Call[HealthResult]:
    """Whether the daemon can serve, and why not."""
    return Call(Health(id=0))


def metrics() -> Call[MetricsResult]:
    """The daemon's metrics as Prometheus text exposition."""
    return Call(Metrics(id=0))


# -- the limiter (protocol.md 8.14-8.17) ---------------------------------------------------------


def limit_acquire(
    scope: str,
    *,
    rpm: int = 0,
    tpm: int = 0,
    requests: int = 1,
    tokens: int = 0,
    fresh: bool = False,
    drain_share: float = 0.5,
    ramp_s: float = 0.0,
) -> Call[LimitGrant]:
    """Take `requests` against rpm and `tokens` against tpm (per minute, 0: no limit), all or
    nothing, for the whole fleet; `granted`, else `wait_s` until asking again can succeed and
    `reason`. `probe`: this call is the fleet's one half-open probe (report it)."""
    return Call(
        LimitAcquire(id=0, scope=scope, rpm=rpm, tpm=tpm, requests=requests, tokens=tokens,
                     fresh=fresh, drain_share=drain_share, ramp_s=ramp_s)
    )  # fmt: skip


def limit_settle(scope: str, *, tpm: int, tokens_delta: int) -> Call[None]:
    """Charge (positive) or refund (negative) tokens once the call's usage is known."""
    return Call(LimitSettle(id=0, scope=scope, tpm=tpm, tokens_delta=tokens_delta), _nothing)


def limit_pause(scope: str, *, pause_s: float, reason: str = "") -> Call[float]:
    """Grant nothing on the scope for pause_s, fleet-wide; the pause's end (epoch seconds)."""
    return Call(LimitPause(id=0, scope=scope, pause_s=pause_s, reason=reason), _paused_until)


def limit_report(
    scope: str, *, ok: bool, probe: bool = False, failures: int = 5, reset_s: float = 30.0
) -> Call[str]:
    """One call's outcome for the shared breaker; its state: closed, open or half_open."""
    return Call(
        LimitReport(id=0, scope=scope, ok=ok, probe=probe, failures=failures, reset_s=reset_s),
        _state,
    )


def _nothing(result: Any) -> None:
    return None


def _paused_until(result: LimitPaused) -> float:
    return result.paused_until


def _state(result: LimitState) -> str:
    return result.state


# Each registry op's builder (enqueue_many is a second method of enqueue).
BUILDERS: dict[str, Callable[..., Call[Any]]] = {
    f.__name__: f
    for f in (
        hello, enqueue, enqueue_many, dequeue, extend, complete, fail, cancel, status, stats,
        health, metrics, complete_next, complete_many, list_, requeue, purge, take,
        limit_acquire, limit_settle, limit_pause, limit_report,
    )
}  # fmt: skip


def describe(method: Callable[..., Any], build: Callable[..., Any], owner: str) -> None:
    """Give a derived method the builder's name, docstring and signature (with self)."""
    method.__name__ = build.__name__
    method.__qualname__ = f"{owner}.{build.__name__}"
    method.__doc__ = build.__doc__
    sig = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[this, *sig.parameters.values()], return_annotation=inspect.Signature.empty
    )
