"""The ceiling for the local mode: a server with the daemon's framing and no queue work.

It reads frames exactly as the daemon does (sidecar.protocol.FrameReader, the 4-byte prefix),
reads only `id` and `op` from each request, and answers with an OkReply carrying a canned
result of the right shape (and size: a dequeue reply carries a job with a payload as large as
the bench's), so the same client code runs against it and against the daemon. What it costs is
framing, syscalls and the event loop: the most any server of this protocol could do here.

Run: `python -m bench.echo_server SOCKET_PATH`; prints `ready` on stdout once it listens and
stops on SIGTERM or SIGINT. With `--relay REDIS_SOCKET_PATH` it answers each request only after
Redis has run a no-op script for it: the daemon's extra hop without its work (bench/hop.py).
With `--enqueue` too, Redis runs the daemon's own enqueue function instead, storing a request
with a payload of the bench's size under the key prefix `relay` for each request: the hop and
Redis's work, without the daemon's (bench/bullmq.py, the second floor row).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import itertools
import signal
import time
import uuid
from collections.abc import Callable
from typing import cast

import hiredis
import msgspec
import uvloop

from bench.payload import llm_request
from sidecar.protocol import (
    DECODE_ERRORS,
    Completed,
    CompleteManyResult,
    DequeueResult,
    EnqueuedItem,
    EnqueueResult,
    FrameReader,
    Job,
    OkReply,
    RequestInfo,
    append_frame,
)
from sidecar.queue.redis_keys import FUNCTION_NAMES, LIBRARY, RedisKeys
from sidecar.queue.redis_wire import encode_command

READY_LINE = "ready"
# The daemon's default frame limit; the echo never sees a frame near it.
MAX_FRAME_BYTES = 16 * 1024 * 1024

class _Envelope(msgspec.Struct):
    """The fields the echo reads; msgspec skips the rest without building it. An enqueue's (or
    a complete_many's) items are counted (not decoded): a batch gets one result item per item,
    as the daemon's."""

    id: int | None = None
    op: str = ""
    items: list[msgspec.Raw] | None = None


_envelope = msgspec.msgpack.Decoder(_Envelope)
_encode = msgspec.msgpack.encode


def canned_results() -> CannedResults:
    """A pre-encoded result per op, shaped like the daemon's, so the client decodes it alike."""
    now = time.time()
    info = RequestInfo(
        queue_id="q-echo",
        status="completed",
        priority=5,
        attempts=1,
        max_attempts=3,
        created_at=now,
        expires_at=now + 3600,
        updated_at=now,
        size_bytes=1024,
    )
    enqueued = EnqueuedItem(
        queue_id="q-echo", status="queued", created=True, priority=5, expires_at=now + 3600
    )
    job = Job(
        queue_id="q-echo",
        lease_id="lease-echo",
        lease_expires_at=now + 60,
        payload=msgspec.Raw(_encode(llm_request())),
        priority=5,
        attempts=1,
        max_attempts=3,
        created_at=now,
        expires_at=now + 3600,
    )
    singles = {
        "enqueue": msgspec.Raw(_encode(EnqueueResult(items=[enqueued]))),
        "dequeue": msgspec.Raw(_encode(DequeueResult(items=[job]))),
        "complete": msgspec.Raw(_encode(info)),
        "fail": msgspec.Raw(_encode(info)),
        "extend": msgspec.Raw(_encode(info)),
    }
    return CannedResults(singles, enqueued, Completed(completed=info))


class CannedResults(dict[str, msgspec.Raw]):
    """The pre-encoded result of each op; a batch's (`enqueue/n`, `complete_many/n`: one result
    item per item, as the daemon's) is encoded the first time its size is asked for, and kept.
    AsyncClient sends the single enqueues and completes of one loop pass as one request
    (sidecar/client_fold.py)."""

    def __init__(
        self, singles: dict[str, msgspec.Raw], enqueued: EnqueuedItem, completed: Completed
    ) -> None:
        super().__init__(singles)
        self._enqueued, self._completed = enqueued, completed

    def __missing__(self, key: str) -> msgspec.Raw:
        op, _, count = key.partition("/")
        n = int(count)
        result = (
            EnqueueResult(items=[self._enqueued] * n)
            if op == "enqueue"
            else CompleteManyResult(results=[self._completed] * n, items=[])
        )
        raw = self[key] = msgspec.Raw(_encode(result))
        return raw


class EchoConnection(asyncio.Protocol):
    """Answers every frame of one read with one write, as the daemon does."""

    def __init__(self, results: CannedResults) -> None:
        self.results = results
        self.reader = FrameReader(MAX_FRAME_BYTES)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        out = bytearray()
        for body in self.reader.feed(data):
            append_frame(out, self.reply(body))
        if self.reader.error is not None:
            self.transport.close()
        if out:
            self.transport.write(out)

    def reply(self, body: bytes) -> OkReply:
        """The canned answer to one request frame."""
        try:
            env = _envelope.decode(body)
        except DECODE_ERRORS:
            env = _Envelope()
        op, n = env.op, len(env.items or ())
        if env.items is not None and (op == "complete_many" or (op == "enqueue" and n > 1)):
            result: msgspec.Raw | None = self.results[f"{op}/{n}"]
        else:
            result = self.results.get(op)
        return OkReply(id=env.id, result=result)


# The relay's one Redis command per request: a script that does nothing, so what it costs is
# the round trip to Redis and Redis's fixed cost per call.
NOOP_SCRIPT = "return 1"
# With --enqueue: the daemon's enqueue function, under keys of their own.
RELAY_PREFIX = "relay"
RELAY_TTL_S = 3600.0
RELAY_RETENTION_S = 600.0


def noop_commands() -> Callable[[int], bytes]:
    """n runs of the no-op script."""
    command = encode_command(("EVALSHA", hashlib.sha1(NOOP_SCRIPT.encode()).hexdigest(), 0))
    return lambda n: command * n


def enqueue_commands() -> Callable[[int], bytes]:
    """n runs of the daemon's enqueue function, each storing a new request as the daemon would
    store a lone enqueue of the bench's payload (priorities 0-9 in turn, a TTL)."""
    keys = RedisKeys.for_prefix(RELAY_PREFIX)
    head: tuple[str | int, ...] = (
        "FCALL", FUNCTION_NAMES["enqueue"], len(keys.script_keys()) + 1, *keys.script_keys()
    )
    payload = msgspec.msgpack.encode(llm_request())
    run, count = uuid.uuid4().hex[:8], itertools.count()

    def commands(n: int) -> bytes:
        out = bytearray()
        now = time.time()
        for _ in range(n):
            i = next(count)
            queue_id = f"{run}-{i}"
            out += encode_command(
                (*head, keys.request(queue_id), now, RELAY_RETENTION_S, 1, queue_id, i % 10,
                 now, now + RELAY_TTL_S, 3, payload, 0)
            )  # fmt: skip
        return bytes(out)

    return commands


class RedisLink(asyncio.Protocol):
    """The relay's connection to Redis: replies matched first in, first out (hiredis)."""

    def __init__(self, commands: Callable[[int], bytes]) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Transport, bytes]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.commands = commands

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        out: dict[asyncio.Transport, bytearray] = {}
        while (reply := self.reader.gets()) is not False:
            client, frame = self.waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                # No canned answer for a request Redis refused: its client sees the
                # connection end rather than wait for a reply that never comes.
                client.abort()
                continue
            out.setdefault(client, bytearray()).extend(frame)
        for client, frames in out.items():
            if not client.is_closing():
                client.write(frames)


class RelayConnection(EchoConnection):
    """The echo's answers, each sent only once Redis has run one command for it (the no-op
    script, or the daemon's enqueue function): the daemon's extra hop (client, relay, Redis)
    without any of the daemon's work."""

    def __init__(self, results: CannedResults, link: RedisLink) -> None:
        super().__init__(results)
        self.link = link

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.link.transport is not None
        commands = 0
        for body in self.reader.feed(data):
            out = bytearray()
            append_frame(out, self.reply(body))
            self.link.waiting.append((self.transport, bytes(out)))
            commands += 1
        if self.reader.error is not None:
            self.transport.close()
        if commands:
            self.link.transport.write(self.link.commands(commands))


async def serve(path: str, redis_path: str | None = None, enqueue: bool = False) -> None:
    """Listen on path until SIGTERM or SIGINT; relay each request to Redis at redis_path
    (a no-op script, or with enqueue the daemon's enqueue function)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    results = canned_results()
    factory: Callable[[], EchoConnection] = lambda: EchoConnection(results)  # noqa: E731
    if redis_path is not None:
        commands = enqueue_commands() if enqueue else noop_commands()
        _, link = await loop.create_unix_connection(lambda: RedisLink(commands), redis_path)
        # The library is the daemon's own; REPLACE, as the daemon may have loaded it already.
        noop = ("SCRIPT", "LOAD", NOOP_SCRIPT)
        await _load(redis_path, ("FUNCTION", "LOAD", "REPLACE", LIBRARY) if enqueue else noop)
        factory = lambda: RelayConnection(results, link)  # noqa: E731
    server = await loop.create_unix_server(factory, path, backlog=1024)
    print(READY_LINE, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


async def _load(redis_path: str, command: tuple[str, ...]) -> None:
    reader, writer = await asyncio.open_unix_connection(redis_path)
    writer.write(encode_command(command))
    line = await reader.readline()
    writer.close()
    if not line.startswith(b"$"):  # SCRIPT LOAD's sha, FUNCTION LOAD's library name
        raise RuntimeError(f"relay: {' '.join(command[:2])} answered {line!r}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    p.add_argument("socket_path")
    p.add_argument("--relay", metavar="REDIS_SOCKET_PATH", help="relay each request to Redis")
    p.add_argument("--enqueue", action="store_true", help="with --relay: run the daemon's enqueue")
    args = p.parse_args()
    if args.enqueue and args.relay is None:
        p.error("--enqueue needs --relay")
    uvloop.run(serve(args.socket_path, args.relay, args.enqueue))


if __name__ == "__main__":
    main()
