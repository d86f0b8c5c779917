"""A real redis-server for tests: on a Unix socket in a short temporary folder, killable.

    with RedisServer(appendonly=True) as server:   # started, PING answered
        queue = await open_redis_queue(Settings(redis_url=server.url))
        server.pause()      # SIGSTOP: calls time out
        server.resume()     # SIGCONT
        server.kill()       # SIGKILL: connections refused
        server.restart()    # same socket, same folder (and so the same AOF/RDB files)

The `redis_server` fixture yields a fresh, started server per test; import the fixture
function into a test module
(`from tests.support.redis_server import redis_server_fixture`) to use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.config import Settings
from sidecar.queue.redis import RedisQueue, redis_client
from sidecar.queue.redis.keys import FUNCTION_NAMES, SCRIPT_SHAS
from tests.support.procs import default_signals

# How long a start or restart may take before the test fails (an AOF replay included).
READY_TIMEOUT_S = 10.0
# sun_path is 108 bytes on Linux; mkdtemp under /tmp with a short prefix keeps far below it.
_SOCKET_NAME = "redis.sock"


class RedisServerError(RuntimeError):
    """The server did not start or stop as asked; the message carries its log's tail."""


class RedisServer:
    """One redis-server process the test controls; its socket and folder survive restarts."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        appendonly: bool = False,
        maxmemory_policy: str = "noeviction",
        maxmemory: str | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._own_dir = directory is None
        self.dir = (
            Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
            if directory is None
            else Path(directory)
        )
        self.socket_path = str(self.dir / _SOCKET_NAME)
        if len(self.socket_path.encode()) > 100:
            raise ValueError(f"socket path too long for sun_path: {self.socket_path}")
        self.log_path = self.dir / "redis.log"
        self.password = password
        self._args = self._command(appendonly, maxmemory_policy, maxmemory, extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(
        self, appendonly: bool, policy: str, maxmemory: str | None, extra: tuple[str, ...]
    ) -> list[str]:
        args = ["redis-server", "--port", "0", "--unixsocket", self.socket_path]
        args += ["--unixsocketperm", "700", "--dir", str(self.dir), "--logfile", str(self.log_path)]
        args += ["--daemonize", "no", "--save", "", "--maxmemory-policy", policy]
        args += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
        if maxmemory is not None:
            args += ["--maxmemory", maxmemory]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args + list(extra)

    @property
    def url(self) -> str:
        """The unix:// URL redis-py and Settings.redis_url accept (password not included)."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, wait: bool = True) -> RedisServer:
        """Start the process and wait until it answers PING (bounded by READY_TIMEOUT_S).

        wait=False returns at once: a test that wants to meet the server still loading.
        """
        if self.running:
            raise RedisServerError("redis-server is already running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a killed server leaves its socket file behind
        self._proc = subprocess.Popen(
            self._args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=default_signals,  # noqa: PLW1509 (stop() sends SIGTERM; see procs.py)
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll PING until it answers PONG; fail with the log's tail at the deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RedisServerError(f"redis-server exited:\n{self.log_tail()}")
            if self._ping():
                return
            # A bounded poll between PING attempts, not a wait for something to happen.
            time.sleep(0.005)
        raise RedisServerError(f"redis-server not ready in {timeout_s}s:\n{self.log_tail()}")

    def _ping(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(self.socket_path)
                if self.password is not None:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
            except OSError:  # not listening yet (or LOADING answered first and closed)
                return False

    def stop(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """SIGTERM (a clean shutdown that flushes the AOF), SIGKILL if it does not exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)  # a paused server cannot exit
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout_s)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the process dies at once (what reached the page cache survives)."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(READY_TIMEOUT_S)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Stop (cleanly if it runs) and start again on the same socket and folder."""
        self.stop()
        return self.start()

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RedisServerError("redis-server is not running")
        os.kill(self._proc.pid, sig)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        """Stop the server and remove the folder if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


@pytest.fixture(name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """A fresh redis-server (noeviction, no persistence) for one test; free to kill or pause."""
    with RedisServer() as server:
        yield server


# The retention of the stores make_queue builds unless a test names another.
FACTORY_RETENTION_S = 600.0
QueueFactory = Callable[..., Awaitable[RedisQueue]]


@pytest.fixture(name="make_queue")
async def make_queue_fixture(
    redis_server: RedisServer, clock: Callable[[], float]
) -> AsyncIterator[QueueFactory]:
    """Started RedisQueues on the test's server (no background sweeper unless asked)."""
    made: list[RedisQueue] = []

    async def make(**options: Any) -> RedisQueue:
        options.setdefault("sweep_interval_s", None)
        options.setdefault("retention_s", FACTORY_RETENTION_S)
        queue = redis_queue_for(redis_server.url, clock, **options)
        await queue.start()
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close()


@pytest.fixture(name="raw")
async def raw_fixture(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client on the same server, to look at keys as an operator would."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def redis_queue_for(
    url: str,
    clock: Callable[[], float],
    *,
    retention_s: float,
    timeout_s: float = 1.0,
    **options: Any,
) -> RedisQueue:
    """A RedisQueue on `url` with the production client settings and `timeout_s` (not started)."""
    settings = Settings(redis_url=url, redis_connect_timeout_s=timeout_s, redis_timeout_s=timeout_s)
    client = redis_client(settings)
    return RedisQueue(client, retention_s=retention_s, clock=clock, **options)


def make_redis_contract_store(
    request: pytest.FixtureRequest,
    clock: Callable[[], float],
    retention_s: float,
    **options: Any,
) -> RedisQueue:
    """For the contract suite: a RedisQueue on its own fresh redis-server, stopped at teardown."""
    server = RedisServer().start()
    # Registered before the store fixture's own teardown, so it runs after the queue closed.
    request.addfinalizer(server.cleanup)
    return redis_queue_for(server.url, clock, retention_s=retention_s, **options)


def script_runs(commandstats: dict[str, Any]) -> int:
    """Script runs counted in INFO commandstats: FCALL, and EVALSHA (plain scripts)."""
    return sum(int(commandstats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in SCRIPT_COMMANDS)


SCRIPT_COMMANDS = ("fcall", "evalsha")


async def run_script(
    raw: Redis, queue: RedisQueue, name: str, keys: Sequence[str], *args: Any
) -> Any:
    """Call one of the queue's scripts directly, as its runner does: FCALL, or EVALSHA."""
    if queue.uses_functions:
        return await raw.fcall(FUNCTION_NAMES[name], len(keys), *keys, *args)
    return await raw.evalsha(SCRIPT_SHAS[name], len(keys), *keys, *args)


def make_fakeredis_contract_store(
    clock: Callable[[], float], retention_s: float, **options: Any
) -> RedisQueue:
    """For the contract suite: a RedisQueue on fakeredis (its Lua runs on lupa)."""
    import fakeredis

    client = fakeredis.FakeAsyncRedis()
    # fakeredis has no INFO command, so the eviction policy cannot be read there.
    return RedisQueue(
        client,
        retention_s=retention_s,
        clock=clock,
        check_eviction_policy=False,
        **options,
    )


__all__ = [
    "RedisServer",
    "RedisServerError",
    "make_fakeredis_contract_store",
    "make_redis_contract_store",
    "redis_queue_for",
    "redis_server_fixture",
    "run_script",
    "script_runs",
]
