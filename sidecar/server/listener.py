"""The listener: binds the Unix socket (or serves systemd's), accepts, drains on stop.

Each connection is a sidecar.server.connection.Connection sharing one ServerState.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import structlog

from sidecar.errors import StartupError, UnsafeSocketFolder
from sidecar.server.connection import Connection
from sidecar.server.state import ServerState
from sidecar.socket_dir import prepare_folder

log = structlog.get_logger("sidecar.server")

# Loop passes between closing the listener and ending the connections (SidecarServer.drain).
DRAIN_SETTLE_PASSES = 2
SOCKET_MODE = 0o660


class SidecarServer:
    """Owns the listening socket; the connections share its ServerState, never the server."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        # Served a socket inherited from systemd (sidecar.socket): it is never unlinked.
        self.inherited = False
        self._server: asyncio.Server | None = None

    def _connection(self) -> Connection:
        return Connection(self.state)

    @property
    def path(self) -> str:
        return self.state.settings.socket_path

    async def start(self) -> None:
        """Bind the socket (mode 0660), replacing a stale file but never a live daemon's."""
        prepare_socket_path(self.path, self.state.settings.socket_group)
        loop = asyncio.get_running_loop()
        # umask closes the window between bind and chmod in which the file has looser modes.
        old = os.umask(0o117)
        try:
            self._server = await loop.create_unix_server(self._connection, self.path, backlog=1024)
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
        self._server = await loop.create_unix_server(self._connection, sock=sock, backlog=1024)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let connections answer what they have, then close what is left."""
        state = self.state
        state.stop_sweep()
        state.stopping.set()
        if self._server is not None:
            self._server.close()
        # Loop passes before the connections end: requests already in the kernel's buffers are
        # read and answered, not left unanswered.
        for _ in range(DRAIN_SETTLE_PASSES):
            await asyncio.sleep(0)
        for conn in list(state.connections):
            conn.wakeup.set()
        tasks = [c.task for c in state.connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in list(state.connections):
            conn.abort()
        if not self.inherited:  # an inherited socket stays for the next daemon
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


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
