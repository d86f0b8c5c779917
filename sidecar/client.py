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
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import structlog

from sidecar.client_conn import (
    CLIENT_MAX_FRAME,
    CONNECT_TIMEOUT_ENV,
    CONNECT_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    TIMEOUT_ENV,
    ClientConnection,
    decode_reply,
    decode_result,
    ends_connection,
    env_seconds,
    lost,
    observe,
    raise_for,
)
from sidecar.config import default_socket_path
from sidecar.errors import (
    BackendUnavailable,
    SidecarError,
    SidecarUnavailable,
    error_from_code,
)
from sidecar.models import QueueStats
from sidecar.protocol import (
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
    encode_frame,
)
from sidecar.socket_dir import check_socket_folder

T = TypeVar("T")
log = structlog.get_logger("sidecar.client")

# Past this many unsent bytes in the transport, a call waits for the daemon to read.
_WRITE_HIGH_BYTES = 1 << 20
# Ops that change nothing, or nothing twice: safe to send again after a lost connection.
# An enqueue is safe only when every item names its queue_id (the client names them).
_RETRY_SAFE = (Hello, Status, Stats, Health)
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


def _retry_safe(req: Request) -> bool:
    """Whether sending req twice has the effect of sending it once."""
    if isinstance(req, Enqueue):
        return all(i.queue_id is not None for i in req.items)
    return isinstance(req, _RETRY_SAFE)


def _named(items: Sequence[EnqueueItem]) -> list[EnqueueItem]:
    """Items with a queue_id each (32 hex digits, as the daemon's), so a resend cannot duplicate."""
    return [i if i.queue_id is not None else msgspec.structs.replace(i, queue_id=uuid.uuid4().hex)
            for i in items]


class AsyncClient:
    """A connection to the daemon shared by tasks (requests are pipelined); reconnects on need.

    Every call has a deadline: `connect_timeout_s` to connect (default 1 s, or
    SIDECAR_CLIENT_CONNECT_TIMEOUT_SECONDS) and `timeout_s` for its reply (default 10 s, or
    SIDECAR_CLIENT_TIMEOUT_SECONDS), plus the wait of a long-polling dequeue. Calls that change
    nothing, and enqueues (whose items the client names), are resent once after a lost connection.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
    ) -> None:
        self.path = socket_path(path)
        self.timeout_s = timeout_s or env_seconds(TIMEOUT_ENV, REQUEST_TIMEOUT_S)
        self.connect_timeout_s = connect_timeout_s or env_seconds(
            CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S
        )
        self._ids = itertools.count(1)
        self._conn: ClientConnection | None = None
        self._connecting: asyncio.Task[ClientConnection] | None = None

    async def connect(self, timeout_s: float | None = None) -> AsyncClient:
        """Open the connection, failing fast with SidecarUnavailable when nobody listens."""
        if timeout_s is not None:
            self.connect_timeout_s = timeout_s
        await self._connection()
        return self

    async def _connection(self) -> ClientConnection:
        """The live connection, or one attempt to open it shared by every call that waits."""
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        if self._connecting is None:
            task = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(self._connect_done)
            self._connecting = task
        # shield: one caller giving up must not cancel the attempt the others wait on.
        return await asyncio.shield(self._connecting)

    def _connect_done(self, task: asyncio.Task[ClientConnection]) -> None:
        if self._connecting is task:
            self._connecting = None
        observe(task)

    async def _open(self) -> ClientConnection:
        check_socket_folder(self.path)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise SidecarUnavailable(
                f"sidecar unavailable at {self.path}: {exc.__class__.__name__}: {exc}",
                {"path": self.path, "sent": False},
            ) from exc
        old, self._conn = self._conn, ClientConnection(reader, writer, self.timeout_s)
        if old is not None:
            old.close(lost("replaced by a new connection", "connection_lost"))
        return self._conn

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with SidecarUnavailable."""
        if self._connecting is not None:
            # Let a connect in flight finish (within connect_timeout_s), so that its connection
            # is closed here rather than left open behind a closed client.
            await asyncio.gather(asyncio.shield(self._connecting), return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(SidecarUnavailable("client closed", {"sent": True, "reason": "closed"}))
            await asyncio.gather(conn.reader_task, return_exceptions=True)

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
        """Enqueue a batch, all or none; build items with `sidecar.client.item`.

        Items without a queue_id get one here, so a resend after a lost connection finds the
        stored request instead of storing it twice.
        """
        res = await self._call(Enqueue(id=0, items=_named(items)), EnqueueResult)
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
        try:
            reply = await self._exchange(req, extra_timeout_s)
        except SidecarUnavailable as lost:
            # Only a connection that dropped under the call is worth one more try (a restart);
            # a timeout has used the deadline, and a failed connect says the daemon is away.
            if lost.details.get("reason") != "connection_lost" or not _retry_safe(req):
                raise
            log.info("call_resent", op=type(req).__name__.lower(), error=lost.message)
            try:
                reply = await self._exchange(req, extra_timeout_s)
            except SidecarUnavailable as again:
                if again.details.get("sent"):
                    raise
                raise lost from again  # the first attempt's outcome is still unknown
        raise_for(reply)
        return decode_result(reply, result_type)

    async def _exchange(self, req: Request, extra_timeout_s: float) -> Reply:
        conn = await self._connection()
        req.id = next(self._ids)
        fut = conn.send(req, extra_timeout_s)
        try:
            if conn.writer.transport.get_write_buffer_size() > _WRITE_HIGH_BYTES:
                # The daemon reads slower than we write: wait (the deadline timer aborts the
                # connection if it never reads, which ends this wait too).
                with contextlib.suppress(OSError):
                    await conn.writer.drain()
            return await fut
        finally:
            if fut.done() and not fut.cancelled():
                fut.exception()  # observed even when this caller was cancelled meanwhile


async def connect(path: str | None = None, timeout_s: float | None = None) -> AsyncClient:
    """Open an AsyncClient connection to the daemon."""
    return await AsyncClient(path, connect_timeout_s=timeout_s).connect()


class Client:
    """A blocking client (one request at a time per instance; thread-safe with a lock)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout_s: float | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.path = socket_path(path)
        self.connect_timeout_s = connect_timeout_s or env_seconds(
            CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S
        )
        self.timeout_s = timeout_s or env_seconds(TIMEOUT_ENV, REQUEST_TIMEOUT_S)
        self._sock: socket.socket | None = None
        self._frames = FrameReader(CLIENT_MAX_FRAME)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def connect(self) -> Client:
        """Open the connection, failing fast with SidecarUnavailable when nobody listens."""
        check_socket_folder(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise SidecarUnavailable(
                f"sidecar unavailable at {self.path}: {exc.__class__.__name__}: {exc}",
                {"path": self.path, "sent": False},
            ) from exc
        self._sock = sock
        self._frames = FrameReader(CLIENT_MAX_FRAME)
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
        return self._call(Enqueue(id=0, items=_named(items)), EnqueueResult).items

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
            # A connection kept from an earlier call may have been closed by a daemon restart:
            # a call that is safe to repeat gets one more try on a new connection.
            reused = self._sock is not None
            try:
                reply = self._exchange(req, extra_timeout_s)
            except SidecarUnavailable as err:
                if not (reused and err.details.get("reason") == "connection_lost"):
                    raise
                if not _retry_safe(req):
                    raise
                reply = self._exchange(req, extra_timeout_s)
        raise_for(reply)
        return decode_result(reply, result_type)

    def _exchange(self, req: Request, extra_timeout_s: float) -> Reply:
        if self._sock is not None and _closed_by_peer(self._sock):
            self.close()  # the daemon restarted while we idled: nothing was sent on this one
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        req.id = next(self._ids)
        try:
            self._sock.settimeout(self.timeout_s + extra_timeout_s)
            self._sock.sendall(encode_frame(req))
            return self._read_reply(req.id)
        except TimeoutError as exc:
            self.close()
            raise lost(f"no reply from the sidecar within {self.timeout_s}s", "timeout") from exc
        except OSError as exc:
            refused = self._refusal_sent()
            self.close()
            if refused is not None:
                raise refused from exc
            raise lost(f"connection to the sidecar failed: {exc}", "connection_lost") from exc

    def _refusal_sent(self) -> SidecarError | None:
        """The connection error the daemon sent before closing on us, if it can still be read.

        A refused connection (permission_denied, too_many_connections) is closed at once; a
        send can then fail before the reply that says why was read.
        """
        sock = self._sock
        if sock is None:
            return None
        frames = FrameReader(CLIENT_MAX_FRAME)
        sock.setblocking(False)
        try:
            while data := sock.recv(65536):
                for body in frames.feed(data):
                    reply = decode_reply(body)
                    if reply.id is None and ends_connection(reply):
                        assert reply.error is not None
                        return error_from_code(
                            reply.error.code, reply.error.message, reply.error.details
                        )
        except OSError:
            pass
        return None

    def _read_reply(self, request_id: int) -> Reply:
        assert self._sock is not None
        while True:
            data = self._sock.recv(65536)
            if not data:
                self.close()
                raise lost("the sidecar closed the connection", "connection_lost")
            for body in self._frames.feed(data):
                reply = decode_reply(body)
                if reply.id is None and ends_connection(reply):
                    self.close()
                    raise_for(reply)
                if reply.id in (request_id, None):  # one request at a time: nil is ours too

                    return reply


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle connection was closed by the daemon (EOF or reset waiting to be read)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False  # open, nothing to read: the usual case
    except OSError:
        return True
    finally:
        sock.setblocking(True)


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
    loop = asyncio.get_running_loop()
    async with AsyncClient(path) as poller, AsyncClient(path) as settler:
        hello = await poller.hello()
        lease = lease_s or hello.limits.default_lease_s
        keeper = _LeaseKeeper(settler, lease)
        keeping = loop.create_task(keeper.run())
        keeping.add_done_callback(observe)
        running: set[asyncio.Task[None]] = set()
        freed = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            freed.set()

        backoff = 0.05
        try:
            while not stop.is_set():
                free = min(concurrency - len(running), hello.limits.max_batch)
                if free <= 0:  # a free slot first: a job taken is always run at once
                    freed.clear()
                    await freed.wait()
                    continue
                try:
                    # As many as there are free slots, in one request.
                    jobs = await poller.dequeue(free, lease_s=lease, wait_s=wait_s)
                except SidecarError as exc:
                    # The daemon or its store is briefly away: back off, and keep the jobs
                    # that are running.
                    log.warning("dequeue_failed", code=exc.code, error=exc.message)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                for job in jobs:
                    task = loop.create_task(_run_job(settler, handler, job, keeper))
                    running.add(task)
                    task.add_done_callback(finished)
                    task.add_done_callback(observe)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)


async def _run_job(client: AsyncClient, handler: Handler, job: Job, keeper: _LeaseKeeper) -> None:
    keeper.add(job)
    try:
        try:
            await handler(job)
        except PermanentFailure as exc:
            await _settle(client.fail(job.queue_id, job.lease_id, f"{exc}", retry=False), job)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            await _settle(client.fail(job.queue_id, job.lease_id, why, retry=True), job)
        else:
            await _settle(client.complete(job.queue_id, job.lease_id), job)
    finally:
        keeper.remove(job)


async def _settle(call: Awaitable[RequestInfo], job: Job) -> None:
    """Report a job's outcome; a settle that fails is logged, never left to an unread task."""
    try:
        await call
    except SidecarError as exc:
        # The daemon restarted, or the lease lapsed: if the settle did not take effect the
        # lease lapses and the request is handed out again (delivery is at least once).
        log.warning("settle_failed", queue_id=job.queue_id, code=exc.code, error=exc.message)


class _LeaseKeeper:
    """One task for every running job: extends each lease a third of its length after the last.

    One timer for all of them instead of a task per job; the leases due at once are extended
    concurrently on the shared settling client.
    """

    def __init__(self, client: AsyncClient, lease_s: float) -> None:
        self._client = client
        self._period = lease_s / 3
        self._lease_s = lease_s
        self._due: dict[str, tuple[float, Job]] = {}  # by lease_id
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def add(self, job: Job) -> None:
        # Every job's first extension is due after the ones already held (same period), so
        # the timer needs waking only when it had nothing to keep.
        if not self._due:
            self._wake.set()
        self._due[job.lease_id] = (self._loop.time() + self._period, job)

    def remove(self, job: Job) -> None:
        self._due.pop(job.lease_id, None)

    async def run(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._loop.time()
            first = min(at for at, _ in self._due.values())
            if first > now:
                await asyncio.sleep(first - now)
                continue
            ready = [job for at, job in self._due.values() if at <= now]
            for job in ready:
                self._due[job.lease_id] = (now + self._period, job)
            await asyncio.gather(*(self._extend(job) for job in ready))

    async def _extend(self, job: Job) -> None:
        try:
            await self._client.extend(job.queue_id, job.lease_id, self._lease_s)
        except (BackendUnavailable, SidecarUnavailable):
            pass  # the store or the daemon is briefly away; the next round tries again
        except SidecarError as exc:
            if self._due.pop(job.lease_id, None) is not None:  # not settled meanwhile
                log.warning("lease_lost", queue_id=job.queue_id, code=exc.code, error=exc.message)
        except Exception:
            # Kept for the next round: one odd failure must not stop every job's extensions.
            log.exception("lease_extend_failed", queue_id=job.queue_id)
