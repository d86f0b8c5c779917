"""The ceiling for the Redis mode: raw redis-py doing the daemon's Redis work, nothing else.

Each operation is the FCALL the daemon's RedisQueue sends for it, of the same function
(sidecar.queue.redis.keys LIBRARY / FUNCTION_NAMES) with the same KEYS and ARGV shape: `enqueue`
of one request; `dequeue` of one, then `complete` of it. The client is built by the daemon's
own `redis_client` (hiredis parser, the same timeouts, retry and options), and concurrent
calls of one loop pass go out in one pipeline, as the daemon's coalescer sends them: many
tasks sharing one connection's round trips is the fastest way redis-py does this work (see
README.md for the alternative measured: one command per task over the connection pool).

The sessions of one target share one client and one batch, as every connection to the daemon
shares its one RedisQueue.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis

from bench.payload import llm_request
from bench.sessions import EmptyQueue, Session, SessionFactory
from sidecar.config import Settings
from sidecar.models import PRIORITY_DEFAULT, PRIORITY_MAX
from sidecar.queue.base import JOB_FIXED_BYTES
from sidecar.queue.redis import redis_client
from sidecar.queue.redis.keys import FUNCTION_NAMES, LIBRARY, RedisKeys

Arg = str | bytes | int | float
# The daemon's defaults: request TTL 4 h, retention 24 h, 3 attempts, lease 60 s, sweep 500.
_SETTINGS = Settings()
TTL_S = _SETTINGS.request_ttl_s
RETENTION_S = _SETTINGS.retention_s
MAX_ATTEMPTS = _SETTINGS.queue_max_attempts
LEASE_S = _SETTINGS.queue_lease_s
SWEEP_LIMIT = 500
KEYS = RedisKeys.for_prefix(_SETTINGS.redis_key_prefix)
SCRIPT_KEYS = KEYS.script_keys()
# Items per enqueue-script call when filling a backlog, and calls per pipeline.
BACKLOG_BATCH = 1000
BACKLOG_CALLS_PER_PIPELINE = 4


def client_for(url: str, timeout_s: float = 1.0) -> Redis:
    """A redis.asyncio client built exactly as the daemon builds its own."""
    settings = Settings(redis_url=url, redis_connect_timeout_s=timeout_s, redis_timeout_s=timeout_s)
    client = redis_client(settings)
    assert isinstance(client, Redis)  # a single-server URL: never a cluster client
    return client


Call = tuple[tuple[str, ...], list[Arg]]


def enqueue_call(payloads: Sequence[bytes], priority: int = PRIORITY_DEFAULT) -> Call:
    """KEYS and ARGV of the enqueue script for new requests, as RedisQueue.enqueue builds them."""
    now = time.time()
    ids = [uuid.uuid4().hex for _ in payloads]
    args: list[Arg] = [now, RETENTION_S, len(payloads)]
    for queue_id, payload in zip(ids, payloads, strict=True):
        args += [queue_id, priority, now, now + TTL_S, MAX_ATTEMPTS, payload, 0]
    return SCRIPT_KEYS + tuple(KEYS.request(q) for q in ids), args


async def load_scripts(client: Redis) -> None:
    await client.function_load(LIBRARY, replace=True)


class Coalescer:
    """Script calls made in one loop pass share one pipeline (RedisQueue._call, in small)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.batch: list[tuple[str, Call, asyncio.Future[Any]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def call(self, script: str, call: Call) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.batch.append((FUNCTION_NAMES[script], call, fut))
        if len(self.batch) == 1:
            task = loop.create_task(self._flush())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await fut

    async def _flush(self) -> None:
        batch, self.batch = self.batch, []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, (keys, args), _ in batch:
                    pipe.fcall(name, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, _, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)


class RedisCeiling:
    """One target: a client and a coalescer, opened by the first session, closed by the last."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.coalescer: Coalescer | None = None
        self.open_sessions = 0

    def factory(self) -> SessionFactory:
        async def connect() -> Session:
            if self.coalescer is None:
                client = client_for(self.url)
                await load_scripts(client)
                self.coalescer = Coalescer(client)
            self.open_sessions += 1
            return RedisSession(self, self.coalescer)

        return connect

    async def release(self) -> None:
        self.open_sessions -= 1
        if self.open_sessions == 0 and self.coalescer is not None:
            coalescer, self.coalescer = self.coalescer, None
            if coalescer.tasks:
                await asyncio.gather(*coalescer.tasks, return_exceptions=True)
            await coalescer.client.aclose()


class RedisSession:
    """The bench's unit operations as the daemon's Redis calls."""

    def __init__(self, owner: RedisCeiling, coalescer: Coalescer) -> None:
        self.owner = owner
        self.coalescer = coalescer
        self.payload = msgspec.msgpack.encode(llm_request())
        self.closed = False

    async def enqueue(self) -> None:
        await self.coalescer.call("enqueue", enqueue_call([self.payload]))

    async def dequeue_complete(self) -> None:
        now = time.time()
        lease_id = uuid.uuid4().hex
        # -1: no byte budget; the job overhead the budget would count (dequeue.lua's header).
        args: list[Arg] = [now, RETENTION_S, now + LEASE_S, SWEEP_LIMIT, -1, JOB_FIXED_BYTES]
        args.append(lease_id)
        reply = await self.coalescer.call("dequeue", (SCRIPT_KEYS, args))
        if not reply[1]:
            raise EmptyQueue("dequeue found no request")
        pairs = reply[1][0]
        fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
        queue_id = fields[b"queue_id"].decode()
        # "1": the record back, as the daemon's complete asks for it (complete.lua).
        done: list[Arg] = [time.time(), RETENTION_S, queue_id, lease_id, "1"]
        await self.coalescer.call("complete", ((*SCRIPT_KEYS, KEYS.request(queue_id)), done))

    async def prefill(self, count: int) -> None:
        await fill_backlog(self.coalescer.client, count, self.payload, PRIORITY_DEFAULT)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.owner.release()


async def fill_backlog(
    client: Redis, count: int, payload: bytes, priority: int = PRIORITY_MAX
) -> None:
    """Queue count requests with the enqueue script, BACKLOG_BATCH per call, untimed.

    The default priority sorts after everything the timed rows queue, so a dequeue row takes
    its own requests and the backlog only makes the sorted sets deep.
    """
    while count > 0:
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(BACKLOG_CALLS_PER_PIPELINE):
                n = min(count, BACKLOG_BATCH)
                if n == 0:
                    break
                keys, args = enqueue_call([payload] * n, priority)
                pipe.fcall(FUNCTION_NAMES["enqueue"], len(keys), *keys, *args)
                count -= n
            await pipe.execute()


async def queued_in_redis(client: Redis) -> int:
    """Requests waiting in Redis (the pending sorted set's size)."""
    return int(await client.zcard(KEYS.pending))
