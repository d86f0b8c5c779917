"""The tunables that were module constants take effect when set.

The failover manager's probe (backoff, successes in a row, flap window) on a real
redis-server; through the real daemon, the hand-over batch, and the long poll's and the
generation watch's pace (counted in Redis's own commandstats); the journal's compaction bound.
(test_config_table.py checks that app.py passes each setting into its component.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sidecar.client import Client
from sidecar.errors import BackendUnavailable
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.resilient import ResilientQueue
from tests.support.daemon import running_daemon
from tests.support.helpers import make_request
from tests.support.redis_server import RedisServer, redis_queue_for

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

WAIT_S = 20.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def build(server: RedisServer, **options: float) -> ResilientQueue:
    redis = redis_queue_for(server.url, time.time, retention_s=600, timeout_s=0.3)
    local = LocalQueue(
        max_items=1000, max_bytes=10**8, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=time.time,
    )  # fmt: skip
    return ResilientQueue(redis, local, log_repeat_s=3600, **options)  # type: ignore[arg-type]


def out_of_memory() -> BackendUnavailable:
    return BackendUnavailable("redis unavailable (out_of_memory)", {"kind": "out_of_memory"})


async def test_the_probe_doubles_its_wait_from_the_initial_one_up_to_the_maximum(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = build(server, probe_initial_s=0.01, probe_max_s=0.04)
    await queue.start()
    waited: list[float] = []
    enough = asyncio.Event()
    real_probe = queue.redis.probe

    async def recording_probe() -> None:
        waited.append(queue.failover.probe_delay_s)  # the wait that came before this probe
        if len(waited) >= 5:
            enough.set()
        await real_probe()

    monkeypatch.setattr(queue.redis, "probe", recording_probe)
    try:
        server.kill()
        [res] = await queue.enqueue([make_request(time.time, queue_id="during")])
        assert res.created and queue.mode == "local_fallback"
        await asyncio.wait_for(enough.wait(), WAIT_S)
        assert waited[:5] == [0.01, 0.02, 0.04, 0.04, 0.04]
    finally:
        await queue.close(0)


@pytest.mark.parametrize("needed", [1, 3])
async def test_recovery_takes_the_configured_probe_successes_in_a_row(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch, needed: int
) -> None:
    queue = build(server, probe_initial_s=0.01, probe_max_s=0.02, probe_successes=needed)
    await queue.start()
    real_probe = queue.redis.probe
    outcomes = iter([True, False, *([True] * needed)])
    calls: list[bool] = []

    async def scripted_probe() -> None:
        ok = next(outcomes, True)
        calls.append(ok)
        if not ok:
            raise out_of_memory()
        await real_probe()

    monkeypatch.setattr(queue.redis, "probe", scripted_probe)
    try:
        queue.failover.mark_down(out_of_memory(), "test")
        await queue.wait_until(lambda: queue.redis_up, WAIT_S)
        # One success is enough alone: then the first probe already brought Redis back.
        assert calls == ([True] if needed == 1 else [True, False, True, True, True])
        assert queue.failover.recoveries == 1
    finally:
        await queue.close(0)


@pytest.mark.parametrize(("window_s", "next_wait_s"), [(3600.0, 0.02), (0.0, 0.01)])
async def test_a_failure_inside_the_flap_window_keeps_the_backoff(
    server: RedisServer, window_s: float, next_wait_s: float
) -> None:
    queue = build(server, probe_initial_s=0.01, probe_max_s=1.0, flap_window_s=window_s)
    await queue.start()
    try:
        queue.failover.mark_down(out_of_memory(), "test")
        await queue.wait_until(lambda: queue.redis_up, WAIT_S)  # a recovery, just now
        queue.failover.mark_down(out_of_memory(), "test")
        # Inside the window it is a flap: the wait doubles; outside, it starts again.
        assert queue.failover.probe_delay_s == next_wait_s
    finally:
        await queue.close(0)


def test_the_daemon_hands_its_backlog_over_in_batches_of_the_setting() -> None:
    with RedisServer() as server:
        server.kill()  # the daemon starts on the local queue
        with running_daemon(
            REDIS_URL=server.url,
            REDIS_HANDOVER_BATCH="7",
            REDIS_PROBE_INITIAL_SECONDS="0.05",
            REDIS_PROBE_MAX_SECONDS="0.2",
        ) as daemon, Client(daemon.socket_path) as client:
            ids = [client.enqueue({"n": i}, queue_id=f"h{i}").queue_id for i in range(20)]
            assert client.stats().mode == "local_fallback"
            server.start()
            daemon.wait_for_event("backlog_moved", count=3)
            moved = [e["count"] for e in daemon.events("backlog_moved")]
            assert moved == [7, 7, 6]
            stats = client.stats()
            assert stats.mode == "redis" and stats.stores["redis"].queued == 20, stats
            assert all(client.status(i).status == "queued" for i in ids)


def _calls(server: RedisServer, command: str) -> int:
    """How many times Redis has run `command` so far (its own INFO commandstats)."""
    with redis.Redis.from_url(server.url) as admin:
        stats = admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _count_during_long_poll(command: str, wait_s: float, **env: str) -> tuple[int, float, int]:
    """Calls of `command` while the real daemon long-polls an empty queue, the wait, and how
    many named queues the daemon serves (each has its own Redis store, watch and sweep)."""
    with (
        RedisServer() as server,
        running_daemon(REDIS_URL=server.url, **env) as daemon,
        Client(daemon.socket_path) as client,
    ):
        queues = len(client.hello().queues)
        before = _calls(server, command)
        began = time.monotonic()
        assert client.dequeue(1, wait_s=wait_s) == []
        waited = time.monotonic() - began
        return _calls(server, command) - before, waited, queues


def test_a_long_poll_looks_at_redis_no_more_often_than_the_poll_interval() -> None:
    # Only the long poll's watcher sends ZCOUNT (on an empty pending set).
    polls, waited, _ = _count_during_long_poll(
        "zcount", 2.0, REDIS_POLL_INTERVAL_SECONDS="0.5"
    )
    # The watcher sleeps a whole interval before each look, whatever the machine's speed: at
    # the default 0.2 s this wait would have taken about ten.
    assert 1 <= polls <= waited / 0.5, (polls, waited)


@pytest.mark.parametrize("interval_s", [0.25, 60.0])
def test_the_generation_watch_runs_at_its_interval(interval_s: float) -> None:
    # Only the watch (and the start, before this count) GETs the generation marker.
    checks, waited, queues = _count_during_long_poll(
        "get", 2.0, REDIS_WATCH_INTERVAL_SECONDS=str(interval_s)
    )
    # Each queue's watch never more often than the interval (the default 1 s would check about
    # twice in a minute's setting); and it does run when the interval is shorter than the wait.
    assert queues == 3
    assert checks <= queues * waited / interval_s, (checks, waited)
    if interval_s < waited:
        assert checks >= 1, (checks, waited)


def test_the_journal_compacts_at_the_setting_capped_by_a_quarter_of_its_disk(
    tmp_path: Path,
) -> None:
    gib = 1024**3
    assert Journal(tmp_path, max_bytes=gib, compact_max_bytes=8192).compact_bytes == 8192
    assert Journal(tmp_path, max_bytes=64 * 1024, compact_max_bytes=gib).compact_bytes == 16384
    # An explicit threshold (the tests' seam) still wins.
    assert Journal(tmp_path, compact_bytes=4096, compact_max_bytes=gib).compact_bytes == 4096
