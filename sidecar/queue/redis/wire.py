"""A lean connection for the hot scripts: one asyncio Protocol, hiredis parsing, FIFO replies.

redis-py's pipeline spends most of the daemon's CPU per job (packing each argument in Python,
a pool checkout, a timeout task per call). This connection writes the commands a loop pass
gathered, encoded here, in one write, and matches replies first-in first-out with hiredis's
Reader. One timer per connection watches the oldest unanswered batch instead of one per call.
Errors are redis-py's classes, so io.py's classification is the same for both paths.

Only a plain server (TCP or Unix socket, no TLS) is reached this way; Sentinel and Cluster
clients keep redis-py (`wire_spec` answers None for them).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class WireSpec:
    """Where and how to connect: a Unix socket path or host and port, and the handshake."""

    path: str | None
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    client_name: str | None
    connect_timeout_s: float | None
    timeout_s: float | None


def wire_spec(client: Any) -> WireSpec | None:
    """How to reach the client's one server directly, or None where redis-py must stay.

    None for a cluster, a Sentinel-managed client, TLS, a credential provider and any client
    class but redis-py's own (fakeredis included).
    """
    if type(client) is not Redis:
        return None
    pool = client.connection_pool
    if type(pool) is not ConnectionPool:
        return None
    kw = pool.connection_kwargs
    if pool.connection_class not in (Connection, UnixDomainSocketConnection):
        return None
    if kw.get("credential_provider") is not None:
        return None
    return WireSpec(
        path=kw.get("path") if pool.connection_class is UnixDomainSocketConnection else None,
        host=str(kw.get("host", "localhost")),
        port=int(kw.get("port", 6379)),
        db=int(kw.get("db", 0) or 0),
        username=kw.get("username"),
        password=kw.get("password"),
        client_name=kw.get("client_name"),
        connect_timeout_s=kw.get("socket_connect_timeout"),
        timeout_s=kw.get("socket_timeout"),
    )


def encode_command(parts: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings (floats as repr, like redis-py).

    hiredis packs it in C, about twice as fast as the same loop in Python: a folded run of
    64 enqueues is some 450 arguments.
    """
    try:
        # hiredis's stub declares a tuple of one item; it takes any number.
        packed: bytes = hiredis.pack_command(tuple(parts))  # type: ignore[arg-type]
    except TypeError:
        bad = next(p for p in parts if type(p) not in (str, bytes, int, float))
        raise TypeError(
            f"a Redis argument must be str, bytes, int or float, not {bad!r}"
        ) from None
    return packed


def encode_bulks(parts: Sequence[Arg]) -> bytes:
    """The bulk strings of parts, without the array header (for a command built in pieces)."""
    packed = encode_command(parts)
    return packed[packed.index(b"\r\n") + 2 :]


class _ErrorReply(Exception):
    """hiredis's stand-in for an error reply; turned into redis-py's class by _error."""


def _error(reply: _ErrorReply) -> RedisError:
    # redis-py's own table (NOSCRIPT, OOM, READONLY, LOADING, MASTERDOWN, NOAUTH, ...).
    err: RedisError = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return err


@dataclass(slots=True)
class _Batch:
    """Commands written together: their replies, in order, resolve one future."""

    future: asyncio.Future[list[Any]]
    count: int
    deadline: float | None
    replies: list[Any] = field(default_factory=list)


class _WireProtocol(asyncio.Protocol):
    """One connection's transport, parser and the FIFO of batches waiting for replies."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self._reader = hiredis.Reader(replyError=_ErrorReply)
        self._waiting: collections.deque[_Batch] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True

    @property
    def usable(self) -> bool:
        """Open for writes. The transport closes (Redis went away) a loop pass before
        connection_lost reaches this protocol; a write in between would raise RuntimeError."""
        return self.alive and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes, count: int, timeout_s: float | None) -> asyncio.Future[list[Any]]:
        """Write count commands (already encoded); the future gets their replies in order."""
        assert self.transport is not None
        if not self.usable:
            self._fail(RedisConnectionError("connection to redis lost"))
            raise RedisConnectionError("connection to redis lost")
        deadline = None if timeout_s is None else self.loop.time() + timeout_s
        batch = _Batch(self.loop.create_future(), count, deadline)
        self._waiting.append(batch)
        self.transport.write(data)
        if self._timer is None and deadline is not None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)
        return batch.future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:
                self._fail(RedisConnectionError("redis sent a malformed reply"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream cannot be trusted
                self._fail(RedisConnectionError("redis sent an unexpected reply"))
                return
            batch = waiting[0]
            # Only a top-level error is converted: the commands sent here (EVALSHA, WAIT and
            # the handshake) never answer an array holding errors, so no reply is walked.
            batch.replies.append(_error(reply) if isinstance(reply, _ErrorReply) else reply)
            if len(batch.replies) == batch.count:
                waiting.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("connection to redis lost"))

    def close(self) -> None:
        """Fail what waits and drop the connection."""
        self._fail(RedisConnectionError("connection to redis closed"))

    def _check_deadline(self) -> None:
        # One timer per connection, set for the oldest batch: a reply to it re-arms nothing;
        # the timer, when it fires, moves on to whichever batch is oldest by then.
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0].deadline
        if deadline is not None and deadline <= self.loop.time():
            # The unanswered writes may still run: the caller must not resend (io.py).
            self._fail(RedisTimeoutError("timeout reading from redis"))
            return
        when = deadline if deadline is not None else self.loop.time() + 1.0
        self._timer = self.loop.call_at(when, self._check_deadline)

    def _fail(self, exc: RedisError) -> None:
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, collections.deque()
        for batch in waiting:
            if not batch.future.done():
                batch.future.set_exception(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class WireClient:
    """One lazily (re)connected lean connection shared by every call of one daemon."""

    def __init__(self, spec: WireSpec) -> None:
        self.spec = spec
        self.connects = 0
        self.connect_attempts = 0
        self._proto: _WireProtocol | None = None
        self._connecting: asyncio.Task[_WireProtocol] | None = None

    def send(self, commands: Sequence[bytes]) -> asyncio.Future[list[Any]] | None:
        """Write encoded commands now, in one write, on the open connection: the future of
        their replies (errors as instances), in order; None when none is open."""
        proto = self._proto
        if proto is None or not proto.usable:
            return None
        return proto.send(b"".join(commands), len(commands), self.spec.timeout_s)

    async def execute(self, commands: Sequence[bytes]) -> list[Any]:
        """send(), connecting first when no connection is open."""
        sent = self.send(commands)
        if sent is None:
            await self._connected()
            sent = self.send(commands)
            if sent is None:  # lost again while the connect's outcome reached this call
                raise RedisConnectionError("connection to redis lost")
        return await sent

    async def close(self) -> None:
        """Drop the connection; calls waiting on it fail with a connection error."""
        self.drop()

    def drop(self) -> None:
        """close(), from a callback: the next call connects afresh."""
        if self._connecting is not None:
            self._connecting.cancel()
        if self._proto is not None:
            self._proto.close()
            self._proto = None

    async def _connected(self) -> _WireProtocol:
        # One attempt for every call that found the connection gone, its outcome shared: a
        # lock would let each waiter try again in turn, each waiting out the connect timeout.
        task = self._connecting
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect())
            task.add_done_callback(self._connect_done)
            self._connecting = task
        return await asyncio.shield(task)

    def _connect_done(self, task: asyncio.Task[_WireProtocol]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # observed even when every waiter was cancelled

    async def _connect(self) -> _WireProtocol:
        loop = asyncio.get_running_loop()
        spec = self.spec
        self.connect_attempts += 1

        def factory() -> _WireProtocol:
            return _WireProtocol(loop)

        try:
            async with asyncio.timeout(spec.connect_timeout_s):
                if spec.path is not None:
                    _, proto = await loop.create_unix_connection(factory, spec.path)
                else:
                    _, proto = await loop.create_connection(factory, spec.host, spec.port)
        except TimeoutError as exc:
            raise RedisTimeoutError("timeout connecting to redis") from exc
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to redis: {exc.strerror}") from exc
        self.connects += 1
        await self._handshake(proto)
        self._proto = proto
        return proto

    async def _handshake(self, proto: _WireProtocol) -> None:
        spec = self.spec
        commands: list[bytes] = []
        if spec.password is not None:
            auth: list[Arg] = ["AUTH", spec.password]
            if spec.username:
                auth.insert(1, spec.username)
            commands.append(encode_command(auth))
        if spec.db:
            commands.append(encode_command(["SELECT", spec.db]))
        if spec.client_name:
            commands.append(encode_command(["CLIENT", "SETNAME", spec.client_name]))
        if not commands:
            return
        replies = await proto.send(b"".join(commands), len(commands), spec.timeout_s)
        for reply in replies:
            if isinstance(reply, RedisError):
                proto.close()
                raise reply
