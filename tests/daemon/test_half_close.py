"""A client that half-closes after its last request reads every reply, then the daemon's end of
stream (protocol.md section 3, "EOF at a frame boundary"), in both modes (GitHub issue 24,
item 2).

The reply that matters is one made after the client's end of stream reached the daemon: a
dequeue long poll that ends with nothing (wait_s), and in Redis mode any op at all (each runs in
a task of its own there, so its reply is always made after the read that brought the end). The
end must follow that reply; every read is bounded, so a daemon that never closes fails the
test instead of hanging it.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from tests.support.daemon import Daemon, running_daemon
from tests.support.redis_server import RedisServer

# Real processes: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

# The long poll's wait, then the most the end of stream may take to follow its reply.
WAIT_S = 0.3
CLOSE_WITHIN_S = 5.0


@pytest.fixture(scope="module", params=["local", "redis"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    if request.param == "local":
        with running_daemon() as d:
            yield d
        return
    with RedisServer() as server, running_daemon(REDIS_URL=server.url) as d:
        yield d


def frame(obj: object) -> bytes:
    body = msgspec.msgpack.encode(obj)
    return struct.pack(">I", len(body)) + body


def read_to_end(sock: socket.socket, deadline_s: float) -> tuple[list[dict[str, Any]], bool]:
    """Every reply until the daemon's end of stream or the deadline: (replies, ended)."""
    buf = b""
    deadline = time.monotonic() + deadline_s
    ended = False
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            ended = True
            break
        buf += chunk
    replies: list[dict[str, Any]] = []
    while len(buf) >= 4 and len(buf) >= 4 + (size := struct.unpack(">I", buf[:4])[0]):
        replies.append(msgspec.msgpack.decode(buf[4 : 4 + size]))
        buf = buf[4 + size :]
    assert buf == b"", f"a torn reply at the end: {buf!r}"
    return replies, ended


def half_close_after(daemon: Daemon, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLOSE_WITHIN_S)
        sock.connect(daemon.socket_path)
        sock.sendall(b"".join(frame(r) for r in requests))
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        replies, ended = read_to_end(sock, WAIT_S + CLOSE_WITHIN_S)
        elapsed = time.monotonic() - started
    ids = [r["id"] for r in replies]
    assert ids == [r["id"] for r in requests], replies
    assert ended, f"no end of stream within {WAIT_S + CLOSE_WITHIN_S} s of {ids}"
    assert elapsed < WAIT_S + CLOSE_WITHIN_S
    return replies


def test_a_long_poll_answered_after_the_half_close_is_followed_by_the_end(
    daemon: Daemon,
) -> None:
    [reply] = half_close_after(daemon, {"op": "dequeue", "id": 1, "max_items": 1, "wait_s": WAIT_S})
    assert reply["ok"] is True and reply["result"]["items"] == []


def test_a_reply_made_in_the_read_is_followed_by_the_end(daemon: Daemon) -> None:
    [reply] = half_close_after(daemon, {"op": "health", "id": 1})
    assert reply["ok"] is True


def test_every_op_before_the_half_close_is_answered_then_the_end(daemon: Daemon) -> None:
    replies = half_close_after(
        daemon,
        {"op": "health", "id": 1},
        {"op": "enqueue", "id": 2, "items": [{"payload": b"x"}]},
        {"op": "stats", "id": 3},
    )
    assert all(r["ok"] for r in replies), replies
