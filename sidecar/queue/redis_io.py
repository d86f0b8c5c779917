"""Redis I/O behind one seam: client construction, error classification, script calls.

Concurrent calls share round trips: each call adds its EVALSHA to a batch, and one task per
event-loop iteration sends the whole batch in one pipeline (ScriptRunner).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.config import ConfigError, Settings
from sidecar.errors import BackendUnavailable
from sidecar.queue.redis_keys import SCRIPT_SHAS, SCRIPTS

Arg = str | bytes | int | float

# Error replies that mean "this Redis cannot take the call now", by redis-py class, in the order
# they are tested (subclasses first); BUSY (a script running too long) has no class of its own.
_UNAVAILABLE: tuple[tuple[type[RedisError], str], ...] = (
    (RedisTimeoutError, "timeout"),
    (BusyLoadingError, "loading"),
    (AuthenticationError, "authentication"),
    (RedisConnectionError, "connection"),
    (ReadOnlyError, "read_only"),
    (OutOfMemoryError, "out_of_memory"),
    (MasterDownError, "master_down"),
    (ClusterDownError, "cluster_down"),
    (TryAgainError, "try_again"),
)
# MISCONF: a failed RDB save stops writes; NOREPLICAS: min-replicas-to-write is not met.
_UNAVAILABLE_REPLIES = {
    "MASTERDOWN": "master_down",
    "BUSY": "busy",
    "MISCONF": "misconf",
    "NOREPLICAS": "no_replicas",
}


def unavailable_kind(exc: BaseException) -> str | None:
    """A short name for a Redis error that means "cannot take this now", else None."""
    for cls, kind in _UNAVAILABLE:
        if isinstance(exc, cls):
            return kind
    if isinstance(exc, ResponseError):
        return _UNAVAILABLE_REPLIES.get(str(exc).split(" ", 1)[0])
    return None


def translate_error(exc: BaseException) -> BaseException:
    """BackendUnavailable (cause chained) for an unavailability error; other errors unchanged."""
    kind = unavailable_kind(exc)
    if kind is None:
        return exc
    # The message names the kind only: redis-py's text may carry a host name, never needed here.
    err = BackendUnavailable(f"redis unavailable ({kind})", {"kind": kind})
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Raise BackendUnavailable for Redis errors that mean "cannot take this now"."""
    try:
        yield
    except RedisError as exc:
        raise translate_error(exc) from exc


def as_text(value: bytes | str) -> str:
    """A reply value as str (the client runs with decode_responses=False)."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class _Call:
    script: str
    keys: tuple[str, ...]
    args: tuple[Arg, ...]
    future: asyncio.Future[Any]


class ScriptRunner:
    """Runs the scripts of lua/: loads them, folds concurrent calls into shared pipelines."""

    def __init__(self, client: Redis, log: Any) -> None:
        self.client = client
        # Counters for tests and metrics: pipelines sent, and SCRIPT LOAD rounds.
        self.flushes = 0
        self.script_loads = 0
        self.closed = False
        self._log = log
        self._batch: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script; their SHAs are known in advance (redis_keys.SCRIPT_SHAS)."""
        for name, source in SCRIPTS.items():
            sha = await self.client.script_load(source)
            if sha != SCRIPT_SHAS[name]:  # pragma: no cover - would mean Redis hashes differently
                raise RuntimeError(f"script {name}: Redis named it {sha}")
        self.script_loads += 1

    async def close(self) -> None:
        """Refuse new calls, let in-flight pipelines finish, close the connections."""
        self.closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()

    async def call(self, script: str, keys: tuple[str, ...], args: tuple[Arg, ...]) -> list[Any]:
        """Run one script in the next shared pipeline and return its reply."""
        if self.closed:
            raise BackendUnavailable("redis queue is closed", {"kind": "closed"})
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._batch.append(call)
        if len(self._batch) == 1:
            # The first call of this loop iteration schedules the flush; every call made
            # before the flush task runs joins the same pipeline.
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        result: list[Any] = await call.future
        return result

    async def _flush(self) -> None:
        """Send every pending call in one pipeline and resolve each future in order."""
        batch, self._batch = self._batch, []
        self.flushes += 1
        try:
            replies = await self._pipeline(batch)
        except asyncio.CancelledError:
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # every waiter must hear of the failure
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(translate_error(exc))
            return
        for call, reply in zip(batch, replies, strict=True):
            if call.future.done():
                continue  # its caller was cancelled
            if isinstance(reply, Exception):
                call.future.set_exception(translate_error(reply))
            else:
                call.future.set_result(reply)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        replies = await self._send(batch)
        # NOSCRIPT means that call never ran (Redis restarted or SCRIPT FLUSH): load, resend.
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            self._log.info("redis_scripts_reloaded")
            await self.load_scripts()
            again = await self._send([batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, batch: list[_Call]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.evalsha(SCRIPT_SHAS[call.script], len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


# -- building a client from Settings ------------------------------------------------------------


def redis_client(settings: Settings) -> Redis:
    """A redis.asyncio client for settings.redis_url with timeouts that suit a queue."""
    if settings.redis_url is None:
        raise ConfigError("REDIS_URL is not set")
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
        # One immediate retry, on a fresh connection, for a connection error only: a pooled
        # connection that died with a restarted Redis fails on first use. Never on a timeout:
        # the timed-out write may still run, and the failover manager, not the client
        # library, decides what happens when Redis is slow or away. The retry resends a whole
        # pipeline, so every script is written to be safe to run twice (see lua/common.lua).
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "client_name": f"sidecar-{socket.gethostname()}-{os.getpid()}",
        "decode_responses": False,
    }
    if settings.redis_password_file:
        options["password"] = _read_password(settings.redis_password_file)
    return Redis.from_url(settings.redis_url, **options)


def _read_password(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        # The path is safe to show; the content never is.
        raise ConfigError(f"REDIS_PASSWORD_FILE={path!r} cannot be read: {exc.strerror}") from exc
