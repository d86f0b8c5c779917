"""The async client's connection: one socket, its pending calls, its reader and its deadline.

A connection fails only its own calls (a newer connection's are never touched), and one timer
per connection enforces the reply deadline: replies come in request order, so the oldest
pending call always has the earliest deadline.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any, TypeVar, cast

import msgspec
import structlog

from sidecar.config import ConfigError, default_socket_path
from sidecar.errors import (
    BadFrame,
    FrameTooLarge,
    InternalError,
    PermissionDenied,
    ShuttingDown,
    SidecarError,
    SidecarUnavailable,
    TooManyConnections,
    error_from_code,
)
from sidecar.protocol import (
    DECODE_ERRORS,
    MAX_FRAME_LIMIT,
    FrameReader,
    Reply,
    Request,
    append_frame,
)

T = TypeVar("T")
log = structlog.get_logger("sidecar.client")

# A daemon that is not there must fail a call within a second (docs/client.md says so); one
# that is there but frozen within the reply deadline. Both can be set per client or by env.
CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_ENV = "SIDECAR_CLIENT_CONNECT_TIMEOUT_SECONDS"
TIMEOUT_ENV = "SIDECAR_CLIENT_TIMEOUT_SECONDS"
# A dequeue reply can exceed the daemon's request-frame limit (max_batch x max_payload_bytes);
# the daemon is trusted, so the client accepts up to the wire maximum.
CLIENT_MAX_FRAME = MAX_FRAME_LIMIT
# Frames made in one loop pass leave in one write at its end, or as soon as this many have
# gathered: the daemon starts on those while this process makes the rest, so many requests in
# flight flow as a pipeline rather than in a lock step of whole bursts (bench/README.md).
EARLY_WRITE_FRAMES = 16
# Errors that end the connection; any other reply without an id is about one request.
_CONNECTION_ERRORS = frozenset(
    cls.code
    for cls in (FrameTooLarge, BadFrame, TooManyConnections, ShuttingDown, PermissionDenied)
)
_reply_decoder = msgspec.msgpack.Decoder(Reply)



def socket_path(path: str | None = None) -> str:
    """The socket to use: the argument, else SIDECAR_SOCKET, else the daemon's default."""
    return path or os.environ.get("SIDECAR_SOCKET") or default_socket_path()

def decode_reply(body: bytes) -> Reply:
    """One reply frame's body; a malformed one is the daemon's internal error."""
    try:
        return _reply_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise InternalError(f"malformed reply from the sidecar: {exc}") from exc


def decode_result(reply: Reply, result_type: type[T]) -> T:
    """An ok reply's result as result_type."""
    try:
        return msgspec.msgpack.decode(reply.result or b"\xc0", type=result_type)
    except DECODE_ERRORS as exc:
        raise InternalError(f"malformed result from the sidecar: {exc}") from exc


def ends_connection(reply: Reply) -> bool:
    """Whether reply is an error about the connection itself (the daemon then closes it)."""
    return reply.error is not None and reply.error.code in _CONNECTION_ERRORS


def raise_for(reply: Reply) -> None:
    """Raise the SidecarError subclass of an error reply's code; nothing for an ok reply."""
    if not reply.ok:
        err = reply.error
        if err is None:
            raise SidecarError("error reply without an error body")
        raise error_from_code(err.code, err.message, err.details)


def env_seconds(name: str, default: float) -> float:
    """A timeout from the environment (a number of seconds > 0), else the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={raw!r} is invalid: expected a number of seconds > 0")
    return value


def lost(message: str, reason: str) -> SidecarUnavailable:
    """A call that was sent but got no reply: its outcome is unknown."""
    return SidecarUnavailable(message, {"sent": True, "reason": reason})


def observe(task: asyncio.Task[Any]) -> None:
    """Done callback: retrieve a background task's exception so it is never left unobserved."""
    exc = None if task.cancelled() else task.exception()
    if exc is not None and not isinstance(exc, SidecarError):
        log.error("client_task_failed", error=repr(exc))


class ClientConnection(asyncio.Protocol):
    """One socket and the calls sent on it; only its own replies and timer ever fail them.

    A Protocol, not a stream: a reply frame resolves its call's future in data_received, with
    no reader task to wake in between (one task step less per call).

    Replies come in request order, so the oldest unanswered call has the earliest deadline:
    one timer armed at that deadline watches the whole connection, not one timer per call.
    """

    def __init__(self, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple[asyncio.Future[Reply], float]] = {}
        self.error: SidecarError | None = None
        # Done once the socket is closed (connection_lost): close() then has nothing to wait on.
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._frames = FrameReader(CLIENT_MAX_FRAME)
        self._outbox = bytearray()
        self._outbox_frames = 0
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_deadline = 0.0
        self._drained: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: str, timeout_s: float) -> ClientConnection:
        """Connect to the daemon's socket at path (OSError when nobody listens)."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_unix_connection(lambda: cls(timeout_s), path)
        return conn

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        frames = self._frames
        try:
            for body in frames.feed(data):
                self._deliver(decode_reply(body))
        except SidecarError as err:
            self.close(err)
            return
        if frames.error is not None:
            self.close(InternalError(f"reply from the sidecar: {frames.error.message}"))

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost fails what is pending

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.close(lost("the sidecar closed the connection", "connection_lost"))
        else:
            self.close(lost(f"connection to the sidecar failed: {exc}", "connection_lost"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_writers()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writers()

    # -- calls -----------------------------------------------------------------------------

    def send(self, req: Request, extra_timeout_s: float) -> asyncio.Future[Reply]:
        """Queue req's frame (frames of one loop pass leave in one write); its reply's future."""
        loop = self.loop
        # A call cannot be answered before the calls ahead of it (replies are in order), so its
        # deadline is never earlier than theirs: the oldest pending deadline is the earliest.
        deadline = max(loop.time() + self.timeout_s + extra_timeout_s, self._last_deadline)
        self._last_deadline = deadline
        fut: asyncio.Future[Reply] = loop.create_future()
        if self.error is not None:  # closed after it was handed out, before this call ran
            fut.set_exception(self.error)
            return fut
        self.pending[req.id] = (fut, deadline)
        append_frame(self._outbox, req)
        self._outbox_frames += 1
        if self._outbox_frames >= EARLY_WRITE_FRAMES:
            self._write_out()  # the flush already scheduled finds less (or nothing) to write
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return fut

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark (or until closed)."""
        if self._drained is not None:
            await asyncio.shield(self._drained)

    @property
    def paused(self) -> bool:
        """The transport holds more than its high-water mark: drain() waits."""
        return self._drained is not None

    def write_buffer_size(self) -> int:
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def _wake_writers(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        self._outbox_frames = 0
        transport = self.transport
        if self._outbox and self.error is None and transport is not None:
            if not transport.is_closing():
                transport.write(self._outbox)
            self._outbox = bytearray()  # the transport may keep the old buffer; never reuse it

    def _check_deadline(self) -> None:
        self._timer = None
        if self.error is not None or not self.pending:
            return
        _, deadline = next(iter(self.pending.values()))
        if deadline - self.loop.time() > 0.001:  # re-arm for the call that is now the oldest
            self._timer = self.loop.call_at(deadline, self._check_deadline)
            return
        self.close(
            lost(
                f"no reply from the sidecar within {self.timeout_s}s (plus any long-poll wait); "
                "its outcome is unknown",
                "timeout",
            )
        )

    def _deliver(self, reply: Reply) -> None:
        if reply.id is None:
            if ends_connection(reply):
                # An error about the connection itself (a framing error, too many connections,
                # shutting down): it ends the connection for every pending call.
                raise_for(reply)
            # Replies are in order: an error without an id answers the oldest call.
            entry = next(iter(self.pending.items()), None)
            if entry is None:
                return
            key, (fut, _) = entry
        else:
            key = reply.id
            found = self.pending.get(key)
            if found is None:
                return
            fut = found[0]
        del self.pending[key]
        if not fut.done():  # a call whose caller was cancelled stays until its reply passes
            fut.set_result(reply)

    def close(self, error: SidecarError) -> None:
        """End this connection: fail its own pending calls with error, never anyone else's."""
        if self.error is not None:
            return
        self.error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # abort, not close: a frozen daemon never reads what is buffered, and close would wait.
        if self.transport is not None:
            self.transport.abort()
        else:
            self.closed.set_result(None)
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)
