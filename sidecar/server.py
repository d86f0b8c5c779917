"""The Unix-socket server: one asyncio.Protocol per connection, limits, ordered replies.

Decoding happens in data_received (it never awaits); each connection has one task that answers
its requests in order, so a pipelining client gets its replies in request order, and all the
replies ready at once leave in one write. Only broken framing closes a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import stat
from collections import deque
from pathlib import Path
from typing import cast

import structlog

from sidecar.errors import (
    BadFrame,
    InternalError,
    ShuttingDown,
    SidecarError,
    TooManyConnections,
)
from sidecar.handlers import Ops
from sidecar.protocol import (
    AnyRequest,
    Dequeue,
    FrameReader,
    OkReply,
    append_frame,
    decode_request,
    encode_frame,
    error_reply,
    request_id_of,
)

log = structlog.get_logger("sidecar.server")

# How long a draining connection waits for its client to close after the daemon's end of
# stream: a client that reads it closes at once; an idle one must not hold the drain long.
LINGER_S = 1.0
# Loop passes between closing the listener and ending the connections (SidecarServer.drain).
DRAIN_SETTLE_PASSES = 2
# Stop reading a connection whose unanswered requests pile up past this, resume at a quarter:
# a client that sends faster than it reads cannot grow the daemon's memory without bound.
INBOX_HIGH = 1024
INBOX_LOW = 256
SOCKET_MODE = 0o660


class StartupError(Exception):
    """The server cannot start (socket path held by a live daemon, or unusable)."""


class _Fatal:
    """Queued after the requests that preceded a framing error: reply with it, then close."""

    __slots__ = ("error",)

    def __init__(self, error: SidecarError) -> None:
        self.error = error


_conn_ids = itertools.count(1)


class Connection(asyncio.Protocol):
    """One client connection: frames in, replies out in request order."""

    def __init__(self, server: SidecarServer) -> None:
        self.server = server
        self.conn_id = next(_conn_ids)
        self.reader = FrameReader(server.ops.settings.max_frame_bytes)
        self.inbox: deque[AnyRequest | SidecarError | _Fatal] = deque()
        self.out = bytearray()
        self.wakeup = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.eof = False
        self.reading_paused = False
        self.log = log.bind(conn_id=self.conn_id)

    # -- asyncio.Protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        limit = server.ops.settings.max_connections
        if len(server.connections) >= limit or server.draining:
            err: SidecarError = (
                ShuttingDown("the daemon is shutting down")
                if server.draining
                else TooManyConnections(f"the daemon is at its limit of {limit} connections")
            )
            transport.write(encode_frame(error_reply(None, err)))
            transport.close()
            self.log.warning("connection_refused", reason=err.message)
            return
        server.connections.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())
        self.log.debug("connection_opened")

    def data_received(self, data: bytes) -> None:
        if self.reader.error is not None or self.eof:
            return
        for body in self.reader.feed(data):
            try:
                self.inbox.append(decode_request(body))
            except SidecarError as err:
                self.inbox.append(err)
        if self.reader.error is not None:
            self._fail(self.reader.error)
        elif len(self.inbox) >= INBOX_HIGH and not self.reading_paused:
            self._pause_reading()
        self.wakeup.set()

    def eof_received(self) -> bool:
        self.eof = True
        if self.reader.partial and self.reader.error is None:
            self._fail(
                BadFrame(
                    f"connection closed inside a frame ({self.reader.partial} bytes of it read)",
                    {"partial_bytes": self.reader.partial},
                )
            )
        self.wakeup.set()
        return True  # keep the write side open until the replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.writable.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.log.debug("connection_closed")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- the answering task ------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.transport is not None
        transport = self.transport
        try:
            while True:
                if not self.inbox:
                    if self.eof:
                        break
                    if self.server.draining:
                        await self._linger()  # everything read is answered: end cleanly
                        break
                    self._flush()
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                item = self.inbox.popleft()
                if isinstance(item, _Fatal):
                    append_frame(self.out, error_reply(None, item.error))
                    break
                if isinstance(item, Dequeue) and item.wait_s > 0:
                    self._flush()  # replies already made must not wait behind a long poll
                append_frame(self.out, await self._answer(item))
                if self.reading_paused and len(self.inbox) <= INBOX_LOW:
                    self.reading_paused = False
                    transport.resume_reading()
                if not self.writable.is_set():
                    self._flush()
                    await self.writable.wait()
            self._flush()
        finally:
            transport.close()

    async def _answer(self, item: AnyRequest | SidecarError) -> object:
        if isinstance(item, SidecarError):
            return error_reply(request_id_of(item), item)
        try:
            return OkReply(id=item.id, result=await self.server.ops.handle(item))
        except SidecarError as err:
            return error_reply(item.id, err)
        except Exception:
            self.log.exception("op_failed", op=type(item).__name__.lower())
            return error_reply(item.id, InternalError("internal error; see the daemon's log"))

    def _flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.out)
            self.out = bytearray()  # the transport may keep the old buffer; never reuse it

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
        transport.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while not self.eof:
                    self.wakeup.clear()
                    await self.wakeup.wait()

    def _fail(self, err: SidecarError) -> None:
        """A framing error: answer what came before it, then the error, then close."""
        self.inbox.append(_Fatal(err))
        self.log.info("bad_frame", code=err.code, reason=err.message)
        if self.transport is not None and not self.reading_paused:
            self._pause_reading()

    def _pause_reading(self) -> None:
        assert self.transport is not None
        self.reading_paused = True
        with contextlib.suppress(RuntimeError):  # already closing
            self.transport.pause_reading()


class SidecarServer:
    """Owns the listening socket and every live connection."""

    def __init__(self, ops: Ops) -> None:
        self.ops = ops
        self.connections: set[Connection] = set()
        # Served a socket inherited from systemd (sidecar.socket): it is never unlinked.
        self.inherited = False
        self.draining = False
        self._server: asyncio.Server | None = None

    @property
    def path(self) -> str:
        return self.ops.settings.socket_path

    async def start(self) -> None:
        """Bind the socket (mode 0660), replacing a stale file but never a live daemon's."""
        prepare_socket_path(self.path)
        loop = asyncio.get_running_loop()
        # umask closes the window between bind and chmod in which the file has looser modes.
        old = os.umask(0o117)
        try:
            self._server = await loop.create_unix_server(
                lambda: Connection(self), self.path, backlog=1024
            )
        finally:
            os.umask(old)
        os.chmod(self.path, SOCKET_MODE)

    async def start_inherited(self, sock: socket.socket) -> None:
        """Serve a listening socket passed by systemd (socket activation) instead of binding.

        systemd owns the path, its mode and the backlog; connections made while no daemon runs
        wait in that backlog for the next one, so the path is left in place on exit.
        """
        self.inherited = True
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: Connection(self), sock=sock, backlog=1024
        )

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let connections answer what they have, then close what is left."""
        self.draining = True
        self.ops.stopping.set()
        if self._server is not None:
            self._server.close()
        # Loop passes before the connections end: requests already in the kernel's buffers are
        # read and answered, not left unanswered.
        for _ in range(DRAIN_SETTLE_PASSES):
            await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.wakeup.set()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if not self.inherited:  # an inherited socket stays for the next daemon
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def prepare_socket_path(path: str) -> None:
    """Make the parent folder; remove a stale socket file; refuse a path held by a live daemon."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = p.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # nobody listens: a stale file left by a daemon that died
            return
        raise StartupError(f"cannot check {path}: {exc}") from exc
    finally:
        probe.close()
    raise StartupError(f"another sidecar is already serving on {path}")
