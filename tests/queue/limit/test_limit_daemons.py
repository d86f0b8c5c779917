"""The limiter through real daemons: two daemons on one Redis share one budget and one probe; a
Redis killed under a daemon is met inside the call at the host's share; bad input gets a clear
error and the daemon and its other clients carry on; decisions are counted in the metrics."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from sidecar.client import AsyncClient, Client
from tests.support.daemon import Daemon, running_daemon
from tests.support.redis_server import RedisServer

# Real daemons and redis-servers: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

S = "llm.openai.gpt-4o.0123456789abcdef"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def on_redis(redis: RedisServer, **env: str) -> Any:
    return running_daemon(
        REDIS_URL=redis.url, REDIS_TIMEOUT_SECONDS="0.3", REDIS_CONNECT_TIMEOUT_SECONDS="0.3",
        **env,
    )  # fmt: skip


async def test_two_daemons_on_one_redis_share_one_budget(redis: RedisServer) -> None:
    with on_redis(redis) as a, on_redis(redis) as b:
        async with AsyncClient(a.socket_path) as ca, AsyncClient(b.socket_path) as cb:
            # 6 a minute: 10 s a request, so of 40 asks made together exactly one goes.
            asks = [c.limit_acquire(S, rpm=6) for c in (ca, cb) for _ in range(20)]
            grants = await asyncio.gather(*asks)
            assert sum(g.granted for g in grants) == 1
            assert {g.reason for g in grants if not g.granted} == {"requests"}
            # A pause asked through one daemon holds the other's callers too.
            until = await ca.limit_pause("paused-scope", pause_s=30.0, reason="retry_after")
            held = await cb.limit_acquire("paused-scope", rpm=600, fresh=True)
            assert (held.granted, held.reason) == (False, "paused")
            assert until - 30.5 < time.time() + held.wait_s - 30 <= until


async def test_two_daemons_on_one_redis_send_exactly_one_probe(redis: RedisServer) -> None:
    with on_redis(redis) as a, on_redis(redis) as b:
        async with AsyncClient(a.socket_path) as ca, AsyncClient(b.socket_path) as cb:
            for _ in range(3):
                state = await ca.limit_report(S, ok=False, failures=3, reset_s=0.5)
            assert state == "open"
            assert await cb.limit_report(S, ok=False, failures=3, reset_s=0.5) == "open"
            probes: list[str] = []
            told_probing: set[int] = set()

            async def asker(n: int, client: AsyncClient) -> None:
                deadline = time.monotonic() + 15
                while n not in told_probing:  # until it heard another holds the probe
                    assert time.monotonic() < deadline
                    grant = await client.limit_acquire(S, rpm=600)
                    if grant.probe:
                        probes.append(f"asker {n}")
                    elif grant.reason == "probing":
                        told_probing.add(n)
                    else:
                        await asyncio.sleep(min(grant.wait_s, 0.05))

            await asyncio.gather(*(asker(n, (ca, cb)[n % 2]) for n in range(20)))
            assert len(probes) == 1, probes
            assert await cb.limit_report(S, ok=True, probe=True) == "closed"
            assert (await ca.limit_acquire(S, rpm=600)).granted


async def test_a_killed_redis_is_met_inside_the_call_at_the_hosts_share(
    redis: RedisServer,
) -> None:
    with on_redis(redis, LIMITER_LOCAL_SHARE="0.5") as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            assert (await client.limit_acquire(S, rpm=60)).granted
            redis.kill()
            first = await client.limit_acquire("after-kill", rpm=60)
            second = await client.limit_acquire("after-kill", rpm=60)
            assert first.granted
            # Half of 60 a minute on this host: one request every 2 s.
            assert second.reason == "requests" and 1.9 < second.wait_s <= 2.0
            assert (await client.health()).mode == "local_fallback"


async def test_limiter_decisions_are_counted_in_the_metrics() -> None:
    with running_daemon() as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            await client.limit_acquire(S, rpm=60)
            await client.limit_acquire(S, rpm=60)
            await client.limit_report("b", ok=False, failures=1, reset_s=0.01)
            await asyncio.sleep(0.02)  # past the 10 ms open period: the next ask is the probe
            assert (await client.limit_acquire("b")).probe
            text = (await client.metrics()).text
    for result in ("granted", "waited", "probe"):
        assert f'sidecar_limiter_decisions_total{{result="{result}"}} 1.0' in text


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d


def exchange(path: str, message: dict[str, Any]) -> dict[str, Any]:
    """One frame sent by hand on its own connection (what no typed client would send)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        body = msgspec.msgpack.encode(message)
        sock.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = sock.recv(65536)
            assert chunk, "closed before a whole reply"
            data += chunk
        # The connection stays usable after the error: a good request on it is answered.
        good = msgspec.msgpack.encode({"op": "limit_acquire", "id": 2, "scope": "ok"})
        sock.sendall(struct.pack(">I", len(good)) + good)
        more = b""
        while len(more) < 4 or len(more) < 4 + struct.unpack(">I", more[:4])[0]:
            chunk = sock.recv(65536)
            assert chunk, "closed after an invalid request"
            more += chunk
        assert msgspec.msgpack.decode(more[4:])["ok"] is True
    reply: dict[str, Any] = msgspec.msgpack.decode(data[4:])
    return reply


ACQUIRE = {"op": "limit_acquire", "id": 1, "scope": S}
# msgspec shows the pattern as its repr: the backslash of \Z doubled.
NOT_PRINTABLE = r"Expected `str` matching regex '^[!-~]+\\Z' - at `$.scope`"
BAD = [
    (ACQUIRE | {"scope": ""}, "Expected `str` of length >= 1 - at `$.scope`"),
    (ACQUIRE | {"scope": "x" * 129}, "Expected `str` of length <= 128 - at `$.scope`"),
    (ACQUIRE | {"scope": "caf\u00e9"}, NOT_PRINTABLE),
    (ACQUIRE | {"scope": "ends-in-newline\n"},
     NOT_PRINTABLE),
    (ACQUIRE | {"scope": "a b"}, NOT_PRINTABLE),
    (ACQUIRE | {"scope": 7}, "Expected `str`, got `int` - at `$.scope`"),
    (ACQUIRE | {"requests": -1}, "Expected `int` >= 0 - at `$.requests`"),
    (ACQUIRE | {"tokens": -5}, "Expected `int` >= 0 - at `$.tokens`"),
    (ACQUIRE | {"rpm": "600"}, "Expected `int`, got `str` - at `$.rpm`"),
    (ACQUIRE | {"tpm": 10**10}, "Expected `int` <= 1000000000 - at `$.tpm`"),
    (ACQUIRE | {"fresh": "yes"}, "Expected `bool`, got `str` - at `$.fresh`"),
    (ACQUIRE | {"drain_share": 0.0}, "Expected `float` > 0.0 - at `$.drain_share`"),
    (ACQUIRE | {"drain_share": 1.5}, "Expected `float` <= 1.0 - at `$.drain_share`"),
    (ACQUIRE | {"ramp_s": float("nan")}, "Expected `float` >= 0.0 - at `$.ramp_s`"),
    ({"op": "limit_pause", "id": 1, "scope": S, "pause_s": -1.0},
     "Expected `float` >= 0.0 - at `$.pause_s`"),
    ({"op": "limit_pause", "id": 1, "scope": S, "pause_s": 86401.0},
     "Expected `float` <= 86400.0 - at `$.pause_s`"),
    ({"op": "limit_pause", "id": 1, "scope": S, "pause_s": float("inf")},
     "Expected `float` <= 86400.0 - at `$.pause_s`"),
    ({"op": "limit_pause", "id": 1, "scope": S}, "Object missing required field `pause_s`"),
    ({"op": "limit_report", "id": 1, "scope": S}, "Object missing required field `ok`"),
    ({"op": "limit_report", "id": 1, "scope": S, "ok": True, "failures": 0},
     "Expected `int` >= 1 - at `$.failures`"),
    ({"op": "limit_report", "id": 1, "scope": S, "ok": True, "reset_s": 0.0},
     "Expected `float` > 0.0 - at `$.reset_s`"),
    ({"op": "limit_settle", "id": 1, "scope": S, "tpm": -1}, "Expected `int` >= 0 - at `$.tpm`"),
    ({"op": "limit_settle", "id": 1, "scope": S, "tokens_delta": 10**10},
     "Expected `int` <= 1000000000 - at `$.tokens_delta`"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "says"), BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_a_clear_error_and_loses_nothing(
    daemon: Daemon, message: dict[str, Any], says: str
) -> None:
    with Client(daemon.socket_path) as other:  # another client, busy before and after
        assert other.limit_pause("other", pause_s=60.0) > time.time()
        reply = exchange(daemon.socket_path, message)
        assert reply["ok"] is False and reply["id"] == 1
        assert reply["error"]["code"] == "invalid_message"
        assert reply["error"]["message"] == f"invalid message: {says}"
        # The other client's scope is as it left it: nothing was lost or changed.
        held = other.limit_acquire("other", rpm=60)
        assert (held.granted, held.reason) == (False, "paused")
    assert daemon.proc is not None and daemon.proc.poll() is None
