"""A redis-server the bench starts itself, on a Unix socket in the run's temporary folder.

A small equivalent of tests/support/redis_server.py (which imports pytest): start, stop,
and the faults the failover figures need (SIGKILL, SIGSTOP / SIGCONT, restart on the same
socket). The server runs without persistence (`--save ""`, no AOF): the bench measures the
queue, not the disk.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    """redis-server did not start or stop as asked; the message carries its log's tail."""


def redis_socket(folder: Path) -> str:
    """Where the bench's redis-server for the run in folder listens."""
    return str(folder / "redis.sock")


class RedisProcess:
    """One redis-server process; its socket path stays the same across restarts."""

    def __init__(self, socket_path: str, extra_args: list[str] | None = None) -> None:
        self.socket_path = socket_path
        folder = Path(socket_path).parent
        self.log_path = folder / "redis.log"
        self.argv = ["redis-server", "--port", "0", "--unixsocket", socket_path]
        self.argv += ["--unixsocketperm", "700", "--dir", str(folder), "--logfile"]
        self.argv += [str(self.log_path), "--daemonize", "no", "--save", "", "--appendonly", "no"]
        self.argv += ["--maxmemory-policy", "noeviction", *(extra_args or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> RedisProcess:
        """Start and wait (bounded) until PING answers PONG."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a killed server leaves its socket file behind
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RedisServerError(f"redis-server exited:\n{self.log_tail()}")
            if self._ping():
                return self
            time.sleep(0.005)  # a bounded poll between PING attempts
        raise RedisServerError(f"redis-server not ready in {READY_TIMEOUT_S}s:\n{self.log_tail()}")

    def _ping(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(self.socket_path)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
            except OSError:
                return False

    def stop(self) -> None:
        """SIGCONT (a paused server cannot exit), SIGTERM, then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: gone at once, with everything it held (no persistence)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RedisServerError("redis-server is not running")
        os.kill(self.proc.pid, sig)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def redis_running(socket_path: str) -> Iterator[RedisProcess]:
    """A started redis-server for the block, stopped on the way out (error or not)."""
    server = RedisProcess(socket_path)
    try:
        yield server.start()
    finally:
        server.stop()
