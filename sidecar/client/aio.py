"""The asyncio client: one connection shared by tasks, requests pipelined, reconnects on need.

Every error reply raises the SidecarError subclass of its code. A daemon that is not running
raises SidecarUnavailable quickly (a service must never hang on the sidecar).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import structlog

from sidecar.client import calls as ops
from sidecar.client.calls import Call, describe
from sidecar.client.connection import (
    CONNECT_TIMEOUT_ENV,
    CONNECT_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    TIMEOUT_ENV,
    ClientConnection,
    decode_result,
    env_seconds,
    lost,
    observe,
    raise_for,
    socket_path,
)
from sidecar.client.fold import CompleteFold, EnqueueFold
from sidecar.errors import SidecarUnavailable
from sidecar.protocol import (
    Complete,
    CompleteItem,
    CompleteMany,
    CompleteManyResult,
    Enqueue,
    EnqueuedItem,
    EnqueueItem,
    Reply,
    Request,
    RequestInfo,
)
from sidecar.socket_dir import check_socket_folder

T = TypeVar("T")
log = structlog.get_logger("sidecar.client")

# Past this many unsent bytes in the transport, a call waits for the daemon to read.
_WRITE_HIGH_BYTES = 1 << 20


P = ParamSpec("P")


def _async(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """AsyncClient's method for an op: build the call once (sidecar.client.calls), send it."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._call(build(*args, **kwargs))

    describe(method, build, "AsyncClient")
    return method


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
        self._enqueues = EnqueueFold(self._enqueue_items)
        self._completes = CompleteFold(self._complete_items, self._complete_one)

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
            conn = await asyncio.wait_for(
                ClientConnection.open(self.path, self.timeout_s), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise SidecarUnavailable(
                f"sidecar unavailable at {self.path}: {exc.__class__.__name__}: {exc}",
                {"path": self.path, "sent": False},
            ) from exc
        old, self._conn = self._conn, conn
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
            await conn.closed
        await self._enqueues.close()
        await self._completes.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- ops: one line each, derived from the builders in calls.py ---------------------

    hello = _async(ops.hello)
    enqueue = _async(ops.enqueue)
    enqueue_many = _async(ops.enqueue_many)
    dequeue = _async(ops.dequeue)
    extend = _async(ops.extend)
    complete = _async(ops.complete)
    complete_next = _async(ops.complete_next)
    complete_many = _async(ops.complete_many)
    fail = _async(ops.fail)
    cancel = _async(ops.cancel)
    status = _async(ops.status)
    stats = _async(ops.stats)
    health = _async(ops.health)
    metrics = _async(ops.metrics)
    requeue = _async(ops.requeue)
    purge = _async(ops.purge)
    take = _async(ops.take)
    limit_acquire = _async(ops.limit_acquire)
    limit_settle = _async(ops.limit_settle)
    limit_pause = _async(ops.limit_pause)
    limit_report = _async(ops.limit_report)

    # -- plumbing ----------------------------------------------------------------------------

    async def _enqueue_items(self, items: list[EnqueueItem]) -> list[EnqueuedItem]:
        return await self._call(ops.enqueue_many(items))

    async def _complete_items(self, items: list[CompleteItem]) -> CompleteManyResult:
        return await self._call(Call(CompleteMany(id=0, items=items)))

    async def _complete_one(self, item: CompleteItem) -> RequestInfo:
        return await self._call(
            Call(Complete(id=0, queue_id=item.queue_id, lease_id=item.lease_id))
        )

    async def _call(self, call: Call[T]) -> T:
        req = call.request
        # Concurrent single enqueues (and completes) leave as one request, each caller with
        # its own result or error (fold.py); one with none of its kind out leaves now.
        if call.fold and isinstance(req, Enqueue):
            [one] = req.items
            if self._enqueues.takes(one):
                if not self._enqueues.idle:
                    return cast(T, await self._enqueues.call(one, len(one.payload)))
                with self._enqueues.out():
                    return await self._send(call)
        elif call.fold and self._completes.enabled:
            done = cast(Complete, req)
            if not self._completes.idle:
                item = CompleteItem(queue_id=done.queue_id, lease_id=done.lease_id)
                return cast(T, await self._completes.call(item))
            with self._completes.out():
                return await self._send(call)
        return await self._send(call)

    async def _send(self, call: Call[T]) -> T:
        """call's request on the connection (resent once where that is safe); its result."""
        req, extra_timeout_s = call.request, call.extra_timeout_s
        try:
            reply = await self._exchange(req, extra_timeout_s)
        except SidecarUnavailable as lost:
            # Only a connection that dropped under the call is worth one more try (a restart);
            # a timeout has used the deadline, and a failed connect says the daemon is away.
            if lost.details.get("reason") != "connection_lost" or not call.spec.retry_safe:
                raise
            log.info("call_resent", op=type(req).__name__.lower(), error=lost.message)
            try:
                reply = await self._exchange(req, extra_timeout_s)
            except SidecarUnavailable as again:
                if again.details.get("sent"):
                    raise
                raise lost from again  # the first attempt's outcome is still unknown
        raise_for(reply)
        return call.unwrap(decode_result(reply, call.spec.result))

    async def _exchange(self, req: Request, extra_timeout_s: float) -> Reply:
        conn = self._conn
        if conn is None or conn.error is not None:
            conn = await self._connection()
        req.id = next(self._ids)
        fut = conn.send(req, extra_timeout_s)
        try:
            if conn.write_buffer_size() > _WRITE_HIGH_BYTES:
                # The daemon reads slower than we write: wait (the deadline timer aborts the
                # connection if it never reads, which ends this wait too).
                await conn.drain()
            return await fut
        finally:
            if fut.done() and not fut.cancelled():
                fut.exception()  # observed even when this caller was cancelled meanwhile

    # Last in the class body: above, `list` in annotations is still the builtin.
    list = _async(ops.list_)


async def connect(path: str | None = None, timeout_s: float | None = None) -> AsyncClient:
    """Open an AsyncClient connection to the daemon."""
    return await AsyncClient(path, connect_timeout_s=timeout_s).connect()
