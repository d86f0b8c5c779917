"""The frame codec: a 4-byte big-endian length, then one MessagePack map.

One Decoder over the registry's union of requests, built once; one reused Encoder. A frame's
length is checked against the limit before a byte of its body is buffered.
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from sidecar.errors import FrameTooLarge, InvalidMessage, SidecarError, UnknownOp
from sidecar.protocol.registry import OPS, AnyRequest

HEADER_BYTES = 4
MAX_FRAME_LIMIT = 0xFFFFFFFF

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
