"""What the listener and every connection share: limits, the byte budget, admission, observer.

A connection receives the ServerState, never the listener: everything it may read or change
across connections is here, and nothing else is reachable from it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

import structlog

from sidecar.config import Settings
from sidecar.errors import PermissionDenied, ShuttingDown, SidecarError, TooManyConnections
from sidecar.observe import ConnectionCount, NullObserver, Observer
from sidecar.server.ops import Ops

log = structlog.get_logger("sidecar.server")

# Timeouts are checked by one sweep over the connections, at this fraction of the shortest.
_SWEEP_FRACTION = 0.25
_SWEEP_MIN_S = 0.05
_SWEEP_MAX_S = 1.0

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class LiveConnection(Protocol):
    """What the shared state asks of a connection (sidecar.server.connection.Connection)."""

    task: asyncio.Task[None] | None
    wakeup: asyncio.Event

    def check_timeouts(self, now: float) -> None: ...

    def update_reading(self) -> None: ...

    def abort(self) -> None: ...

    @property
    def unanswered(self) -> int: ...


class ServerState:
    """The state shared by the listener and its connections."""

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
        self.connections: set[LiveConnection] = set()
        self.draining = False
        # Bytes of partial frames and unanswered requests across every connection.
        self.buffered = 0
        self.max_buffered = settings.max_buffered_bytes
        self.buffer_low = self.max_buffered * 3 // 4
        # One connection's unanswered requests: a frame's worth (besides its partial frame).
        self.max_inbox_bytes = settings.max_frame_bytes
        self.budget_paused: set[LiveConnection] = set()
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
            if peer is None or not (peer[0] in self._allowed_uids or peer[1] in self._allowed_gids):
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

    def stop_sweep(self) -> None:
        """Draining: no more timeout checks (the drain ends every connection itself)."""
        self.draining = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

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
            conn.update_reading()

    def unanswered(self) -> int:
        """Requests read and not yet answered, across every connection."""
        return sum(conn.unanswered for conn in self.connections)

    def log_budget_full(self) -> None:
        """Log that the byte budget is full, once per episode rather than once per connection."""
        if not self._budget_full_logged:
            self._budget_full_logged = True
            log.warning(
                "buffer_budget_full",
                buffered_bytes=self.buffered,
                max_buffered_bytes=self.max_buffered,
                connections=len(self.connections),
            )


def peer_uid(transport: asyncio.Transport) -> int | None:
    """The connecting process's uid (SO_PEERCRED), or None when unreadable."""
    ids = _peer_ids(transport)
    return None if ids is None else ids[0]


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
