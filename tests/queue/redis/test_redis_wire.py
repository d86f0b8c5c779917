"""The lean connection of redis_wire.py against a real redis-server: order, errors, outages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import structlog
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.config import Settings
from sidecar.errors import BackendUnavailable
from sidecar.queue.redis.fold import ScriptCall
from sidecar.queue.redis.io import redis_client, unavailable_kind
from sidecar.queue.redis.keys import FUNCTION_NAMES, SCRIPT_SHAS, RedisKeys
from sidecar.queue.redis.scripts import ScriptRunner
from sidecar.queue.redis.wire import WireClient, WireSpec, encode_command, wire_spec
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (
    QueueFactory,
    RedisServer,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

TIMEOUT_S = 0.3
# Generous against TIMEOUT_S: the claim is "about the timeout, not a minute", not precision.
BOUND_S = 5.0


def _spec(url: str, timeout_s: float = TIMEOUT_S) -> WireSpec:
    settings = Settings(redis_url=url, redis_connect_timeout_s=timeout_s, redis_timeout_s=timeout_s)
    spec = wire_spec(redis_client(settings))
    assert spec is not None
    return spec


@pytest.fixture
async def wire(redis_server: RedisServer) -> AsyncIterator[WireClient]:
    client = WireClient(_spec(redis_server.url))
    yield client
    await client.close()


def cmd(*parts: str | bytes | int | float) -> bytes:
    return encode_command(parts)


# -- which clients take the lean path -----------------------------------------------------------


def test_only_a_plain_server_takes_the_lean_path() -> None:
    unix = wire_spec(Redis.from_url("unix:///tmp/r.sock?db=2", password="pw"))
    assert unix is not None and (unix.path, unix.db, unix.password) == ("/tmp/r.sock", 2, "pw")
    tcp = wire_spec(Redis.from_url("redis://example:7000/0"))
    assert tcp is not None and (tcp.path, tcp.host, tcp.port) == (None, "example", 7000)
    # TLS, a cluster, Sentinel and fakes keep redis-py.
    assert wire_spec(Redis.from_url("rediss://example:7000/0")) is None
    cluster = RedisCluster.__new__(RedisCluster)  # no connection is opened for the check
    assert wire_spec(cluster) is None
    sentinel = redis_client(Settings(redis_url="redis+sentinel://localhost:26379/mymaster"))
    assert wire_spec(sentinel) is None
    assert wire_spec(fakeredis.FakeAsyncRedis()) is None


def test_encoding_matches_resp_and_refuses_other_types() -> None:
    assert cmd("SET", b"k", 7, 0.5) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n$3\r\n0.5\r\n"
    with pytest.raises(TypeError, match="must be str, bytes, int or float"):
        encode_command(["SET", None])  # type: ignore[list-item]


# -- replies ------------------------------------------------------------------------------------


async def test_concurrent_batches_get_their_own_replies_in_order(wire: WireClient) -> None:
    async def one(i: int) -> list[object]:
        return await wire.execute(
            [cmd("SET", f"k{i}", i), cmd("INCR", f"k{i}"), cmd("GET", f"k{i}")]
        )

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [[b"OK", i + 1, str(i + 1).encode()] for i in range(200)]
    assert wire.connects == 1


async def test_an_error_reply_fails_only_its_own_command(wire: WireClient) -> None:
    replies = await wire.execute([cmd("SET", "a", 1), cmd("EVALSHA", "0" * 40, 0), cmd("GET", "a")])
    assert replies[0] == b"OK" and replies[2] == b"1"
    assert isinstance(replies[1], NoScriptError)


async def test_refusals_arrive_as_redis_py_classes(wire: WireClient, raw: Redis) -> None:
    await raw.set("ballast", b"x" * 3_000_000)
    await raw.config_set("maxmemory", "1mb")
    [oom] = await wire.execute([cmd("SET", "k", "v")])
    assert isinstance(oom, OutOfMemoryError) and unavailable_kind(oom) == "out_of_memory"
    await raw.config_set("maxmemory", "0")
    # A replica of a master that is not there (a closed loopback port): writes are refused.
    await raw.replicaof("127.0.0.1", 1)
    try:
        [readonly] = await wire.execute([cmd("SET", "k", "v")])
        assert isinstance(readonly, ReadOnlyError) and unavailable_kind(readonly) == "read_only"
        await raw.config_set("replica-serve-stale-data", "no")
        [down] = await wire.execute([cmd("GET", "k")])
        assert isinstance(down, MasterDownError) and unavailable_kind(down) == "master_down"
    finally:
        await raw.replicaof("NO", "ONE")
    [bad] = await wire.execute([cmd("NOSUCHCOMMAND")])
    assert type(bad) is ResponseError and unavailable_kind(bad) is None


async def test_a_loading_redis_answers_loading() -> None:
    # key-load-delay (µs per key) makes a restart's load last long enough to be seen.
    slow = ("--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024")
    with RedisServer(extra_args=slow) as server:
        async with Redis.from_url(server.url) as raw:
            await raw.mset({f"k{i}": b"x" for i in range(3000)})
            await raw.save()
        server.stop()
        server.start(wait=False)  # its load of 3,000 keys takes about 3 s
        wire = WireClient(_spec(server.url, timeout_s=BOUND_S))
        deadline = time.monotonic() + BOUND_S
        try:
            while True:  # until the socket exists: the first answer is then LOADING
                try:
                    [reply] = await wire.execute([cmd("GET", "k1")])
                    break
                except RedisConnectionError:
                    assert time.monotonic() < deadline, "redis-server never listened"
                    await asyncio.sleep(0.01)
        finally:
            await wire.close()
    assert isinstance(reply, BusyLoadingError) and unavailable_kind(reply) == "loading"


# -- outages ------------------------------------------------------------------------------------


async def test_a_frozen_redis_times_out_then_a_fresh_connection_works(
    redis_server: RedisServer, wire: WireClient
) -> None:
    await wire.execute([cmd("PING")])
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await wire.execute([cmd("SET", "k", "v")])
        assert time.monotonic() - started < BOUND_S
    finally:
        redis_server.resume()
    assert await wire.execute([cmd("PING")]) == [b"PONG"]
    assert wire.connects == 2


async def test_a_reset_connection_fails_its_calls_then_reconnects_once(
    wire: WireClient, raw: Redis
) -> None:
    await wire.execute([cmd("PING")])
    await raw.client_kill_filter(_type="normal")  # SKIPME yes: not raw's own
    # The kill reaches this connection before or during the next call: a call it meets
    # fails as a connection error, one made after it reconnects.
    with contextlib.suppress(RedisConnectionError):
        await wire.execute([cmd("PING")])
    replies = await asyncio.gather(*(wire.execute([cmd("PING")]) for _ in range(10)))
    assert replies == [[b"PONG"]] * 10
    assert wire.connects == 2


async def test_a_transport_closed_before_its_connection_lost_arrives_is_not_written_to(
    wire: WireClient, redis_server: RedisServer
) -> None:
    """Redis goes away: the transport is closed a loop pass before connection_lost reaches the
    protocol. A call in between once wrote to the closed transport and raised RuntimeError
    (seen as a traceback in the daemon's status task, which then stopped the daemon)."""
    await wire.execute([cmd("PING")])
    proto = wire._proto
    assert proto is not None and proto.transport is not None
    proto.transport.close()  # closed now; connection_lost comes a pass later
    assert proto.alive  # the window: the protocol has not heard yet
    # A call in the window takes a fresh connection instead of writing to the closed one.
    assert await wire.execute([cmd("PING")]) == [b"PONG"]
    assert wire.connects == 2
    # The same window with Redis gone: a connection error, the class the store handles.
    proto = wire._proto
    assert proto is not None and proto.transport is not None
    redis_server.kill()
    proto.transport.close()
    with pytest.raises(RedisConnectionError):
        proto.send(cmd("PING"), 1, 1.0)
    with pytest.raises(RedisConnectionError):
        await wire.execute([cmd("PING")])


async def test_a_dead_redis_is_one_shared_connect_attempt_and_a_connection_error(
    redis_server: RedisServer,
) -> None:
    wire = WireClient(_spec(redis_server.url))
    redis_server.kill()
    results = await asyncio.gather(
        *(wire.execute([cmd("PING")]) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    # The calls that found no connection waited on one attempt, not one each in turn.
    assert wire.connect_attempts == 1
    redis_server.start()
    assert await wire.execute([cmd("PING")]) == [b"PONG"]
    assert (wire.connect_attempts, wire.connects) == (2, 1)
    await wire.close()


async def test_the_handshake_authenticates_and_selects_the_db() -> None:
    with RedisServer(password="s3cret") as server:
        url = server.url.replace("unix://", "unix://:s3cret@") + "?db=3"
        wire = WireClient(_spec(url))
        try:
            assert await wire.execute([cmd("SET", "k", "v")]) == [b"OK"]
        finally:
            await wire.close()
        async with Redis.from_url(url) as raw:
            assert await raw.get("k") == b"v"
        bad = WireClient(_spec(url.replace("s3cret", "wrong")))
        with pytest.raises(AuthenticationError):
            await bad.execute([cmd("PING")])
        await bad.close()


# -- through the store ----------------------------------------------------------------------------


async def test_the_store_survives_a_reset_connection_without_an_error(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="before")])
    await raw.client_kill_filter(_type="normal")
    # The runner resends once on a fresh connection (scripts are safe to run twice).
    [res] = await queue.enqueue([make_request(clock, queue_id="after")])
    assert res.created or res.request.queue_id == "after"
    st = await queue.status("after")
    assert st is not None and st.queue_id == "after"


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "scripts"])
async def test_the_store_reloads_scripts_after_a_flush(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, functions: bool
) -> None:
    queue = await make_queue(functions=functions)
    loads = queue.script_loads
    await raw.function_flush()
    await raw.script_flush()
    results = await asyncio.gather(
        *(queue.enqueue([make_request(clock, queue_id=f"q{i}")]) for i in range(20))
    )
    assert all(r.created for [r] in results)
    # One reload for the whole batch that met NOSCRIPT, not one per call.
    assert queue.script_loads == loads + 1


def _count_sends(
    monkeypatch: pytest.MonkeyPatch, lose_replies: Exception | None = None
) -> list[int]:
    """From now on, the commands of each write on the lean connection, one entry per write.

    lose_replies: Redis runs each write, then its reply is lost with this error and the
    connection goes (a reset, or the protocol's timer giving up), so a resend needs a new one.
    """
    real_send = WireClient.send
    sends: list[int] = []

    def counted(self: WireClient, commands: Any) -> asyncio.Future[list[Any]] | None:
        sent = real_send(self, commands)
        if sent is None:
            return None
        sends.append(len(commands))
        if lose_replies is None:
            return sent
        lost: asyncio.Future[list[Any]] = sent.get_loop().create_future()

        def drop(_: object) -> None:
            self.drop()
            lost.set_exception(lose_replies)

        sent.add_done_callback(drop)
        return lost

    monkeypatch.setattr(WireClient, "send", counted)
    return sends


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "scripts"])
async def test_a_lone_call_after_a_flush_reloads_and_is_stored_once(
    make_queue: QueueFactory,
    clock: FakeClock,
    raw: Redis,
    functions: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One call at a time is written at the end of its pass, with no task (ScriptRunner._flush);
    its reply (function not found, or NOSCRIPT) hands it to a task that loads the scripts, then
    sends it again: two writes of the call in all, not a second failed one before the load."""
    queue = await make_queue(functions=functions)
    await queue.enqueue([make_request(clock, queue_id="warm")])  # the connection is open
    sends = _count_sends(monkeypatch)
    loads = queue.script_loads
    await raw.function_flush()
    await raw.script_flush()
    [res] = await queue.enqueue([make_request(clock, queue_id="after-flush")])
    assert res.created and res.request.queue_id == "after-flush"
    assert queue.script_loads == loads + 1
    assert sends == [1, 1]
    stats = await queue.stats()
    assert (stats.accepted, stats.queued) == (2, 2)


async def test_a_lone_call_on_a_lost_connection_is_resent_once_and_no_more(
    make_queue: QueueFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every reply lost: the lone write and its one retry, then a connection error (kind
    connection), never a third send."""
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="warm")])
    lost = RedisConnectionError("connection dropped before the reply")
    sends = _count_sends(monkeypatch, lose_replies=lost)
    with pytest.raises(BackendUnavailable) as info:
        await queue.status("warm")
    assert info.value.details == {"kind": "connection"}
    assert sends == [1, 1]
    monkeypatch.undo()
    st = await queue.status("warm")  # and the next call connects afresh
    assert st is not None and st.queue_id == "warm"


async def test_a_lone_call_that_times_out_is_never_sent_again(
    make_queue: QueueFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timed-out write may still run once Redis answers: it fails as unavailable (timeout),
    the caller answers from the local queue, and it is never resent. Redis runs the call; the
    protocol then gives up on its reply, as its timer does (WireClient drops the connection)."""
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="warm")])  # the connection is open
    late = RedisTimeoutError("timeout reading from redis")
    sends = _count_sends(monkeypatch, lose_replies=late)
    with pytest.raises(BackendUnavailable) as info:
        await queue.status("warm")
    assert info.value.details == {"kind": "timeout"}
    assert sends == [1]
    monkeypatch.undo()
    st = await queue.status("warm")
    assert st is not None and st.queue_id == "warm"


async def test_close_sends_the_calls_of_its_pass_and_waits_for_their_replies(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="warm")])
    assert await queue.status("warm") is not None  # the connection open, no task left
    runner = queue._runner
    keys = queue._script_keys + queue._req("warm")
    assert runner.wire is not None and not runner._tasks
    connects = runner.wire.connects
    made = runner.call("status", keys, (clock(), queue.retention_s, "warm"))
    await runner.close()  # in the same pass: the call is neither lost nor left waiting
    assert made.done() and made.result()[0] == 0
    # It went out on the open connection before close dropped it, not on a new one after.
    assert runner.wire.connects == connects
    with pytest.raises(BackendUnavailable):
        runner.call("status", keys, (clock(), queue.retention_s, "warm"))


@pytest.mark.parametrize("functions", [True, False])
def test_the_runner_encodes_its_fixed_keys_once_to_the_same_bytes(functions: bool) -> None:
    keys = RedisKeys.for_prefix("sidecar").script_keys()
    client = Redis.from_url("unix:///tmp/never-connected.sock")
    cached = ScriptRunner(client, structlog.get_logger(), fixed_keys=keys, functions=functions)
    plain = ScriptRunner(client, structlog.get_logger(), functions=functions)
    unused: Any = None  # _encode never touches the call's future
    calls = [
        ScriptCall("complete", (*keys, "{sidecar}:req:a"), (1.5, 600.0, "a", "lease", "1"), unused),
        ScriptCall("stats", keys, (1.5, 600.0, 500), unused),
        ScriptCall("status", ("other", "keys"), (1.5, 600.0, "a"), unused),
    ]
    for call in calls:
        name = FUNCTION_NAMES[call.script] if functions else SCRIPT_SHAS[call.script]
        head = ("FCALL" if functions else "EVALSHA", name)
        want = encode_command((*head, len(call.keys), *call.keys, *call.args))
        assert cached._encode(call) == plain._encode(call) == want
