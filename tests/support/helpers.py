"""Small shared pieces for tests: a controllable clock and request builders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from sidecar.models import PRIORITY_DEFAULT, QueuedRequest
from sidecar.protocol import FrameReader, Reply
from sidecar.queue.base import new_request
from sidecar.server import SidecarServer
from sidecar.server.connection import Connection


class FakeClock:
    """A wall clock the test moves by hand, so TTLs and leases lapse without sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_request(
    clock: Callable[[], float],
    body: object = None,
    *,
    priority: int = PRIORITY_DEFAULT,
    ttl_s: float = 3600.0,
    max_attempts: int = 3,
    queue_id: str | None = None,
) -> QueuedRequest:
    """A new request as the server would build it, with `body` encoded as its payload."""
    payload = msgspec.msgpack.encode(body if body is not None else {"prompt": "hi"})
    return new_request(
        payload=payload,
        priority=priority,
        ttl_s=ttl_s,
        max_attempts=max_attempts,
        now=clock(),
        queue_id=queue_id,
    )


async def read_replies_async(reader: asyncio.StreamReader, n: int) -> list[Reply]:
    """The next n replies on a connection, each read bounded; fails if the daemon closes it."""
    frames = FrameReader(1 << 24)
    replies: list[Reply] = []
    while len(replies) < n:
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, f"connection closed after {len(replies)} replies"
        replies += [msgspec.msgpack.decode(b, type=Reply) for b in frames.feed(data)]
    return replies


def live(server: SidecarServer) -> list[Connection]:
    """The server's open connections, as the Connection objects they are."""
    return [c for c in server.state.connections if isinstance(c, Connection)]
