"""Many requests in flight flow as a pipeline: the client and the daemon's Redis calls write
early, once EARLY_WRITE_FRAMES / EARLY_FLUSH_ITEMS have gathered in one loop pass, instead of
holding a whole burst until the pass ends (a lock step in which two of three processes wait).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine

import redis
from redis.asyncio import Redis

from sidecar import eager
from sidecar.client.connection import EARLY_WRITE_FRAMES, ClientConnection
from sidecar.errors import SidecarUnavailable
from sidecar.protocol import FrameReader, Status, decode_request
from sidecar.queue.redis.fold import EARLY_FLUSH_ITEMS
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    QueueFactory,
    RedisServer,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
    script_runs,
)


def _frames_waiting(sock: socket.socket) -> list[int]:
    """The request ids of the frames the peer has written so far (never blocks)."""
    reader = FrameReader(1 << 20)
    ids: list[int] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return ids
        ids += [decode_request(body).id or 0 for body in reader.feed(data)]


async def test_the_client_writes_once_enough_frames_gathered_and_the_rest_at_the_pass_end() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_unix_connection(lambda: ClientConnection(5.0), sock=ours)
    try:
        n = EARLY_WRITE_FRAMES + 3
        futures = []
        for i in range(1, n + 1):
            futures.append(conn.send(Status(id=i, queue_id=f"q{i}"), 0.0))
            if i == EARLY_WRITE_FRAMES - 1:
                assert _frames_waiting(theirs) == []  # still gathering in this pass
        # Without yielding to the loop: the first EARLY_WRITE_FRAMES are out already.
        assert _frames_waiting(theirs) == list(range(1, EARLY_WRITE_FRAMES + 1))
        await asyncio.sleep(0)  # the pass ends: the rest leave in one write
        assert _frames_waiting(theirs) == list(range(EARLY_WRITE_FRAMES + 1, n + 1))
    finally:
        conn.close(SidecarUnavailable("test over", {"sent": True, "reason": "closed"}))
        theirs.close()
    assert all(isinstance(f.exception(), SidecarUnavailable) for f in futures)  # none answered


def _script_runs(client: redis.Redis) -> int:
    return script_runs(client.info("commandstats"))


async def test_the_daemon_sends_a_full_fold_to_redis_before_its_loop_pass_ends(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, redis_server: RedisServer
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="warm")])  # the lean connection is up
    look = redis.Redis(unix_socket_path=redis_server.socket_path)
    try:
        before = _script_runs(look)
        calls: list[Coroutine[object, None, None]] = []
        waits: list[object] = []
        n = 2 * EARLY_FLUSH_ITEMS + 3
        for i in range(n):
            coro = queue.enqueue([make_request(clock, {"n": i}, queue_id=f"q{i}")])
            ended, waiting = eager.first_step(coro)  # type: ignore[arg-type]
            assert not ended
            calls.append(coro)  # type: ignore[arg-type]
            waits.append(waiting)
        # This coroutine has not yielded since the first call: only a write made inside the
        # calls can have reached Redis. Two full folds did; the last three wait for the pass.
        deadline = time.monotonic() + 5.0
        while _script_runs(look) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # noqa: ASYNC251 - blocking on purpose: the loop must not run
        assert _script_runs(look) == before + 2
        await asyncio.gather(*(eager.resume(c, w) for c, w in zip(calls, waits, strict=True)))
        assert _script_runs(look) == before + 3
    finally:
        look.close()
    seqs = [(await queue.status(f"q{i}")) for i in range(n)]
    assert all(s is not None for s in seqs)
    # Three runs, in call order: the seqs follow the calls across them.
    ordered = [s.seq for s in seqs if s is not None]
    assert ordered == sorted(ordered) and len(set(ordered)) == n
