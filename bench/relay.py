"""The relay: the echo's answers, each sent only once Redis has run one command for it.

It puts the daemon's extra hop (client, relay, Redis) beside the daemon without the daemon's
work, so a bench can tell what the hop costs, what Redis's work costs, and what the daemon adds:

- by default Redis runs a script that does nothing per request: the hop alone
  (bench/hop.py, and the "floor" row of bench/bullmq.py);
- with `--store`, Redis runs the daemon's own functions, under the key prefix `relay`, with
  the arguments a daemon with the default settings passes: an enqueue stores a request with
  the bench's payload (priorities 0-9 in turn, a TTL of TTL_S; the request's own are not
  read), a dequeue leases the most urgent request, and a complete settles the oldest lease
  not settled yet: the last dequeue's, one call at a time (the relay keeps the leases; the
  client's ids are the echo's canned ones). Any other op runs the no-op script. The "floor
  with Redis's work" rows of bench/bullmq.py.

Run: `python -m bench.relay SOCKET_PATH REDIS_SOCKET_PATH [--store]`; prints `ready` on stdout
once it listens and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import hiredis
import msgspec
import uvloop

from bench.echo_server import CannedResults, EchoConnection, canned_results, read_envelope, serve
from bench.payload import TTL_S, llm_request
from sidecar.config import Settings
from sidecar.protocol import append_frame
from sidecar.queue.base import JOB_FIXED_BYTES, new_lease_id
from sidecar.queue.redis.keys import FUNCTION_NAMES, LIBRARY, RedisKeys
from sidecar.queue.redis.wire import encode_command
from sidecar.server.ops import REPLY_OVERHEAD_BYTES

NOOP_SCRIPT = "return 1"
RELAY_PREFIX = "relay"
# What a daemon with the default settings passes to its functions.
_DEFAULTS = Settings()
OnReply = Callable[[Any], None] | None
Arg = str | int | float | bytes


class NoopStore:
    """Redis runs a script that does nothing: what it costs is the round trip and Redis's fixed
    cost per call."""

    load: tuple[str, ...] = ("SCRIPT", "LOAD", NOOP_SCRIPT)

    def __init__(self) -> None:
        self.noop = encode_command(("EVALSHA", hashlib.sha1(NOOP_SCRIPT.encode()).hexdigest(), 0))

    def command(self, op: str) -> tuple[bytes, OnReply]:
        """The command to run for a request of op, and what to do with its reply."""
        return self.noop, None


class DaemonStore(NoopStore):
    """Redis runs the daemon's enqueue, dequeue and complete functions, with the arguments a
    daemon with the default settings passes for a lone call (queue/redis.py)."""

    # The library is the daemon's own; REPLACE, as a daemon on this Redis may have loaded it.
    load = ("FUNCTION", "LOAD", "REPLACE", LIBRARY)

    def __init__(self) -> None:
        super().__init__()
        self.keys = RedisKeys.for_prefix(RELAY_PREFIX)
        self.fixed = self.keys.script_keys()
        self.payload = msgspec.msgpack.encode(llm_request())
        self.run, self.count = uuid.uuid4().hex[:8], itertools.count()
        self.leased: collections.deque[tuple[str, str]] = collections.deque()

    def _fcall(self, name: str, keys: tuple[str, ...], now: float, *args: Arg) -> bytes:
        all_keys = (*self.fixed, *keys)
        head: tuple[Arg, ...] = ("FCALL", FUNCTION_NAMES[name], len(all_keys), *all_keys)
        return encode_command((*head, now, _DEFAULTS.retention_s, *args))

    def command(self, op: str) -> tuple[bytes, OnReply]:
        now = time.time()
        if op == "enqueue":
            i = next(self.count)
            queue_id = f"{self.run}-{i}"
            args: tuple[Arg, ...] = (1, queue_id, i % 10, now, now + TTL_S,
                                     _DEFAULTS.queue_max_attempts, self.payload, 0)  # fmt: skip
            return self._fcall("enqueue", (self.keys.request(queue_id),), now, *args), None
        if op == "dequeue":
            lease_id = new_lease_id()
            room = _DEFAULTS.max_frame_bytes - REPLY_OVERHEAD_BYTES
            args = (now + _DEFAULTS.queue_lease_s, _DEFAULTS.redis_sweep_batch, room,
                    JOB_FIXED_BYTES, lease_id)  # fmt: skip
            command = self._fcall("dequeue", (), now, *args)
            return command, lambda reply: self._leased(reply, lease_id)
        if op == "complete" and self.leased:
            queue_id, lease_id = self.leased.popleft()
            keys = (self.keys.request(queue_id),)
            return self._fcall("complete", keys, now, queue_id, lease_id, "1"), None
        return super().command(op)

    def _leased(self, reply: Any, lease_id: str) -> None:
        for record in reply[1]:  # field/value pairs of each leased request
            fields = dict(zip(record[::2], record[1::2], strict=True))
            self.leased.append((fields[b"queue_id"].decode(), lease_id))


class RedisLink(asyncio.Protocol):
    """The relay's connection to Redis: replies matched first in, first out (hiredis)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Transport, bytes, OnReply]] = (
            collections.deque()
        )
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        out: dict[asyncio.Transport, bytearray] = {}
        while (reply := self.reader.gets()) is not False:
            client, frame, on_reply = self.waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                # No canned answer for a request Redis refused: its client sees the
                # connection end rather than wait for a reply that never comes.
                client.abort()
                continue
            if on_reply is not None:
                on_reply(reply)
            out.setdefault(client, bytearray()).extend(frame)
        for client, frames in out.items():
            if not client.is_closing():
                client.write(frames)


class RelayConnection(EchoConnection):
    """The echo's answer to each request, sent once Redis has run the store's command for it."""

    def __init__(self, results: CannedResults, link: RedisLink, store: NoopStore) -> None:
        super().__init__(results)
        self.link, self.store = link, store

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.link.transport is not None
        commands = bytearray()
        for body in self.reader.feed(data):
            env = read_envelope(body)
            out = bytearray()
            append_frame(out, self.answer(env))
            command, on_reply = self.store.command(env.op)
            self.link.waiting.append((self.transport, bytes(out), on_reply))
            commands += command
        if self.reader.error is not None:
            self.transport.close()
        if commands:
            self.link.transport.write(commands)


async def relay(path: str, redis_path: str, store: NoopStore) -> None:
    """Listen on path until SIGTERM or SIGINT; run store's command on Redis for each request."""
    reader, writer = await asyncio.open_unix_connection(redis_path)
    writer.write(encode_command(store.load))
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    if not line.startswith(b"$"):  # SCRIPT LOAD's sha, FUNCTION LOAD's library name
        raise RuntimeError(f"relay: {' '.join(store.load[:2])} answered {line!r}")
    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(RedisLink, redis_path)
    results = canned_results()
    await serve(path, lambda: RelayConnection(results, link, store))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    p.add_argument("socket_path")
    p.add_argument("redis_socket_path")
    p.add_argument("--store", action="store_true", help="run the daemon's functions")
    args = p.parse_args()
    store = DaemonStore() if args.store else NoopStore()
    uvloop.run(relay(args.socket_path, args.redis_socket_path, store))


if __name__ == "__main__":
    main()
