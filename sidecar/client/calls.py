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

from sidecar.models import PRIORITY_DEFAULT
from sidecar.protocol import (
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
    Metrics,
    MetricsResult,
    OpSpec,
    Request,
    RequestInfo,
    Stats,
    StatsResult,
    Status,
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


# -- the ops, one builder each ---------------------------------------------------------------


def hello() -> Call[HelloResult]:
    """The daemon's version, protocol number, mode and limits."""
    return Call(Hello(id=0, client=CLIENT_NAME))


def enqueue(payload: object, **options: Any) -> Call[EnqueuedItem]:
    """Enqueue one request; options are those of `item` (priority, ttl_s, queue_id, ...)."""
    if options.get("queue_id") is None:
        options["queue_id"] = _new_id()  # named here, so a resend cannot duplicate it
    return Call(Enqueue(id=0, items=[item(payload, **options)]), _only_item, fold=True)


def enqueue_many(items: Sequence[EnqueueItem]) -> Call[list[EnqueuedItem]]:
    """Enqueue a batch, all or none; build items with `sidecar.client.item`.

    Items without a queue_id get one here, so a resend after a lost connection finds the
    stored request instead of storing it twice.
    """
    return Call(Enqueue(id=0, items=_named(items)), _items)


def dequeue(
    max_items: int = 1, *, lease_s: float | None = None, wait_s: float = 0.0
) -> Call[list[Job]]:
    """Lease up to max_items requests, waiting up to wait_s for one to arrive."""
    return Call(Dequeue(id=0, max_items=max_items, lease_s=lease_s, wait_s=wait_s), _items)


def extend(queue_id: str, lease_id: str, lease_s: float | None = None) -> Call[RequestInfo]:
    """Extend a lease (by the daemon's default lease when lease_s is None)."""
    return Call(Extend(id=0, queue_id=queue_id, lease_id=lease_id, lease_s=lease_s))


def complete(queue_id: str, lease_id: str) -> Call[RequestInfo]:
    """Report a leased request done."""
    # AsyncClient sends the completes of one loop pass as one complete_many (sidecar.client.fold).
    return Call(Complete(id=0, queue_id=queue_id, lease_id=lease_id), fold=True)


def complete_many(
    leases: Sequence[tuple[str, str]],
    max_items: int = 0,
    *,
    lease_s: float | None = None,
    info: bool = True,
) -> Call[CompleteManyResult]:
    """Report several leased requests done, each (queue_id, lease_id) on its own, and lease up
    to max_items more in the same round trip.

    `results` has one entry per lease, in order: `completed` (its info) or `error` (what
    complete would have answered); with info=False a completed lease's entry has neither,
    which spares the daemon and Redis reading each record back. Never waits for work.
    """
    items = [CompleteItem(queue_id=q, lease_id=lease) for q, lease in leases]
    return Call(
        CompleteMany(id=0, items=items, max_items=max_items, lease_s=lease_s, info=info)
    )


def complete_next(
    queue_id: str, lease_id: str, max_items: int = 1, *, lease_s: float | None = None
) -> Call[CompleteNextResult]:
    """Report a leased request done and lease up to max_items more in the same round trip.

    The jobs are leased whether or not the settle succeeded: `completed` is its info, or
    `error` says why it failed (as complete would have). Never waits for work.
    """
    return Call(
        CompleteNext(id=0, queue_id=queue_id, lease_id=lease_id, max_items=max_items,
                     lease_s=lease_s)
    )  # fmt: skip


def fail(
    queue_id: str,
    lease_id: str,
    reason: str = "",
    *,
    retry: bool = True,
    delay_s: float = 0.0,
    counts: bool = True,
) -> Call[RequestInfo]:
    """Report a leased request failed; retried after delay_s while attempts remain.

    counts=False (with retry): the delivery is not counted against max_attempts, for a request
    put back because the provider was unavailable; it waits until its TTL at most.
    """
    return Call(
        Fail(id=0, queue_id=queue_id, lease_id=lease_id, reason=reason, retry=retry,
             delay_s=delay_s, counts=counts)
    )  # fmt: skip


def cancel(queue_id: str) -> Call[RequestInfo]:
    """Cancel a queued request (it becomes failed, reason cancelled)."""
    return Call(Cancel(id=0, queue_id=queue_id))


def status(queue_id: str) -> Call[RequestInfo]:
    """A request's metadata."""
    return Call(Status(id=0, queue_id=queue_id))


def stats() -> Call[StatsResult]:
    """Counts, usage and breaker state of the store."""
    return Call(Stats(id=0))


def health() -> Call[HealthResult]:
    """Whether the daemon can serve, and why not."""
    return Call(Health(id=0))


def metrics() -> Call[MetricsResult]:
    """The daemon's metrics as Prometheus text exposition."""
    return Call(Metrics(id=0))


# Each registry op's builder (enqueue_many is a second method of enqueue).
BUILDERS: dict[str, Callable[..., Call[Any]]] = {
    f.__name__: f
    for f in (
        hello, enqueue, enqueue_many, dequeue, extend, complete, fail, cancel, status, stats,
        health, metrics, complete_next, complete_many,
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
