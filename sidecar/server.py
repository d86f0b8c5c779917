"""The Unix-socket server: the listening socket, admission, limits across connections, drain.

Each connection is a sidecar.connection.Connection (frames in, replies out in request order).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import struct
from pathlib import Path

import structlog

from sidecar.config import Settings
from sidecar.connection import Connection
from sidecar.errors import (
    PermissionDenied,
    ShuttingDown,
    SidecarError,
    TooManyConnections,
)
from sidecar.handlers import Ops
from sidecar.observe import ConnectionCount, NullObserver, Observer
from sidecar.socket_dir import prepare_folder

log = structlog.get_logger("sidecar.server")

# Loop passes between closing the listener and ending the connections (SidecarServer.drain).
DRAIN_SETTLE_PASSES = 2
SOCKET_MODE = 0o660
# Timeouts are checked by one sweep over the connections, at this fraction of the shortest.
_SWEEP_FRACTION = 0.25
_SWEEP_MIN_S = 0.05
_SWEEP_MAX_S = 1.0


class StartupError(Exception):
    """The server cannot start (socket path held by a live daemon, or unusable)."""


class UnsafeSocketFolder(StartupError):
    """The socket's folder belongs to another user or others can write it."""


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SidecarServer:
    """Owns the listening socket and every live connection."""

    def __init__(
        self,
        settings: Settings,
        ops: Ops,
        *,
        stopping: asyncio.Event,
        count: ConnectionCount,
        observer: Observer | None = None,
        eager_ops: bool = False,
    ) -> None:
        """stopping (set by drain), count and observer are shared with the ops by app.py.

        eager_ops: the ops never enter asyncio.timeout (the local store alone), so each starts
        inside the read that brought it and needs a task only if it suspends.
        """
        self.settings = settings
        self.ops = ops
        self.eager_ops = eager_ops
        self.stopping = stopping
        self.count = count
        self.observer: Observer = observer or NullObserver()
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        # Served a socket inherited from systemd (sidecar.socket): it is never unlinked.
        self.inherited = False
        self.draining = False
        self._server: asyncio.Server | None = None
        # Bytes of partial frames and unanswered requests across every connection.
        self.buffered = 0
        self.max_buffered = settings.max_buffered_bytes
        self.buffer_low = self.max_buffered * 3 // 4
        # One connection's unanswered requests: a frame's worth (besides its partial frame).
        self.max_inbox_bytes = settings.max_frame_bytes
        self.budget_paused: set[Connection] = set()
        self._budget_full_logged = False
        self.frame_timeout_s = settings.frame_timeout_s
        self.idle_timeout_s = settings.idle_timeout_s
        self._allowed_uids = frozenset(settings.allowed_uids)
        self._allowed_gids = frozenset(settings.allowed_gids)
        timeouts = [settings.frame_timeout_s] + [settings.idle_timeout_s] * (
            settings.idle_timeout_s > 0
        )
        self._sweep_s = min(max(min(timeouts) * _SWEEP_FRACTION, _SWEEP_MIN_S), _SWEEP_MAX_S)
        self._sweep: asyncio.TimerHandle | None = None

    def refusal(self, transport: asyncio.Transport) -> SidecarError | None:
        """Why a new connection is refused (peer not allowed, at the limit, draining), or None."""
        limit = self.settings.max_connections
        err: SidecarError | None = None
        peer: tuple[int, int] | None = None
        if self._allowed_uids or self._allowed_gids:
            peer = _peer_ids(transport)
            if peer is None or not (
                peer[0] in self._allowed_uids or peer[1] in self._allowed_gids
            ):
                err = PermissionDenied(
                    "this user may not use the daemon (not in SIDECAR_ALLOWED_UIDS or "
                    "SIDECAR_ALLOWED_GIDS)"
                )
        if err is None and self.draining:
            err = ShuttingDown("the daemon is shutting down")
        elif err is None and len(self.connections) >= limit:
            err = TooManyConnections(f"the daemon is at its limit of {limit} connections")
        if err is not None:
            uid, gid = peer if peer is not None else (None, None)
            log.warning(
                "connection_refused", code=err.code, reason=err.message, peer_uid=uid, peer_gid=gid
            )
        return err

    def arm_sweep(self) -> None:
        """Check stalled frames and idle connections every so often while any is open."""
        if self._sweep is None and not self.draining:
            self._sweep = self.loop.call_later(self._sweep_s, self._run_sweep)

    def _run_sweep(self) -> None:
        self._sweep = None
        now = self.loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        if self.connections:
            self.arm_sweep()

    def resume_waiting(self) -> None:
        """Bytes were freed: resume the connections paused for the budget once it has room."""
        if self.buffered > self.buffer_low:
            return
        self._budget_full_logged = False
        for conn in list(self.budget_paused):
            conn._update_reading()

    def log_budget_full(self) -> None:
        if not self._budget_full_logged:  # once per episode, not once per paused connection
            self._budget_full_logged = True
            log.warning(
                "buffer_budget_full",
                buffered_bytes=self.buffered,
                max_buffered_bytes=self.max_buffered,
                connections=len(self.connections),
            )

    @property
    def path(self) -> str:
        return self.settings.socket_path

    async def start(self) -> None:
        """Bind the socket (mode 0660), replacing a stale file but never a live daemon's."""
        prepare_socket_path(self.path, self.settings.socket_group)
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
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.stopping.set()
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


def _peer_ids(transport: asyncio.Transport) -> tuple[int, int] | None:
    """The connecting process's uid and gid (SO_PEERCRED), or None when unreadable."""
    sock = transport.get_extra_info("socket")
    try:
        _, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except (AttributeError, OSError):
        return None
    return uid, gid


def prepare_socket_path(path: str, group: int | None = None) -> None:
    """Make a safe folder; remove a stale socket file; refuse a path held by a live daemon."""
    p = Path(path)
    problem = prepare_folder(path, group)
    if problem is not None:
        raise UnsafeSocketFolder(problem)
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
