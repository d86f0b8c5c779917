"""One client connection of the Unix-socket server: frames in, replies out in request order.

Decoding happens in data_received (it never awaits), which also starts each request's op at once:
the requests of one connection run concurrently, so one shared client gets the throughput of
many connections (and the stores can fold the calls of one loop pass). Each connection keeps an
ordered queue of reply slots; every ready prefix of replies leaves in one write, so replies leave
in request order. Only broken framing closes a connection.

With the local store alone the ops run eagerly: an op's first step runs inside the read, and
the replies of the ops that finished in it are written before data_received returns; an op
that suspends goes on in a task. Other stores (Redis) enter asyncio.timeout, which needs a
task, so each op gets one. An op that ends in its task writes the ready prefix of replies
itself; the connection's writer task waits for what cannot leave yet (a reply behind a slow
one, a full socket buffer, a framing error, the drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Coroutine
from time import perf_counter
from typing import cast

import structlog

from sidecar import eager
from sidecar.errors import (
    BadFrame,
    InternalError,
    SidecarError,
)
from sidecar.protocol import (
    SPECS,
    AnyRequest,
    ErrorReply,
    FrameReader,
    OkReply,
    Purge,
    Requeue,
    append_frame,
    decode_request,
    encode_frame,
    error_reply,
    request_id_of,
)
from sidecar.server.state import ServerState, peer_uid

log = structlog.get_logger("sidecar.server")


# How long a draining connection waits for its client to close after the daemon's end of
# stream: a client that reads it closes at once; an idle one must not hold the drain long.
LINGER_S = 1.0
# Stop reading a connection whose unanswered requests pile up past this, resume at a quarter:
# a client that sends faster than it reads cannot grow the daemon's memory without bound.
INBOX_HIGH = 1024
INBOX_LOW = 256


class _Slot:
    """One request's place in the reply order: its reply frame once made, the bytes it holds."""

    __slots__ = ("frame", "size")

    def __init__(self, size: int, frame: bytearray | None = None) -> None:
        self.frame = frame
        self.size = size


def _frame(message: object) -> bytearray:
    buf = bytearray()
    append_frame(buf, message)
    return buf


class _Fatal:
    """Queued after the requests that preceded a framing error: reply with it, then close."""

    __slots__ = ("error",)

    def __init__(self, error: SidecarError) -> None:
        self.error = error


# The op name request_done reports, by request type (one dict lookup on the hot path).
_OP_NAMES = {request: spec.name for request, spec in SPECS.items()}
_conn_ids = itertools.count(1)


class Connection(asyncio.Protocol):
    """One client connection: frames in, replies out in request order.

    Bytes held for it (its partial frame plus its unanswered requests) count against the
    daemon's budget; reading pauses rather than buffer past a bound, and resumes as it drains.
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.conn_id = next(_conn_ids)
        self.reader = FrameReader(state.settings.max_frame_bytes)
        # Reply slots in request order, until written. A slot holds its request's bytes, or its
        # reply's once made if larger, in inbox_bytes until written: replies made behind a long
        # poll are bounded like the requests they answer.
        self.inbox: deque[_Slot | _Fatal] = deque()
        self.inbox_bytes = 0
        self.running: set[asyncio.Task[None]] = set()  # ops that suspended, not yet answered
        self.held = 0  # bytes this connection counts in state.buffered
        self.out = bytearray()
        self.wakeup = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.eof = False
        self.half_closed = False  # the daemon's end of stream is sent (draining): no more ops
        self.closed = False
        self.fatal = False
        self.reading_paused = False
        now = state.loop.time()
        self.frame_started: float | None = None
        self.write_blocked: float | None = None  # since when the client has not read replies
        self.last_active = now
        self.log = log.bind(conn_id=self.conn_id)

    # -- asyncio.Protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        state = self.state
        err = state.refusal(transport)
        if err is not None:
            transport.write(encode_frame(error_reply(None, err)))
            transport.close()
            state.observer.connection_refused(err.code)
            return
        state.connections.add(self)
        state.count.open += 1
        state.observer.connection_opened()
        state.arm_sweep()
        self.task = asyncio.get_running_loop().create_task(self._run())
        self.log.debug("connection_opened")

    def data_received(self, data: bytes) -> None:
        if self.fatal or self.eof or self.half_closed:
            # After the daemon's end of stream, a request is neither run nor answered: the
            # client reads the end first and sends it again to the next daemon (_linger).
            return
        now = self.last_active = self.state.loop.time()
        bodies = self.reader.feed(data)
        for body in bodies:
            self._start(body)
        partial = self.reader.partial
        if bodies or not partial:  # a new frame (if any) started in this read
            self.frame_started = now if partial else None
        elif self.frame_started is None:
            self.frame_started = now
        if self.reader.error is not None:
            self._fail(self.reader.error)
        self._account()
        self.update_reading()
        self._write_now()

    def eof_received(self) -> bool:
        self.eof = True
        if self.reader.partial and not self.fatal:
            self._fail(
                BadFrame(
                    f"connection closed inside a frame ({self.reader.partial} bytes of it read)",
                    {"partial_bytes": self.reader.partial},
                )
            )
        self.wakeup.set()
        return True  # keep the write side open until the replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if self in state.connections:  # a refused connection was never counted
            state.connections.discard(self)
            state.count.open -= 1
            state.observer.connection_closed()
        state.budget_paused.discard(self)
        self.closed = True
        for task in self.running:
            task.cancel()
        self.inbox.clear()
        self.inbox_bytes = 0
        self.reader = FrameReader(self.reader.max_frame_bytes)
        self._account()
        self.writable.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.log.debug("connection_closed")

    def pause_writing(self) -> None:
        self.writable.clear()
        self.write_blocked = self.state.loop.time()

    def resume_writing(self) -> None:
        self.writable.set()
        self.write_blocked = None

    # -- the requests and the writer ---------------------------------------------------------

    def _start(self, body: bytes) -> None:
        """Give the request its reply slot and start its op now (it needs no other request)."""
        try:
            req = decode_request(body)
        except SidecarError as err:
            started = perf_counter()
            frame = _frame(error_reply(request_id_of(err), err))
            self.inbox.append(_Slot(len(frame), frame))
            self.inbox_bytes += len(frame)
            self.state.observer.request_done("invalid", perf_counter() - started, err.code)
            return
        slot = _Slot(len(body))
        self.inbox.append(slot)
        self.inbox_bytes += slot.size
        if not self.state.eager_ops:
            # Ops that may enter asyncio.timeout (the Redis path) need a task from their start;
            # the task runs the op itself and writes its reply when made.
            task = self.state.loop.create_task(self._serve(slot, req, perf_counter(), True))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
            return
        op = self._serve(slot, req, perf_counter())
        # Eager: the op's first step runs here. An op of the local store finishes in it (its
        # reply is ready before this read's replies are written, and no task is made); one that
        # suspends (the journal's fsync, a long poll) goes on in a task of its own.
        ended, waiting = eager.first_step(op)
        if ended:
            return
        self._track(self.state.loop.create_task(self._resume(op, waiting)), op)

    def _track(self, task: asyncio.Task[None], op: Coroutine[object, None, None]) -> None:
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        # Cancelled before its first step, the task never runs op: close op, so it is neither
        # left suspended for the garbage collector nor reported as never awaited.
        task.add_done_callback(lambda _: op.close())

    async def _resume(self, op: Coroutine[object, None, None], waiting: object) -> None:
        """Run op, suspended in its eager first step, to its end in this task (eager.py)."""
        try:
            await eager.resume(op, waiting)
        finally:
            self._write_now()

    async def _serve(
        self, slot: _Slot, req: AnyRequest, started: float, tasked: bool = False
    ) -> None:
        """Answer req into its slot; tasked (the op runs in a task of its own): write it too."""
        reply: OkReply | ErrorReply
        try:
            if isinstance(req, Requeue | Purge):  # logged with who asked (SO_PEERCRED)
                uid = None if self.transport is None else peer_uid(self.transport)
                reply = OkReply(id=req.id, result=await self.state.ops.act(req, uid))
            else:
                reply = OkReply(id=req.id, result=await self.state.ops.handle(req))
        except SidecarError as err:
            reply = error_reply(req.id, err)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.closed or (task is not None and task.cancelling()):
                raise
            # A cancellation from inside the op (a shared future cancelled under it): the
            # slot must still get a reply, or every later reply would wait behind it forever.
            self.log.error("op_cancelled_inside", op=type(req).__name__.lower())
            reply = error_reply(req.id, InternalError("internal error; see the daemon's log"))
        except Exception:
            self.log.exception("op_failed", op=type(req).__name__.lower())
            reply = error_reply(req.id, InternalError("internal error; see the daemon's log"))
        frame = slot.frame = _frame(reply)
        elapsed = perf_counter() - started
        # Not when closed: an op that ignored its cancellation; its bytes were released already.
        if not self.closed:
            if len(frame) > slot.size:
                self.inbox_bytes += len(frame) - slot.size
                slot.size = len(frame)
                self._account()
                self.update_reading()
            if tasked:
                self._write_now()
        # Recorded once the reply is out: the client's next request need not wait for it.
        code = reply.error.code if isinstance(reply, ErrorReply) else None
        self.state.observer.request_done(_OP_NAMES[type(req)], elapsed, code)

    async def _run(self) -> None:
        """The writer: every ready prefix of replies, in request order, in one write."""
        assert self.transport is not None
        transport = self.transport
        try:
            while True:
                self._take_ready()
                head = self.inbox[0] if self.inbox else None
                if isinstance(head, _Fatal):
                    append_frame(self.out, error_reply(None, head.error))
                    break
                if head is None and self.eof:
                    break
                if head is None and self.state.draining:
                    await self._linger()  # everything read is answered: end cleanly
                    break
                # Replies already made never wait behind a slow op (a long poll included).
                self._flush()
                if not self.writable.is_set():
                    await self.writable.wait()
                    continue
                self.wakeup.clear()
                await self.wakeup.wait()
            self._flush()
        finally:
            transport.close()
            await self._stop_ops()

    def _take_ready(self) -> None:
        """Move the ready prefix of replies to the output buffer, in request order."""
        inbox = self.inbox
        taken = 0
        while inbox:
            head = inbox[0]
            if isinstance(head, _Fatal) or head.frame is None:
                break
            self.out += head.frame
            # Popped only once in the output: its bytes count against the bounds until then.
            inbox.popleft()
            self.inbox_bytes -= head.size
            taken += 1
        if taken:
            self._account()
            self.update_reading()

    def _write_now(self) -> None:
        """After a read: write the replies its eager ops made; wake the writer only if needed.

        The writer sleeps while the reply at the head of the line is not made yet; it has work
        only when that reply is made, a framing error waits to be sent, or nothing is left to
        answer after the client's end of stream (then it closes: protocol.md section 3) or
        while draining.
        """
        if self.writable.is_set():
            self._take_ready()
            self._flush()
        head = self.inbox[0] if self.inbox else None
        if head is None and not self.eof and not self.state.draining:
            return
        if isinstance(head, _Slot) and head.frame is None:
            return
        self.wakeup.set()

    async def _stop_ops(self) -> None:
        """The connection ended: cancel the ops still running and wait until they have ended."""
        running = set(self.running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    def _flush(self) -> None:
        transport = self.transport
        if not self.out or transport is None or transport.is_closing() or self.half_closed:
            return
        transport.write(self.out)
        self.out = bytearray()  # the transport may keep the old buffer; never reuse it
        self.last_active = self.state.loop.time()

    async def _linger(self) -> None:
        """Draining, all read answered: half-close, and give the client a moment to close first.

        The client reads a clean end of stream: a call left without a reply was not processed,
        and a client that survives restarts sends it again to the next daemon. Closing with a
        request of the client's still unread would reset the connection instead, and a reset
        can discard replies the client has not read yet.
        """
        self._flush()
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            return
        self.half_closed = True
        transport.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while not self.eof:
                    self.wakeup.clear()
                    await self.wakeup.wait()

    def _fail(self, err: SidecarError) -> None:
        """A framing error: answer what came before it, then the error, then close."""
        self.fatal = True
        self.inbox.append(_Fatal(err))
        self.log.info("bad_frame", code=err.code, reason=err.message)
        if self.transport is not None and not self.reading_paused:
            self._pause_reading()

    # -- bounds: bytes held, timeouts --------------------------------------------------------

    def _account(self) -> None:
        """Bring this connection's share of the buffered bytes of all connections up to date."""
        held = self.reader.partial + self.inbox_bytes
        if held != self.held:
            freed = held < self.held
            self.state.buffered += held - self.held
            self.held = held
            if freed:
                self.state.resume_waiting()

    def update_reading(self) -> None:
        """Pause past a bound (own requests or bytes, or the shared budget); resume below."""
        if self.fatal or self.transport is None:
            return
        state = self.state
        own_bound = state.max_inbox_bytes
        if self.reading_paused:
            if len(self.inbox) > INBOX_LOW or self.inbox_bytes > own_bound // 4:
                return  # its own answers bring it back here as they drain its inbox
            if state.buffered > state.buffer_low:
                state.budget_paused.add(self)  # resumed by ServerState.resume_waiting
                return
            self.reading_paused = False
            state.budget_paused.discard(self)
            with contextlib.suppress(RuntimeError):  # closing
                self.transport.resume_reading()
        elif len(self.inbox) >= INBOX_HIGH or self.inbox_bytes >= own_bound:
            self._pause_reading()
        elif state.buffered >= state.max_buffered:
            self._pause_reading()
            state.budget_paused.add(self)
            state.log_budget_full()

    def _pause_reading(self) -> None:
        assert self.transport is not None
        self.reading_paused = True
        with contextlib.suppress(RuntimeError):  # already closing
            self.transport.pause_reading()

    @property
    def unanswered(self) -> int:
        """Requests read and not yet answered on this connection."""
        return len(self.inbox)

    def abort(self) -> None:
        """End the connection at once, unsent replies dropped (the end of a drain)."""
        if self.transport is not None:
            self.transport.abort()

    def check_timeouts(self, now: float) -> None:
        """Called by ServerState's sweep: end a stalled frame or reply; close an idle connection."""
        if self.transport is None:
            return
        limit = self.state.frame_timeout_s
        blocked = self.write_blocked
        if blocked is not None and now - blocked >= limit:
            # A client that stops reading its replies holds a slot as surely as a half frame.
            self.log.info("connection_write_timeout", blocked_s=round(now - blocked, 1))
            self.transport.abort()
            return
        if self.fatal:
            return
        started = self.frame_started
        if started is not None and now - started >= limit:
            partial = self.reader.partial
            # Drop the partial bytes at once; nothing more is read from this connection.
            self.reader = FrameReader(self.reader.max_frame_bytes)
            self.frame_started = None
            self._fail(
                BadFrame(
                    f"frame not completed within {limit}s ({partial} bytes of it read)",
                    {"partial_bytes": partial, "frame_timeout_s": limit},
                )
            )
            self._account()
            self.wakeup.set()
            return
        idle = self.state.idle_timeout_s
        if idle > 0 and not self.inbox and started is None and now - self.last_active >= idle:
            self.log.info("connection_idle_closed", idle_s=round(now - self.last_active, 1))
            self.transport.close()
