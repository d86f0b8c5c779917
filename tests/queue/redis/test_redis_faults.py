"""RedisQueue when Redis misbehaves: timeouts, kills, pauses, OOM, replicas, bad setup, secrets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest
import structlog
from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.config import Settings
from sidecar.errors import BackendUnavailable
from sidecar.models import QueueStatus
from sidecar.queue.redis import RedisQueue, translate_error, unavailable_kind
from sidecar.queue.redis.keys import FUNCTION_NAMES
from sidecar.queue.redis.scripts import missing_script
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (
    RedisServer,
    redis_queue_for,
    redis_server_fixture,  # noqa: F401 (imported for its fixture, `redis_server`)
)
from tests.support.stores import open_redis_queue

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

RETENTION_S = 600.0
LEASE_S = 30.0
TIMEOUT_S = 0.3
# Generous against TIMEOUT_S: the claim is "about the timeout, not a minute", not precision.
BOUND_S = 5.0


@pytest.fixture(params=[True, False], ids=["functions", "scripts"])
async def queue(
    redis_server: RedisServer, clock: FakeClock, request: pytest.FixtureRequest
) -> AsyncIterator[RedisQueue]:
    """The store on a real server, its scripts run as Functions, then as plain scripts."""
    q = redis_queue_for(
        redis_server.url, clock, retention_s=RETENTION_S, timeout_s=TIMEOUT_S,
        sweep_interval_s=None, functions=request.param,
    )  # fmt: skip
    await q.start()
    yield q
    await q.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_retried_enqueue_after_a_timeout_leaves_one_copy(
    redis_server: RedisServer, queue: RedisQueue, clock: FakeClock, raw: Redis
) -> None:
    req = make_request(clock, queue_id="exactly-once")
    redis_server.pause()
    try:
        with pytest.raises(BackendUnavailable) as info:
            await queue.enqueue([req])
        assert info.value.details["kind"] == "timeout"
        assert isinstance(info.value.__cause__, RedisTimeoutError)
    finally:
        redis_server.resume()
    # The timed-out write sat in the socket buffer and runs once the server is back; the
    # client cannot know that, so it retries.
    [res] = await queue.enqueue([req])
    assert res.request.queue_id == "exactly-once"
    stats = await queue.stats()
    assert (stats.accepted, stats.queued) == (1, 1)
    assert await raw.zcard(queue.keys.pending) == 1
    [job] = await queue.dequeue(5, LEASE_S)
    assert job.queue_id == "exactly-once"
    assert await queue.dequeue(5, LEASE_S) == []


@pytest.mark.slow
async def test_paused_redis_raises_backend_unavailable_quickly(
    redis_server: RedisServer, queue: RedisQueue, clock: FakeClock
) -> None:
    await queue.enqueue([make_request(clock, queue_id="a")])
    redis_server.pause()
    try:
        for call in (
            lambda: queue.enqueue([make_request(clock)]),
            lambda: queue.dequeue(1, LEASE_S),
            lambda: queue.status("a"),
            queue.stats,
        ):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await call()
            assert time.monotonic() - started < BOUND_S
        started = time.monotonic()
        report = await queue.health()
        assert report.status == "unhealthy" and report.mode == "redis"
        assert time.monotonic() - started < BOUND_S
    finally:
        redis_server.resume()
    st = await queue.status("a")
    assert st is not None and st.status is QueueStatus.QUEUED


async def test_killed_redis_raises_then_a_restart_reloads_the_scripts(
    redis_server: RedisServer, queue: RedisQueue, clock: FakeClock
) -> None:
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await queue.enqueue([make_request(clock)])
    assert time.monotonic() - started < BOUND_S
    assert info.value.details["kind"] == "connection"
    assert isinstance(info.value.__cause__, RedisConnectionError)
    assert (await queue.health()).status == "unhealthy"
    # Without persistence the server comes back empty: no scripts, so NOSCRIPT, then a reload.
    redis_server.start()
    loads = queue.script_loads
    [res] = await queue.enqueue([make_request(clock, queue_id="after")])
    assert res.created
    assert queue.script_loads == loads + 1
    assert (await queue.health()).status == "ok"


async def test_out_of_memory_is_backend_unavailable_and_stores_nothing(
    queue: RedisQueue, clock: FakeClock, raw: Redis
) -> None:
    await raw.set("ballast", b"x" * 3_000_000)
    await raw.config_set("maxmemory", "1mb")
    with pytest.raises(BackendUnavailable) as info:
        await queue.enqueue([make_request(clock, i) for i in range(3)])
    assert info.value.details["kind"] == "out_of_memory"
    assert isinstance(info.value.__cause__, OutOfMemoryError)
    stats = await queue.stats()
    assert (stats.accepted, stats.queued) == (0, 0)
    await raw.config_set("maxmemory", "0")
    [res] = await queue.enqueue([make_request(clock)])
    assert res.created


async def test_a_full_redis_refuses_enqueues_but_still_drains(
    queue: RedisQueue, clock: FakeClock, raw: Redis
) -> None:
    """Past maxmemory only what adds is refused: leases, settles and reads still run, so the
    workers can empty a full Redis (its functions carry allow-oom; enqueue does not)."""
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("a", "b")])
    [first] = await queue.dequeue(1, LEASE_S)
    await raw.set("ballast", b"x" * 3_000_000)
    await raw.config_set("maxmemory", "1mb")
    try:
        with pytest.raises(BackendUnavailable) as info:
            await queue.enqueue([make_request(clock, queue_id="c")])
        assert info.value.details["kind"] == "out_of_memory"
        done = await queue.complete(first.queue_id, first.lease_id or "")
        assert done.status is QueueStatus.COMPLETED
        [second] = await queue.dequeue(1, LEASE_S)
        assert second.queue_id == "b"
        await queue.complete(second.queue_id, second.lease_id or "")
        stats = await queue.stats()
        assert (stats.queued, stats.processing, stats.completed) == (0, 0, 2)
    finally:
        await raw.config_set("maxmemory", "0")
    assert await queue.status("c") is None


async def test_read_only_replica_and_master_down_are_backend_unavailable(
    queue: RedisQueue, clock: FakeClock, raw: Redis
) -> None:
    await queue.enqueue([make_request(clock, queue_id="kept")])
    # A replica of a master that is not there (a closed loopback port): writes are refused.
    await raw.replicaof("127.0.0.1", 1)
    try:
        with pytest.raises(BackendUnavailable) as info:
            await queue.enqueue([make_request(clock)])
        assert info.value.details["kind"] == "read_only"
        assert isinstance(info.value.__cause__, ReadOnlyError)
        await raw.config_set("replica-serve-stale-data", "no")
        with pytest.raises(BackendUnavailable) as info:
            await queue.status("kept")
        # A function that may write is refused on any replica (READONLY) before the stale
        # check; a plain script runs until its first write, so the stale check answers first.
        stale = "read_only" if queue.uses_functions else "master_down"
        assert info.value.details["kind"] == stale
    finally:
        await raw.replicaof("NO", "ONE")
    st = await queue.status("kept")
    assert st is not None and st.status is QueueStatus.QUEUED


async def test_a_server_without_functions_runs_the_plain_scripts(clock: FakeClock) -> None:
    """Before Redis 7 there is no FUNCTION: the store loads the scripts and calls EVALSHA. A
    server with FUNCTION and FCALL renamed away answers as such a server does."""
    hidden = ("--rename-command", "FUNCTION", "", "--rename-command", "FCALL", "")
    with RedisServer(extra_args=hidden) as server:
        queue = redis_queue_for(server.url, clock, retention_s=RETENTION_S, sweep_interval_s=None)
        await queue.start()
        raw = Redis.from_url(server.url)
        try:
            assert not queue.uses_functions
            [res] = await queue.enqueue([make_request(clock, queue_id="old")])
            assert res.created
            [job] = await queue.dequeue(1, LEASE_S)
            assert (await queue.complete(job.queue_id, job.lease_id or "")).status is (
                QueueStatus.COMPLETED
            )
            # What a failover to such a server answers a function call: missing, so reload.
            with pytest.raises(ResponseError) as info:
                await raw.fcall(FUNCTION_NAMES["status"], 0)
            assert missing_script(info.value)
        finally:
            await raw.aclose()
            await queue.close()


async def test_a_full_redis_that_lost_the_library_runs_the_plain_scripts(
    redis_server: RedisServer, clock: FakeClock, raw: Redis
) -> None:
    """Past maxmemory FUNCTION LOAD is refused (OOM) and SCRIPT LOAD is not: a Redis that lost
    the library while full (an operator's FUNCTION FLUSH, a cluster node given the slot empty)
    still answers reads and settles, through the plain scripts."""
    queue = redis_queue_for(redis_server.url, clock, retention_s=RETENTION_S, sweep_interval_s=None)
    await queue.start()
    try:
        assert queue.uses_functions
        await queue.enqueue([make_request(clock, queue_id=q) for q in ("a", "b")])
        [job] = await queue.dequeue(1, LEASE_S)
        await raw.set("ballast", b"x" * 3_000_000)
        await raw.config_set("maxmemory", "1mb")
        await raw.function_flush()
        done = await queue.complete(job.queue_id, job.lease_id or "")
        assert done.status is QueueStatus.COMPLETED
        assert not queue.uses_functions
        st = await queue.status("b")
        assert st is not None and st.status is QueueStatus.QUEUED
    finally:
        await raw.config_set("maxmemory", "0")
        await queue.close()


async def test_a_user_the_acl_denies_functions_gets_the_plain_scripts(
    redis_server: RedisServer, clock: FakeClock, raw: Redis
) -> None:
    await raw.acl_setuser(
        "sc", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-function"]
    )
    url = redis_server.url.replace("unix://", "unix://sc:pw@")
    queue = redis_queue_for(url, clock, retention_s=RETENTION_S, sweep_interval_s=None)
    with structlog.testing.capture_logs() as logs:
        await queue.start()
    try:
        assert not queue.uses_functions
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "redis_functions_refused"
        ]
        [res] = await queue.enqueue([make_request(clock, queue_id="acl")])
        assert res.created
        st = await queue.status("acl")
        assert st is not None and st.status is QueueStatus.QUEUED
    finally:
        await queue.close()


async def test_eviction_policy_other_than_noeviction_is_reported(clock: FakeClock) -> None:
    with RedisServer(maxmemory_policy="allkeys-lru") as server:
        with structlog.testing.capture_logs() as logs:
            queue = await open_redis_queue(Settings(redis_url=server.url), clock=clock)
        try:
            stats = await queue.stats()
            assert len(stats.warnings) == 1 and "allkeys-lru" in stats.warnings[0]
            report = await queue.health()
            assert report.status == "degraded"
            assert report.mode == "redis"
            assert report.reasons == stats.warnings
        finally:
            await queue.close()
    [event] = [e for e in logs if e["event"] == "redis_eviction_policy_unsafe"]
    assert event["log_level"] == "warning"
    assert event["maxmemory_policy"] == "allkeys-lru"


async def test_noeviction_gives_no_warning(redis_server: RedisServer, clock: FakeClock) -> None:
    queue = await open_redis_queue(Settings(redis_url=redis_server.url), clock=clock)
    try:
        assert (await queue.stats()).warnings == []
        assert (await queue.health()).status == "ok"
    finally:
        await queue.close()


async def test_password_from_file_works_and_never_reaches_the_logs(
    tmp_path: Path, clock: FakeClock
) -> None:
    secret = "s3cret-Pa55word"
    with RedisServer(password=secret) as server:
        pw_file = tmp_path / "redis-password"
        pw_file.write_text(secret + "\n")
        with_file = Settings(redis_url=server.url, redis_password_file=str(pw_file))
        in_url = Settings(redis_url=f"unix://:{secret}@{server.socket_path}")
        with structlog.testing.capture_logs() as logs:
            for settings in (with_file, in_url):
                queue = await open_redis_queue(settings, clock=clock)
                [res] = await queue.enqueue([make_request(clock)])
                assert res.created
                await queue.close()
            with pytest.raises(BackendUnavailable) as info:
                await open_redis_queue(Settings(redis_url=server.url), clock=clock)
    assert info.value.details["kind"] in ("authentication", "connection")
    assert secret not in info.value.message
    assert logs, "the queue logged its start"
    assert all(secret not in repr(event) for event in logs)


async def test_start_raises_backend_unavailable_when_redis_is_absent(tmp_path: Path) -> None:
    settings = Settings(redis_url=f"unix://{tmp_path}/none.sock", redis_connect_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await open_redis_queue(settings)
    assert time.monotonic() - started < BOUND_S


# -- injected faults on fakeredis, and the error table --------------------------------------------


@pytest.mark.parametrize("functions", [True, False], ids=["functions", "scripts"])
async def test_a_flush_of_the_scripts_reloads_them_once(clock: FakeClock, functions: bool) -> None:
    queue = RedisQueue(
        fakeredis.FakeAsyncRedis(), retention_s=RETENTION_S, clock=clock,
        check_eviction_policy=False, sweep_interval_s=None, functions=functions,
    )  # fmt: skip
    await queue.start()
    try:
        await queue.enqueue([make_request(clock, queue_id="one")])
        await queue._redis.function_flush()
        await queue._redis.script_flush()
        loads = queue.script_loads
        st = await queue.status("one")
        assert st is not None and st.status is QueueStatus.QUEUED
        assert queue.script_loads == loads + 1
    finally:
        await queue.close()


async def test_lost_connection_fails_every_waiting_call(clock: FakeClock) -> None:
    server = fakeredis.FakeServer()
    queue = RedisQueue(
        fakeredis.FakeAsyncRedis(server=server), retention_s=RETENTION_S, clock=clock,
        check_eviction_policy=False, sweep_interval_s=None,
    )  # fmt: skip
    await queue.start()
    try:
        server.connected = False
        with pytest.raises(BackendUnavailable) as info:
            await queue.dequeue(1, LEASE_S)
        assert info.value.details["kind"] == "connection"
        server.connected = True
        assert await queue.dequeue(1, LEASE_S) == []
    finally:
        await queue.close()


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (RedisTimeoutError("Timeout reading from socket"), "timeout"),
        (RedisConnectionError("Connection refused"), "connection"),
        (BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
        (ReadOnlyError("You can't write against a read only replica."), "read_only"),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "out_of_memory"),
        (MasterDownError("Link with MASTER is down"), "master_down"),
        (ResponseError("MASTERDOWN Link with MASTER is down"), "master_down"),
        (ResponseError("BUSY Redis is busy running a script."), "busy"),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), None),
        (ResponseError("user_script:1: attempt to compare nil with number"), None),
    ],
)
def test_unavailability_kinds(exc: Exception, kind: str | None) -> None:
    assert unavailable_kind(exc) == kind
    translated = translate_error(exc)
    if kind is None:
        assert translated is exc
    else:
        assert isinstance(translated, BackendUnavailable)
        assert translated.__cause__ is exc
        assert translated.details == {"kind": kind}


async def test_a_watch_error_that_is_no_outage_wakes_long_polls_and_is_logged_once(
    redis_server: RedisServer, raw: Redis
) -> None:
    # An ACL that denies ZCARD (the watcher's look at the queue) but not the scripts: the
    # watcher must go on, wake the long polls to look for themselves, and say why once, not
    # end with an exception nobody reads (the long polls would then sleep their whole wait).
    await raw.acl_setuser(
        "sc", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-zcard"]
    )
    url = redis_server.url.replace("unix://", "unix://sc:pw@")
    queue = redis_queue_for(
        url, time.time, retention_s=RETENTION_S, sweep_interval_s=None, poll_interval_s=0.05
    )
    await queue.start()
    try:
        with structlog.testing.capture_logs() as logs:
            # Bounded well below the wait asked for: only a wake-up ends it in time.
            for _ in range(3):
                await asyncio.wait_for(queue.wait_for_work(60.0), 10.0)
        refused = [e for e in logs if e["event"] == "redis_watch_failed"]
        assert len(refused) == 1 and refused[0]["log_level"] == "warning"
        assert "permission" in refused[0]["error"]
        # Allowed again, the watcher says so on its next look (which finds the queued one).
        with structlog.testing.capture_logs() as logs:
            await raw.acl_setuser("sc", enabled=True, commands=["+zcard"])
            await queue.enqueue([make_request(time.time)])  # nobody waits: nothing notified
            await asyncio.wait_for(queue.wait_for_work(60.0), 10.0)
        assert [e["event"] for e in logs] == ["redis_watch_recovered"]
    finally:
        await queue.close()
