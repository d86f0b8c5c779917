"""Clients for service processes: asyncio and blocking, plus a worker helper.

Every error reply raises the SidecarError subclass of its code. A daemon that is not running
raises SidecarUnavailable quickly (a service must never hang on the sidecar).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import structlog

from sidecar.config import default_socket_path
from sidecar.errors import (
    BackendUnavailable,
    BadFrame,
    FrameTooLarge,
    InternalError,
    ShuttingDown,
    SidecarError,
    SidecarUnavailable,
    TooManyConnections,
    error_from_code,
)
from sidecar.models import QueueStats
from sidecar.protocol import (
    DECODE_ERRORS,
    MAX_FRAME_LIMIT,
    Cancel,
    Complete,
    Dequeue,
    DequeueResult,
    Enqueue,
    EnqueuedItem,
    EnqueueItem,
    EnqueueResult,
    Extend,
    Fail,
    FrameReader,
    Health,
    HealthResult,
    Hello,
    HelloResult,
    Job,
    Reply,
    Request,
    RequestInfo,
    Stats,
    Status,
    append_frame,
    encode_frame,
)

T = TypeVar("T")
log = structlog.get_logger("sidecar.client")

CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 10.0
# A dequeue reply can exceed the daemon's request-frame limit (max_batch x max_payload_bytes);
# the daemon is trusted, so the client accepts up to the wire maximum.
_CLIENT_MAX_FRAME = MAX_FRAME_LIMIT
# Errors that end the connection; any other reply without an id is about one request.
_CONNECTION_ERRORS = frozenset(
    cls.code for cls in (FrameTooLarge, BadFrame, TooManyConnections, ShuttingDown)
)
# Past this many unsent bytes in the transport, a call waits for the daemon to read.
_WRITE_HIGH_BYTES = 1 << 20
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def socket_path(path: str | None = None) -> str:
    """The socket to use: the argument, else SIDECAR_SOCKET, else the daemon's default."""
    return path or os.environ.get("SIDECAR_SOCKET") or default_socket_path()


def item(
    payload: object,
    *,
    priority: int | None = None,
    ttl_s: float | None = None,
    queue_id: str | None = None,
    max_attempts: int | None = None,
) -> EnqueueItem:
    """One request to enqueue; payload is any value MessagePack can encode."""
    fields: dict[str, Any] = {"payload": msgspec.Raw(_encoder.encode(payload))}
    if priority is not None:
        fields["priority"] = priority
    return EnqueueItem(ttl_s=ttl_s, queue_id=queue_id, max_attempts=max_attempts, **fields)


def decode_payload(job: Job, type: type[T] | Any = Any) -> Any:
    """A job's payload as Python objects (or as `type`, validated)."""
    return msgspec.msgpack.decode(job.payload, type=type)


def _decode_reply(body: bytes) -> Reply:
    try:
        return _reply_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise InternalError(f"malformed reply from the sidecar: {exc}") from exc


def _decode_result(reply: Reply, result_type: type[T]) -> T:
    try:
        return msgspec.msgpack.decode(reply.result or b"\xc0", type=result_type)
    except DECODE_ERRORS as exc:
        raise InternalError(f"malformed result from the sidecar: {exc}") from exc


def _ends_connection(reply: Reply) -> bool:
    return reply.error is not None and reply.error.code in _CONNECTION_ERRORS


def _raise_for(reply: Reply) -> None:
    if not reply.ok:
        err = reply.error
        if err is None:
            raise SidecarError("error reply without an error body")
        raise error_from_code(err.code, err.message, err.details)


class AsyncClient:
    """One connection to the daemon; safe to share between tasks (requests are pipelined)."""

    def __init__(self, path: str | None = None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed_error: SidecarError | None = None
        self._outbox = bytearray()
        self._flush_scheduled = False

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncClient:
        """Open the connection, failing fast with SidecarUnavailable when nobody listens."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise SidecarUnavailable(
                f"sidecar unavailable at {self.path}: {exc.__class__.__name__}: {exc}",
                {"path": self.path},
            ) from exc
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader))
        return self

    async def _drop_connection(self) -> None:
        writer, self._writer, self._closed_error = self._writer, None, None
        self._outbox = bytearray()
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):  # reset by the peer: closed either way
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._fail_pending(SidecarUnavailable("client closed"))

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- ops ---------------------------------------------------------------------------------

    async def hello(self) -> HelloResult:
        return await self._call(Hello(id=0, client="sidecar-python"), HelloResult)

    async def enqueue(self, payload: object, **options: Any) -> EnqueuedItem:
        """Enqueue one request; options are those of `item` (priority, ttl_s, queue_id, ...)."""
        [res] = await self.enqueue_many([item(payload, **options)])
        return res

    async def enqueue_many(self, items: Sequence[EnqueueItem]) -> list[EnqueuedItem]:
        """Enqueue a batch, all or none; build items with `sidecar.client.item`."""
        res = await self._call(Enqueue(id=0, items=list(items)), EnqueueResult)
        return res.items

    async def dequeue(
        self, max_items: int = 1, *, lease_s: float | None = None, wait_s: float = 0.0
    ) -> list[Job]:
        """Lease up to max_items requests, waiting up to wait_s for one to arrive."""
        req = Dequeue(id=0, max_items=max_items, lease_s=lease_s, wait_s=wait_s)
        res = await self._call(req, DequeueResult, extra_timeout_s=wait_s)
        return res.items

    async def extend(
        self, queue_id: str, lease_id: str, lease_s: float | None = None
    ) -> RequestInfo:
        req = Extend(id=0, queue_id=queue_id, lease_id=lease_id, lease_s=lease_s)
        return await self._call(req, RequestInfo)

    async def complete(self, queue_id: str, lease_id: str) -> RequestInfo:
        return await self._call(Complete(id=0, queue_id=queue_id, lease_id=lease_id), RequestInfo)

    async def fail(
        self,
        queue_id: str,
        lease_id: str,
        reason: str = "",
        *,
        retry: bool = True,
        delay_s: float = 0.0,
    ) -> RequestInfo:
        req = Fail(
            id=0, queue_id=queue_id, lease_id=lease_id, reason=reason, retry=retry, delay_s=delay_s
        )
        return await self._call(req, RequestInfo)

    async def cancel(self, queue_id: str) -> RequestInfo:
        return await self._call(Cancel(id=0, queue_id=queue_id), RequestInfo)

    async def status(self, queue_id: str) -> RequestInfo:
        return await self._call(Status(id=0, queue_id=queue_id), RequestInfo)

    async def stats(self) -> QueueStats:
        return await self._call(Stats(id=0), QueueStats)

    async def health(self) -> HealthResult:
        return await self._call(Health(id=0), HealthResult)

    # -- plumbing ----------------------------------------------------------------------------

    async def _call(self, req: Request, result_type: type[T], extra_timeout_s: float = 0) -> T:
        if self._closed_error is not None:
            # The connection ended (the daemon restarted, say): the next call reconnects,
            # and fails fast with SidecarUnavailable if the daemon is still away.
            await self._drop_connection()
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        req.id = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        self._pending[req.id] = fut
        # Frames from every task that calls in this loop iteration leave in one write.
        append_frame(self._outbox, req)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_outbox)
        try:
            if self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_BYTES:
                await self._writer.drain()  # the daemon reads slower than we write: wait
            async with asyncio.timeout(self.timeout_s + extra_timeout_s):
                reply = await fut
        except TimeoutError as exc:
            raise SidecarUnavailable(f"no reply from the sidecar within {self.timeout_s}s") from exc
        except OSError as exc:
            raise SidecarUnavailable(f"connection to the sidecar failed: {exc}") from exc
        finally:
            self._pending.pop(req.id, None)
        _raise_for(reply)
        return _decode_result(reply, result_type)

    def _flush_outbox(self) -> None:
        self._flush_scheduled = False
        if self._outbox and self._writer is not None and not self._writer.is_closing():
            self._writer.write(self._outbox)
            self._outbox = bytearray()  # the transport may keep the old buffer; never reuse it

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        frames = FrameReader(_CLIENT_MAX_FRAME)
        error: SidecarError = SidecarUnavailable("the sidecar closed the connection")
        try:
            while data := await reader.read(65536):
                for body in frames.feed(data):
                    reply = _decode_reply(body)
                    if reply.id is None and _ends_connection(reply):
                        # An error about the connection itself (a framing error, or too many
                        # connections): it ends the connection for every pending call.
                        _raise_for(reply)
                    fut = self._pending.get(reply.id) if reply.id is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result(reply)
        except SidecarError as err:
            error = err
        except OSError as exc:
            error = SidecarUnavailable(f"connection to the sidecar failed: {exc}")
        finally:
            self._closed_error = error
            self._fail_pending(error)

    def _fail_pending(self, error: SidecarError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()


async def connect(path: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncClient:
    """Open an AsyncClient connection to the daemon."""
    return await AsyncClient(path).connect(timeout_s)


class Client:
    """A blocking client (one request at a time per instance; thread-safe with a lock)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.path = socket_path(path)
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._frames = FrameReader(_CLIENT_MAX_FRAME)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def connect(self) -> Client:
        """Open the connection, failing fast with SidecarUnavailable when nobody listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise SidecarUnavailable(
                f"sidecar unavailable at {self.path}: {exc.__class__.__name__}: {exc}",
                {"path": self.path},
            ) from exc
        self._sock = sock
        self._frames = FrameReader(_CLIENT_MAX_FRAME)
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hello(self) -> HelloResult:
        return self._call(Hello(id=0, client="sidecar-python-sync"), HelloResult)

    def enqueue(self, payload: object, **options: Any) -> EnqueuedItem:
        [res] = self.enqueue_many([item(payload, **options)])
        return res

    def enqueue_many(self, items: Sequence[EnqueueItem]) -> list[EnqueuedItem]:
        return self._call(Enqueue(id=0, items=list(items)), EnqueueResult).items

    def dequeue(
        self, max_items: int = 1, *, lease_s: float | None = None, wait_s: float = 0.0
    ) -> list[Job]:
        req = Dequeue(id=0, max_items=max_items, lease_s=lease_s, wait_s=wait_s)
        return self._call(req, DequeueResult, extra_timeout_s=wait_s).items

    def extend(self, queue_id: str, lease_id: str, lease_s: float | None = None) -> RequestInfo:
        req = Extend(id=0, queue_id=queue_id, lease_id=lease_id, lease_s=lease_s)
        return self._call(req, RequestInfo)

    def complete(self, queue_id: str, lease_id: str) -> RequestInfo:
        return self._call(Complete(id=0, queue_id=queue_id, lease_id=lease_id), RequestInfo)

    def fail(
        self,
        queue_id: str,
        lease_id: str,
        reason: str = "",
        *,
        retry: bool = True,
        delay_s: float = 0.0,
    ) -> RequestInfo:
        req = Fail(
            id=0, queue_id=queue_id, lease_id=lease_id, reason=reason, retry=retry, delay_s=delay_s
        )
        return self._call(req, RequestInfo)

    def cancel(self, queue_id: str) -> RequestInfo:
        return self._call(Cancel(id=0, queue_id=queue_id), RequestInfo)

    def status(self, queue_id: str) -> RequestInfo:
        return self._call(Status(id=0, queue_id=queue_id), RequestInfo)

    def stats(self) -> QueueStats:
        return self._call(Stats(id=0), QueueStats)

    def health(self) -> HealthResult:
        return self._call(Health(id=0), HealthResult)

    def _call(self, req: Request, result_type: type[T], extra_timeout_s: float = 0) -> T:
        with self._lock:
            if self._sock is None:
                self.connect()
            assert self._sock is not None
            req.id = next(self._ids)
            try:
                self._sock.settimeout(self.timeout_s + extra_timeout_s)
                self._sock.sendall(encode_frame(req))
                reply = self._read_reply(req.id)
            except OSError as exc:  # includes socket timeouts
                self.close()
                raise SidecarUnavailable(f"connection to the sidecar failed: {exc}") from exc
        _raise_for(reply)
        return _decode_result(reply, result_type)

    def _read_reply(self, request_id: int) -> Reply:
        assert self._sock is not None
        while True:
            data = self._sock.recv(65536)
            if not data:
                self.close()
                raise SidecarUnavailable("the sidecar closed the connection")
            for body in self._frames.feed(data):
                reply = _decode_reply(body)
                if reply.id is None and _ends_connection(reply):
                    self.close()
                    _raise_for(reply)
                if reply.id in (request_id, None):  # one request at a time: nil is ours too

                    return reply


# -- worker helper ----------------------------------------------------------------------------


class PermanentFailure(Exception):
    """Raise from a worker handler to fail the request without a retry."""


Handler = Callable[[Job], Awaitable[None]]


async def run_worker(
    handler: Handler,
    *,
    path: str | None = None,
    concurrency: int = 1,
    lease_s: float | None = None,
    wait_s: float = 5.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Take requests and run handler on each, extending the lease while it runs.

    A handler that returns completes the request; one that raises fails it with a retry
    (PermanentFailure: without). Runs until `stop` is set. Long-polling dequeues use their own
    connection: on a shared one, replies come in order, so every extend and complete would
    wait behind the poll and leases could lapse under a running handler.
    """
    stop = stop or asyncio.Event()
    async with AsyncClient(path) as poller, AsyncClient(path) as settler:
        hello = await poller.hello()
        lease = lease_s or hello.limits.default_lease_s
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()
        backoff = 0.05
        while not stop.is_set():
            await slots.acquire()  # a free slot first: a job taken is always run at once
            try:
                jobs = await poller.dequeue(1, lease_s=lease, wait_s=wait_s)
            except SidecarError as exc:
                # The daemon or its store is briefly away: back off, and keep the jobs that
                # are running.
                slots.release()
                log.warning("dequeue_failed", code=exc.code, error=exc.message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except BaseException:
                slots.release()
                raise
            backoff = 0.05
            if not jobs:
                slots.release()
                continue
            task = asyncio.get_running_loop().create_task(
                _run_job(settler, handler, jobs[0], lease, slots)
            )
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def _run_job(
    client: AsyncClient, handler: Handler, job: Job, lease_s: float, slots: asyncio.Semaphore
) -> None:
    keeper = asyncio.get_running_loop().create_task(_keep_lease(client, job, lease_s))
    try:
        await handler(job)
    except PermanentFailure as exc:
        await client.fail(job.queue_id, job.lease_id, f"{exc}", retry=False)
    except Exception as exc:
        await client.fail(job.queue_id, job.lease_id, f"{type(exc).__name__}: {exc}", retry=True)
    else:
        await client.complete(job.queue_id, job.lease_id)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        slots.release()


async def _keep_lease(client: AsyncClient, job: Job, lease_s: float) -> None:
    """Extend the lease every third of its length, so a slow handler keeps its request."""
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            await client.extend(job.queue_id, job.lease_id, lease_s)
        except BackendUnavailable:
            continue  # the store is briefly away; the next round tries again
