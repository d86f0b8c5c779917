"""What `health` and the `redis_down` line say through a Sentinel failover.

Real redis-servers and three real sentinels on loopback. The first failed call names what it
met (usually a lost connection to the dead primary); the probe then meets the failover's later
stages, and the reason follows them: `no_primary` while the sentinels name no live primary,
"replicas did not confirm the write" while the new primary has too few replicas for
REDIS_MIN_REPLICAS_ACK. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.config import Settings
from sidecar.queue.build import build_redis_queue
from sidecar.queue.resilient import ResilientQueue
from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_topology import MASTER_NAME, SentinelLayout, cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

# The sentinels mark a primary down after 500 ms (DOWN_AFTER_MS); the probe runs every 0.2 s.
STAGE_TIMEOUT_S = 20.0
# A failover the sentinels aborted (no replica to promote) is tried again after 4 s.
RECOVERY_TIMEOUT_S = 40.0


async def _resilient(
    layout: SentinelLayout, clock: FakeClock, tmp_path: Path, min_replicas_ack: int
) -> ResilientQueue:
    settings = Settings(
        redis_sentinels=layout.addresses,
        redis_sentinel_master=MASTER_NAME,
        redis_min_replicas_ack=min_replicas_ack,
        redis_replicas_ack_timeout_ms=100,
    )
    redis = build_redis_queue(settings, clock=clock)
    queue = ResilientQueue(redis, make_local(clock, tmp_path / "state"), probe_max_s=0.2)
    await queue.start()
    assert queue.mode == "redis"
    return queue


def _reason_has(queue: ResilientQueue, words: str) -> bool:
    return words in (queue.failover.down_reason or "")


def _down_lines(
    logs: Sequence[MutableMapping[str, Any]], words: str
) -> list[MutableMapping[str, Any]]:
    return [
        e
        for e in logs
        if e["event"] == "redis_down" and e["log_level"] == "warning" and words in e["error"]
    ]


def _sentinel_flags(port: int) -> str:
    fields = cli(port, "SENTINEL", "master", MASTER_NAME).splitlines()
    return dict(zip(fields[::2], fields[1::2], strict=False))["flags"]


async def test_health_names_no_primary_while_the_sentinels_know_none(
    clock: FakeClock, tmp_path: Path
) -> None:
    with SentinelLayout() as layout:
        queue = await _resilient(layout, clock, tmp_path, min_replicas_ack=0)
        try:
            assert layout.replica is not None
            # The election held open: the only replica is frozen, so once the sentinels mark
            # the primary down they can promote nobody, and name no primary until it resumes.
            layout.replica.pause()
            old = layout.kill_primary()
            with structlog.testing.capture_logs() as logs:
                [res] = await queue.enqueue([make_request(clock)])
                assert res.created and queue.mode == "local_fallback"
                await queue.wait_until(lambda: _reason_has(queue, "no_primary"), STAGE_TIMEOUT_S)
                health = await queue.health()
            # Read while every sentinel holds the primary down: no live primary is named.
            assert all("s_down" in _sentinel_flags(s.port) for s in layout.sentinels)
            assert (health.status, health.mode) == ("degraded", "local_fallback")
            assert health.reasons[0] == (
                "redis unavailable (no_primary: no sentinel names a live primary for "
                f"'{MASTER_NAME}'); serving from local queue"
            ), health
            assert _down_lines(logs, "no_primary"), "no redis_down line names no_primary"
            # The election ends: the replica is promoted and the daemon serves from it.
            layout.replica.resume()
            await asyncio.to_thread(layout.wait_for_new_primary, old)
            await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
            assert (await queue.health()).reasons == []
        finally:
            await queue.close()


async def test_health_says_replicas_did_not_confirm_while_the_new_primary_has_none(
    clock: FakeClock, tmp_path: Path
) -> None:
    with SentinelLayout() as layout:
        queue = await _resilient(layout, clock, tmp_path, min_replicas_ack=1)
        try:
            old = layout.kill_primary()
            with structlog.testing.capture_logs() as logs:
                [res] = await queue.enqueue([make_request(clock)])
                assert res.created and queue.mode == "local_fallback"
                # The only replica is promoted: writes succeed on it, but WAIT 1 answers 0.
                new = await asyncio.to_thread(layout.wait_for_new_primary, old)
                await queue.wait_until(
                    lambda: _reason_has(queue, "replicas did not confirm"), STAGE_TIMEOUT_S
                )
                health = await queue.health()
            assert cli(new, "ROLE").splitlines()[0] == "master"
            assert "connected_slaves:0" in cli(new, "INFO", "replication")
            assert (health.status, health.mode) == ("degraded", "local_fallback")
            assert health.reasons[0] == (
                "redis replicas did not confirm the write (0 of 1 confirmed); "
                "serving from local queue"
            ), health
            assert _down_lines(logs, "0 of 1 confirmed"), "no redis_down line names the counts"
            # A replica syncs to the new primary: WAIT 1 is met and the backlog moves back.
            await asyncio.to_thread(layout.rejoin_killed_as_replica, new)
            await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
            assert (await queue.health()).reasons == []
        finally:
            await queue.close()
