"""ResilientQueue's probe under a flapping Redis, and which limits its stats put beside totals.

Issue 7, items 16 and 14. The flap is injected (Redis answers the probe's small write but
refuses every batch, as one at its memory limit does), on a real redis-server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from sidecar.errors import BackendUnavailable
from sidecar.models import EnqueueOutcome, QueuedRequest
from sidecar.queue.local import LocalQueue
from sidecar.queue.resilient import PROBE_SUCCESSES, ResilientQueue
from tests.support.helpers import make_request
from tests.support.redis_server import RedisServer, redis_queue_for

PROBE_MAX_S = 0.1
WAIT_S = 20.0


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def build(server: RedisServer, *, max_items: int = 10_000) -> ResilientQueue:
    redis = redis_queue_for(server.url, time.time, retention_s=600, timeout_s=0.3)
    local = LocalQueue(
        max_items=max_items, max_bytes=10**9, high_watermark=0.8, low_watermark=0.6,
        retention_s=600, clock=time.time,
    )  # fmt: skip
    # An hour between repeated log lines: the verdict cannot depend on this machine's speed.
    return ResilientQueue(
        redis, local, probe_initial_s=0.01, probe_max_s=PROBE_MAX_S, log_repeat_s=3600
    )


@pytest.fixture
async def queue(server: RedisServer) -> AsyncIterator[ResilientQueue]:
    q = build(server)
    await q.start()
    try:
        yield q
    finally:
        await q.close()


def out_of_memory() -> BackendUnavailable:
    return BackendUnavailable("redis unavailable (out_of_memory)", {"kind": "out_of_memory"})


async def test_recovery_needs_two_probe_writes_in_a_row(
    queue: ResilientQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_probe = queue.redis.probe
    outcomes = iter([True, False, True, True])  # one success, a failure, then two in a row
    calls: list[bool] = []

    async def scripted_probe() -> None:
        ok = next(outcomes, True)
        calls.append(ok)
        if not ok:
            raise out_of_memory()
        await real_probe()

    monkeypatch.setattr(queue.redis, "probe", scripted_probe)
    queue.failover.mark_down(out_of_memory(), "test")
    await queue.wait_until(lambda: queue.redis_up, WAIT_S)
    assert PROBE_SUCCESSES == 2
    assert calls == [True, False, True, True]
    assert queue.failover.recoveries == 1


async def test_the_probe_keeps_the_reason_current_and_logs_each_new_one_once(
    queue: ResilientQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover's stages, as the probe meets them: health follows; a line per new reason."""
    no_primary = BackendUnavailable("redis unavailable (no_primary)", {"kind": "no_primary"})
    short = BackendUnavailable("redis replicas did not confirm the write (0 of 1 confirmed)",
                               {"kind": "replicas"})  # fmt: skip
    stages = iter([no_primary, no_primary, short, no_primary, short, short])
    seen: list[str] = []
    real_probe = queue.redis.probe

    async def scripted_probe() -> None:
        err = next(stages, None)
        if err is not None:
            raise err
        seen.append(str(queue.failover.down_reason))
        await real_probe()

    monkeypatch.setattr(queue.redis, "probe", scripted_probe)
    with structlog.testing.capture_logs() as logs:
        queue.failover.mark_down(out_of_memory(), "test")
        await queue.wait_until(lambda: queue.redis_up, WAIT_S)
    # The last reason stood until Redis served again.
    assert seen[0] == short.message
    down = [(e["op"], e["error"]) for e in logs
            if e["event"] == "redis_down" and e["log_level"] == "warning"]  # fmt: skip
    # The line that marked it down, then each new reason once (a repeat within the interval
    # goes out at debug level only).
    assert down == [
        ("test", out_of_memory().message),
        ("probe", no_primary.message),
        ("probe", short.message),
    ]
    assert (await queue.health()).reasons == []


@pytest.mark.slow
async def test_a_redis_that_refuses_every_batch_is_not_flapped_and_logged_each_time(
    queue: ResilientQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(requests: list[QueuedRequest], **_: object) -> list[EnqueueOutcome]:
        raise out_of_memory()

    probes = 0
    enough = asyncio.Event()
    real_probe = queue.redis.probe

    async def counting_probe() -> None:
        nonlocal probes
        probes += 1
        if probes >= 12:
            enough.set()
        await real_probe()

    monkeypatch.setattr(queue.redis, "enqueue", refuse)
    monkeypatch.setattr(queue.redis, "probe", counting_probe)
    with structlog.testing.capture_logs() as logs:
        [res] = await queue.enqueue([make_request(time.time, queue_id="held")])
        assert res.created and queue.mode == "local_fallback"
        await asyncio.wait_for(enough.wait(), WAIT_S)
        # Every recovery moved the backlog, met the refusal and went down again (a flap).
        flaps = queue.failover.recoveries
    # Two successful writes per recovery, and the backoff kept from one flap to the next.
    assert 1 <= flaps <= probes // 2
    assert queue.failover.probe_delay_s == PROBE_MAX_S
    down = [e for e in logs if e["event"] == "redis_down" and e["log_level"] == "warning"]
    up = [e for e in logs if e["event"] == "redis_recovered" and e["log_level"] == "info"]
    assert (len(down), len(up)) == (1, 1)
    skipped = [e for e in logs if e["event"] == "redis_down" and e["log_level"] == "debug"]
    assert len(skipped) >= flaps - 1
    # Nothing was lost meanwhile: the request reads queued from the batch being moved.
    st = await queue.status("held")
    assert st is not None and st.status.value == "queued"


async def test_a_batch_refused_for_a_reason_that_is_no_outage_stays_local_and_is_logged(
    queue: ResilientQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal that is no outage (an ACL without a command): logged, never left in a task."""
    from redis.exceptions import NoPermissionError

    refused = asyncio.Event()

    async def no_permission(requests: list[QueuedRequest], **_: object) -> list[EnqueueOutcome]:
        refused.set()
        raise NoPermissionError("NOPERM this user has no permissions to run the 'fcall' command")

    monkeypatch.setattr(queue.redis, "enqueue", no_permission)
    queue.failover.mark_down(out_of_memory(), "test")
    await queue.enqueue([make_request(time.time, queue_id="kept")])
    with structlog.testing.capture_logs() as logs:
        await queue.wait_until(lambda: queue.redis_up, WAIT_S)
        await asyncio.wait_for(refused.wait(), WAIT_S)
        await queue.wait_until(lambda: not queue.local.moving, WAIT_S)
    failed = [e for e in logs if e["event"] == "backlog_move_failed"]
    assert len(failed) == 1 and "NOPERM" in failed[0]["error"]
    st = await queue.status("kept")
    assert st is not None and st.status.value == "queued"
    assert queue.local.holds("kept")


async def test_stats_put_no_local_limit_beside_redis_totals(server: RedisServer) -> None:
    queue = build(server, max_items=10)
    await queue.start()
    try:
        await queue.enqueue([make_request(time.time, i) for i in range(12)])
        stats = await queue.stats()
        assert (stats.items, stats.mode) == (12, "redis")
        assert (stats.max_items, stats.max_bytes, stats.usage) == (None, None, 0.0)
        local, redis = stats.stores["local"], stats.stores["redis"]
        assert (local.max_items, local.items) == (10, 0)
        assert (redis.max_items, redis.max_bytes, redis.items) == (None, None, 12)
        # Redis away: the totals are the local store's alone, so its limits apply to them.
        server.kill()
        await queue.enqueue([make_request(time.time, queue_id="local-1")])
        stats = await queue.stats()
        assert (stats.mode, stats.items) == ("local_fallback", 1)
        assert stats.max_items == 10
        assert stats.usage == pytest.approx(0.1)
        assert "redis" not in stats.stores
    finally:
        await queue.close()
