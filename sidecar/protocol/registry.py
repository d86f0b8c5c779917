"""The op registry: each op's request and result types and what a client may do with it.

Dispatch (sidecar.server.ops), both clients, the op table and protocol.md's list all come
from REGISTRY; mypy refuses a dispatch that misses one of AnyRequest's types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from sidecar.protocol.limits import (
    LimitAcquire,
    LimitGrant,
    LimitPause,
    LimitPaused,
    LimitReport,
    LimitSettle,
    LimitSettled,
    LimitState,
)
from sidecar.protocol.messages import (
    Cancel,
    Complete,
    CompleteMany,
    CompleteManyResult,
    CompleteNext,
    CompleteNextResult,
    Dequeue,
    DequeueResult,
    Enqueue,
    EnqueueResult,
    Extend,
    Fail,
    Health,
    HealthResult,
    Hello,
    HelloResult,
    List,
    ListResult,
    Metrics,
    MetricsResult,
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


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op: its request and result types and what a client may do with it."""

    request: type[Request]
    result: type[Any]
    # Sending it twice has the effect of sending it once, so a client may resend it after a
    # lost connection. Enqueue qualifies because the reference client names every item.
    retry_safe: bool
    # The request field (seconds) a reply may take beyond the client's reply deadline.
    long_poll: str | None = None

    @property
    def name(self) -> str:
        return str(self.request.__struct_config__.tag)


# Every op, in protocol.md's order. Adding an op: its request and result types above, one entry
# here and in AnyRequest, and a case in sidecar.server.ops.Ops.handle (mypy refuses a missing case).
REGISTRY: tuple[OpSpec, ...] = (
    OpSpec(Hello, HelloResult, retry_safe=True),
    OpSpec(Enqueue, EnqueueResult, retry_safe=True),
    OpSpec(Dequeue, DequeueResult, retry_safe=False, long_poll="wait_s"),
    OpSpec(Extend, RequestInfo, retry_safe=False),
    OpSpec(Complete, RequestInfo, retry_safe=False),
    OpSpec(Fail, RequestInfo, retry_safe=False),
    OpSpec(Cancel, RequestInfo, retry_safe=False),
    OpSpec(Status, RequestDetail, retry_safe=True),
    OpSpec(Stats, StatsResult, retry_safe=True),
    OpSpec(Health, HealthResult, retry_safe=True),
    OpSpec(Metrics, MetricsResult, retry_safe=True),
    # Not resend-safe: a resend leases further jobs (its settle is harmless, as complete's is).
    OpSpec(CompleteNext, CompleteNextResult, retry_safe=False),
    # Not resend-safe for the same reason when it leases; a resend's settles are harmless.
    OpSpec(CompleteMany, CompleteManyResult, retry_safe=False),
    # The limiter (protocol.md 8.14-8.17). A resent acquire or settle charges twice, a resent
    # report counts twice; a pause is a max, so a resend is harmless.
    OpSpec(LimitAcquire, LimitGrant, retry_safe=False),
    OpSpec(LimitSettle, LimitSettled, retry_safe=False),
    OpSpec(LimitPause, LimitPaused, retry_safe=True),
    OpSpec(LimitReport, LimitState, retry_safe=False),
    # Not resend-safe: a resend finds the request leased by the first and answers nil.
    OpSpec(Take, TakeResult, retry_safe=False),
    # The operators' ops (protocol.md 8.19-8.21). A requeue or purge by filter sent twice may
    # take more the second time (records that became dead or aged meanwhile): not resend-safe.
    OpSpec(List, ListResult, retry_safe=True),
    OpSpec(Requeue, RequeueResult, retry_safe=False),
    OpSpec(Purge, PurgeResult, retry_safe=False),
)
# The registry's requests as one union: the decoder's type, and what dispatch matches over.
AnyRequest = (
    Hello
    | Enqueue
    | Dequeue
    | Extend
    | Complete
    | Fail
    | Cancel
    | Status
    | Stats
    | Health
    | Metrics
    | CompleteNext
    | CompleteMany
    | LimitAcquire
    | LimitSettle
    | LimitPause
    | LimitReport
    | List
    | Requeue
    | Purge
    | Take
)
SPECS: dict[type[Request], OpSpec] = {spec.request: spec for spec in REGISTRY}
OPS: frozenset[str] = frozenset(spec.name for spec in REGISTRY)
if set(get_args(AnyRequest)) != set(SPECS):  # pragma: no cover - caught at import
    raise TypeError("AnyRequest and REGISTRY must name the same request types")
