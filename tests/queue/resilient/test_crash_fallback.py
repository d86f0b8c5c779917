"""Crash tests of the failover mode through the real daemon (issue 8): Redis down, or coming
back, while the daemon dies. Each counts acknowledged against found after a restart with
Redis up: lost must be 0 and no acknowledged completion may be handed out again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.support.crash import check, load_then
from tests.support.daemon import Daemon, running_daemon
from tests.support.redis_server import RedisServer

# Each test starts the daemon twice and a redis-server, and loads them: slow on a busy host.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:  # AOF: a restarted server keeps its data
        yield server


def fallback_env(redis: RedisServer) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "REDIS_TIMEOUT_SECONDS": "0.3",
        "REDIS_CONNECT_TIMEOUT_SECONDS": "0.3",
        "QUEUE_LEASE_SECONDS": "1",
        "QUEUE_MAX_SIZE": "100000",
    }


def restart_with_redis(daemon: Daemon, redis: RedisServer) -> None:
    if not redis.running:
        redis.restart()
    daemon.start()


async def test_sigkill_with_redis_down_loses_nothing(redis: RedisServer) -> None:
    with running_daemon(**fallback_env(redis)) as daemon:
        redis.kill()
        ledger = await load_then(
            daemon.socket_path, daemon.kill, acked_at_least=400, completed_at_least=100
        )
        restart_with_redis(daemon, redis)
        outcome = await check(daemon.socket_path, ledger)
    print(f"acked={outcome.acked} completed={outcome.completed} lost={len(outcome.lost)}")
    assert outcome.lost == [] and outcome.completion_lost == [] and outcome.settled_twice == []


@pytest.mark.parametrize(("event", "count"), [("redis_recovered", 1), ("backlog_moved", 1),
                                              ("backlog_moved", 5)])  # fmt: skip
async def test_sigkill_during_the_hand_over_to_redis(
    redis: RedisServer, event: str, count: int
) -> None:
    with running_daemon(**fallback_env(redis)) as daemon:
        redis.kill()

        def kill_mid_hand_over() -> None:
            redis.restart()
            daemon.wait_for_event(event, count)
            daemon.kill()

        ledger = await load_then(
            daemon.socket_path,
            kill_mid_hand_over,
            acked_at_least=1500,
            completed_at_least=50,
            workers=1,  # a backlog of many batches, so the kill lands inside the move
        )
        moved_before_kill = len(daemon.events("backlog_moved"))
        restart_with_redis(daemon, redis)
        outcome = await check(daemon.socket_path, ledger)
    print(
        f"kill after {count}x {event}: batches moved before the kill={moved_before_kill} "
        f"acked={outcome.acked} lost={len(outcome.lost)} twice={len(outcome.settled_twice)}"
    )
    assert outcome.lost == [] and outcome.completion_lost == [] and outcome.settled_twice == []


async def test_sigterm_with_redis_down_keeps_everything_on_disk(redis: RedisServer) -> None:
    with running_daemon(**fallback_env(redis)) as daemon:
        redis.kill()
        ledger = await load_then(
            daemon.socket_path,
            lambda: daemon.stop(signal.SIGTERM),
            acked_at_least=400,
            completed_at_least=50,
        )
        assert daemon.proc is not None and daemon.proc.returncode == 0
        assert daemon.events("stopped")[-1]["unkept"] == 0
        restart_with_redis(daemon, redis)
        outcome = await check(daemon.socket_path, ledger)
    assert outcome.lost == [] and outcome.completion_lost == [] and outcome.settled_twice == []


async def test_sigterm_right_after_redis_came_back(redis: RedisServer) -> None:
    with running_daemon(**fallback_env(redis)) as daemon:
        redis.kill()

        def back_then_stop() -> None:
            redis.restart()
            daemon.stop(signal.SIGTERM)  # the probe may not have noticed yet: close probes once

        ledger = await load_then(
            daemon.socket_path, back_then_stop, acked_at_least=400, completed_at_least=50
        )
        assert daemon.proc is not None and daemon.proc.returncode == 0
        handed_over = len(daemon.events("backlog_moved"))
        restart_with_redis(daemon, redis)
        outcome = await check(daemon.socket_path, ledger)
    print(f"batches handed over at stop={handed_over} acked={outcome.acked}")
    assert handed_over >= 1  # the stop used the Redis that had just come back
    assert outcome.lost == [] and outcome.completion_lost == [] and outcome.settled_twice == []
