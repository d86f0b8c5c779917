"""A minimal pipelining client of the sidecar protocol, cheaper per request than AsyncClient.

The load generator has one core on a two-core machine. Through AsyncClient, that core is the
bottleneck long before the daemon is (see README.md), so with many requests in flight the
daemon and the echo both show the client's speed and their ratio says little about the daemon.
This client does the least a correct client can: frames written by tasks in one loop pass leave
in one write, replies are matched by id, and a result is read only as far as the bench needs
(a job's ids, to complete it).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import cast

import msgspec

from bench.payload import llm_request
from bench.sessions import PREFILL_BATCH, EmptyQueue, Session, SessionFactory
from sidecar.errors import SidecarUnavailable, error_from_code
from sidecar.protocol import (
    Complete,
    Dequeue,
    Enqueue,
    EnqueueItem,
    FrameReader,
    Reply,
    Request,
    append_frame,
)

_MAX_FRAME = 64 * 1024 * 1024
_reply = msgspec.msgpack.Decoder(Reply)


class _JobIds(msgspec.Struct):
    queue_id: str
    lease_id: str


class _Leased(msgspec.Struct):
    items: list[_JobIds]


_leased = msgspec.msgpack.Decoder(_Leased)


class LeanConnection(asyncio.Protocol):
    """One connection: requests out in batches per loop pass, replies matched by id."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.frames = FrameReader(_MAX_FRAME)
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.out = bytearray()
        self.ids = itertools.count(1)
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for body in self.frames.feed(data):
            reply = _reply.decode(body)
            fut = self.pending.pop(reply.id, None) if reply.id is not None else None
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = SidecarUnavailable(f"connection lost: {exc}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(self.lost)
        self.pending.clear()

    def call(self, req: Request) -> asyncio.Future[Reply]:
        """Send req with the next flush; the future gets its reply."""
        if self.lost is not None:
            raise self.lost
        req.id = next(self.ids)
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        append_frame(self.out, req)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending[req.id] = fut
        return fut

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.out)
        self.out = bytearray()


def _check(reply: Reply) -> Reply:
    if not reply.ok:
        err = reply.error
        raise error_from_code(err.code if err else "internal", err.message if err else "")
    return reply


class LeanSession:
    """The bench's unit operations over a LeanConnection."""

    def __init__(self, conn: LeanConnection) -> None:
        self.conn = conn
        self.payload = msgspec.Raw(msgspec.msgpack.encode(llm_request()))

    @classmethod
    def factory(cls, socket_path: str) -> SessionFactory:
        async def connect() -> Session:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_unix_connection(LeanConnection, socket_path)
            return cls(conn)

        return connect

    async def enqueue(self) -> None:
        _check(await self.conn.call(Enqueue(id=0, items=[EnqueueItem(payload=self.payload)])))

    async def dequeue_complete(self) -> None:
        reply = _check(await self.conn.call(Dequeue(id=0)))
        jobs = _leased.decode(reply.result).items
        if not jobs:
            raise EmptyQueue("dequeue found no request")
        job = jobs[0]
        _check(await self.conn.call(Complete(id=0, queue_id=job.queue_id, lease_id=job.lease_id)))

    async def prefill(self, count: int) -> None:
        while count > 0:
            n = min(count, PREFILL_BATCH)
            items = [EnqueueItem(payload=self.payload) for _ in range(n)]
            _check(await self.conn.call(Enqueue(id=0, items=items)))
            count -= n

    async def close(self) -> None:
        if self.conn.transport is not None:
            self.conn.transport.close()
