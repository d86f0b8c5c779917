"""Wire types and the frame codec: 4-byte big-endian length, then one MessagePack map.

Every request is a Struct under one tagged base (`op`); one Decoder over their union is built
once. New fields go last with defaults, so older clients keep working. protocol.md is the
normative description of everything here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, get_args

import msgspec

from sidecar.errors import FrameTooLarge, InvalidMessage, SidecarError, UnknownOp
from sidecar.models import (
    MAX_DELAY_S,
    MAX_LEASE_S,
    MAX_TTL_S,
    MAX_WAIT_S,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    books_balance,
)

HEADER_BYTES = 4
MAX_FRAME_LIMIT = 0xFFFFFFFF

QueueId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")
]  # printable ASCII, no spaces: fits a log line, a Redis key and a URL
Priority = Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
# Every duration is bounded above as well as below: the bound also refuses inf, and NaN fails
# every comparison, so only finite values in range reach a store (see MAX_TTL_S for why).
TtlSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_S)]
LeaseSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_LEASE_S)]
WaitSeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)]
DelaySeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_DELAY_S)]
Attempts = Annotated[int, msgspec.Meta(ge=1, le=1000)]


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


class Dequeue(Request, tag="dequeue"):
    max_items: Annotated[int, msgspec.Meta(ge=1)] = 1
    lease_s: LeaseSeconds | None = None
    wait_s: WaitSeconds = 0.0


class Extend(Request, tag="extend"):
    queue_id: QueueId
    lease_id: str
    lease_s: LeaseSeconds | None = None


class Complete(Request, tag="complete"):
    queue_id: QueueId
    lease_id: str


class CompleteNext(Request, tag="complete_next"):
    """Complete one leased request and lease up to max_items more, in one round trip."""

    queue_id: QueueId
    lease_id: str
    max_items: Annotated[int, msgspec.Meta(ge=1)] = 1
    lease_s: LeaseSeconds | None = None


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


class Fail(Request, tag="fail"):
    queue_id: QueueId
    lease_id: str
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    retry: bool = True
    delay_s: DelaySeconds = 0.0


class Cancel(Request, tag="cancel"):
    queue_id: QueueId


class Status(Request, tag="status"):
    queue_id: QueueId


class Stats(Request, tag="stats"):
    pass


class Health(Request, tag="health"):
    pass


class Metrics(Request, tag="metrics"):
    pass


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


class HelloResult(msgspec.Struct, kw_only=True):
    server: str
    version: str
    protocol: int
    mode: str
    limits: Limits


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

    Filled from the store's QueueStats by name (handlers.stats_result), so a field is added to
    the wire by adding it here; protocol.md 8.9 is checked against this type.
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

    @property
    def balanced(self) -> bool:
        """The books balance (protocol.md 8.9), as the store's own QueueStats.balanced says."""
        return books_balance(self)


class MetricsResult(msgspec.Struct, kw_only=True):
    content_type: str
    text: str


# -- the op registry -----------------------------------------------------------------------------


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
# here and in AnyRequest, and a case in handlers.Ops.handle (mypy refuses a missing case).
REGISTRY: tuple[OpSpec, ...] = (
    OpSpec(Hello, HelloResult, retry_safe=True),
    OpSpec(Enqueue, EnqueueResult, retry_safe=True),
    OpSpec(Dequeue, DequeueResult, retry_safe=False, long_poll="wait_s"),
    OpSpec(Extend, RequestInfo, retry_safe=False),
    OpSpec(Complete, RequestInfo, retry_safe=False),
    OpSpec(Fail, RequestInfo, retry_safe=False),
    OpSpec(Cancel, RequestInfo, retry_safe=False),
    OpSpec(Status, RequestInfo, retry_safe=True),
    OpSpec(Stats, StatsResult, retry_safe=True),
    OpSpec(Health, HealthResult, retry_safe=True),
    OpSpec(Metrics, MetricsResult, retry_safe=True),
    # Not resend-safe: a resend leases further jobs (its settle is harmless, as complete's is).
    OpSpec(CompleteNext, CompleteNextResult, retry_safe=False),
    # Not resend-safe for the same reason when it leases; a resend's settles are harmless.
    OpSpec(CompleteMany, CompleteManyResult, retry_safe=False),
)
# The registry's requests as one union: the decoder's type, and what dispatch matches over.
AnyRequest = (
    Hello | Enqueue | Dequeue | Extend | Complete | Fail | Cancel | Status | Stats | Health
    | Metrics | CompleteNext | CompleteMany
)
SPECS: dict[type[Request], OpSpec] = {spec.request: spec for spec in REGISTRY}
OPS: frozenset[str] = frozenset(spec.name for spec in REGISTRY)
if set(get_args(AnyRequest)) != set(SPECS):  # pragma: no cover - caught at import
    raise TypeError("AnyRequest and REGISTRY must name the same request types")


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


def error_body(err: SidecarError) -> ErrorBody:
    """An error as an error reply carries it (section 4.2); results that hold one use it too."""
    return ErrorBody(code=err.code, message=err.message, details=err.details or None)


def error_reply(request_id: int | None, err: SidecarError) -> ErrorReply:
    return ErrorReply(id=request_id, error=error_body(err))


# -- codec ---------------------------------------------------------------------------------------


_request_decoder: msgspec.msgpack.Decoder[AnyRequest] = msgspec.msgpack.Decoder(AnyRequest)
# Read on the error path only, to echo the id and tell an unknown op apart: keys of any
# hashable type (a request's keys are str, but a bad one must not hide a good `id`), values
# left raw so nothing but `id` and `op` is decoded.
_envelope_decoder = msgspec.msgpack.Decoder(dict[Any, msgspec.Raw])
_int_decoder = msgspec.msgpack.Decoder(int)
_str_decoder = msgspec.msgpack.Decoder(str)
_encoder = msgspec.msgpack.Encoder()

# Everything msgspec can raise on hostile input: invalid UTF-8 surfaces as UnicodeDecodeError
# and deep nesting as RecursionError, not as DecodeError.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def decode_request(body: bytes | memoryview) -> AnyRequest:
    """Decode one frame body; raise a SidecarError carrying the request id when it can be read."""
    try:
        return _request_decoder.decode(body)
    except DECODE_ERRORS as exc:
        request_id, op = _salvage(body)
        if op is not None and op not in OPS:
            err: SidecarError = UnknownOp(
                f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}", {"op": op}
            )
        else:
            err = InvalidMessage(_describe(exc))
        err.request_id = request_id  # type: ignore[attr-defined]
        raise err from None


def _salvage(body: bytes | memoryview) -> tuple[int | None, str | None]:
    """The int `id` and str `op` of a map that is not a valid request, when it has them."""
    try:
        env = _envelope_decoder.decode(body)
    except DECODE_ERRORS:
        return None, None
    request_id = op = None
    try:
        if "id" in env:
            request_id = _int_decoder.decode(env["id"])
    except DECODE_ERRORS:
        pass
    try:
        if "op" in env:
            op = _str_decoder.decode(env["op"])
    except DECODE_ERRORS:
        pass
    return request_id, op


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "invalid message: a string is not valid UTF-8"
    if isinstance(exc, RecursionError):
        return "invalid message: nested too deeply"
    text = str(exc)
    if text.endswith(_DURATION_PATHS):
        return f"invalid message: {text} (a finite number of seconds; hello reports the limits)"
    return f"invalid message: {text}"


_DURATION_PATHS = (".ttl_s`", ".lease_s`", ".wait_s`")


# How deeply a payload may nest arrays and maps. JSON bodies of LLM calls nest tens of levels;
# the decoder itself gives up near 985 (the Python recursion limit, minus the daemon's stack),
# a number that moves with the build and the call stack. Refusing past 256 makes it exact.
MAX_PAYLOAD_DEPTH = 256

# The bytes that open a map or an array: fixmap, fixarray, array16/32, map16/32.
_CONTAINER_BYTES = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_skip_decoder = msgspec.msgpack.Decoder(msgspec.Raw)  # reads a value's extent, builds nothing


def _skips(data: bytes) -> bool:
    """Whether the decoder reads data without hitting its recursion limit."""
    try:
        _skip_decoder.decode(data)
    except RecursionError:
        return False
    return True


def payload_depth_exceeds(data: bytes, limit: int = MAX_PAYLOAD_DEPTH) -> bool:
    """Whether the MessagePack value in data nests arrays and maps more than limit deep.

    Exact, and cheap for nearly every payload: each level opens with one of _CONTAINER_BYTES,
    so a payload with at most `limit` of them (counted in C) cannot be too deep. Past that, the
    decoder itself decides, with the recursion limit lowered for one read so that its reach from
    here is exactly `limit` levels. That reach is the interpreter's limit minus the current
    depth, which C calls on the stack also consume, so it is measured each time from this frame
    (a cache keyed by the Python frames was off by a level now and then).
    """
    if len(data) - len(data.translate(None, _CONTAINER_BYTES)) <= limit:
        return False
    recursion_limit = sys.getrecursionlimit()
    lo, hi = 0, recursion_limit
    while lo < hi:  # the deepest array nesting _skips reads when called from here
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _skips(b"\x91" * mid + b"\xc0") else (lo, mid - 1)
    if lo <= limit:
        return not _skips(data)  # a stack this deep cannot read `limit` levels anyway
    sys.setrecursionlimit(recursion_limit - (lo - limit))
    try:
        return not _skips(data)
    finally:
        sys.setrecursionlimit(recursion_limit)


def request_id_of(err: SidecarError) -> int | None:
    """The id of the request that caused err, when decode_request could recover it."""
    return getattr(err, "request_id", None)


def append_frame(buf: bytearray, message: object) -> None:
    """Encode message as one frame at the end of buf, without an intermediate copy."""
    start = len(buf)
    buf.extend(b"\0\0\0\0")
    _encoder.encode_into(message, buf, start + HEADER_BYTES)
    buf[start : start + HEADER_BYTES] = (len(buf) - start - HEADER_BYTES).to_bytes(4, "big")


def encode_frame(message: object) -> bytes:
    buf = bytearray()
    append_frame(buf, message)
    return bytes(buf)


class FrameReader:
    """Splits a byte stream into frame bodies, refusing a frame over the limit from its header."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.error: FrameTooLarge | None = None
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add data; return every complete body before any oversize header (then see .error)."""
        if self.error is not None:
            return []
        buf = self._buf
        buf += data
        bodies: list[bytes] = []
        pos = 0
        while len(buf) - pos >= HEADER_BYTES:
            size = int.from_bytes(buf[pos : pos + HEADER_BYTES], "big")
            if size > self.max_frame_bytes:
                self.error = FrameTooLarge(
                    f"frame of {size} bytes is over the limit of {self.max_frame_bytes}",
                    {"size": size, "max_frame_bytes": self.max_frame_bytes},
                )
                buf.clear()
                return bodies
            end = pos + HEADER_BYTES + size
            if len(buf) < end:
                break
            bodies.append(bytes(buf[pos + HEADER_BYTES : end]))
            pos = end
        # One compaction per read, not one per frame: many small frames stay linear.
        del buf[:pos]
        return bodies

    @property
    def partial(self) -> int:
        """Bytes held of a frame not yet complete (0 at a frame boundary)."""
        return len(self._buf)
