"""Sentinel: the daemon finds the primary through real sentinels and follows a failover.

One primary, one replica and three sentinels on loopback; producers and workers through the
real daemon; the replica's link cut, then the primary SIGKILLed under load, so the replica
promoted lacks the primary's last writes: without WAIT, acknowledged enqueues are lost (the
figure is reported); with REDIS_MIN_REPLICAS_ACK=1 none is. The counts (acknowledged, found,
completed, lost, settled twice, the time without a primary) are printed and kept as test
properties.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio.sentinel import MasterNotFoundError, SlaveNotFoundError

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import BackendUnavailable
from sidecar.queue.redis import redis_client, translate_error, unavailable_kind
from tests.support.crash import back_on_redis, check, load_then
from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.support.helpers import make_request
from tests.support.redis_topology import (
    LAYOUT_TIMEOUT_S,
    MASTER_NAME,
    SentinelLayout,
    free_port,
    wait_until,
)
from tests.support.stores import open_redis_queue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

RECOVERY_TIMEOUT_S = 40.0


def test_sentinel_errors_count_as_unavailable() -> None:
    assert unavailable_kind(MasterNotFoundError("No master found for 'q'")) == "no_primary"
    assert unavailable_kind(SlaveNotFoundError("No slave found for 'q'")) == "no_replica"


def test_no_primary_names_the_master_but_no_sentinel_host() -> None:
    # redis-py appends each sentinel that failed to answer, host and port included.
    exc = MasterNotFoundError(
        "No master found for 'orders' : Sentinel<host=10.1.2.3,port=26379> - "
        "ConnectionError('Error 111 connecting to 10.1.2.3:26379. Connection refused.')"
    )
    err = translate_error(exc)
    assert isinstance(err, BackendUnavailable) and err.details == {"kind": "no_primary"}
    assert err.message == (
        "redis unavailable (no_primary: no sentinel names a live primary for 'orders')"
    )


async def test_no_sentinel_answers_is_redis_down_not_a_crash() -> None:
    # Nobody listens on these ports: the start fails as "unavailable", which the failover
    # manager turns into "serve locally and probe".
    dead = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    settings = Settings(
        redis_sentinels=dead, redis_sentinel_master=MASTER_NAME, redis_connect_timeout_s=0.2
    )
    with pytest.raises(BackendUnavailable) as info:
        await open_redis_queue(settings)
    assert info.value.details["kind"] in ("no_primary", "connection")


def test_sentinels_are_asked_once_each_without_backoff() -> None:
    # redis-py retries each sentinel three times with backoff by default: a start with no
    # sentinel answering took 16 s instead of failing over to the local queue at once.
    settings = Settings(redis_sentinels="127.0.0.1:1,127.0.0.1:2", redis_sentinel_master="q")
    client = redis_client(settings)
    manager = client.connection_pool.sentinel_manager  # type: ignore[union-attr]
    assert [s.get_retry().get_retries() for s in manager.sentinels] == [0, 0]
    # The primary's connections keep their one immediate retry of a connection error.
    assert client.get_retry().get_retries() == 1  # type: ignore[union-attr]


async def test_queue_through_sentinel_url_reaches_the_primary() -> None:
    with SentinelLayout() as layout:
        url = f"redis+sentinel://{layout.addresses}/{MASTER_NAME}/0"
        queue = await open_redis_queue(Settings(redis_url=url))
        try:
            [res] = await queue.enqueue([make_request(time.time)])
            assert res.created
            # It is on the primary the sentinels name, and replicated from there.
            assert layout.primary.info("keyspace").get("db0", "").startswith("keys=")
            assert (await queue.health()).status == "ok"
        finally:
            await queue.close()


@pytest.mark.slow
@pytest.mark.parametrize("min_replicas_ack", [1, 0])
async def test_primary_killed_under_load_daemon_follows_the_new_primary(
    min_replicas_ack: int, record_property: Any
) -> None:
    with SentinelLayout() as layout, short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        env = daemon_env(
            sock,
            REDIS_SENTINELS=layout.addresses,
            REDIS_SENTINEL_MASTER=MASTER_NAME,
            REDIS_MIN_REPLICAS_ACK=str(min_replicas_ack),
            # A lease cut short by the outage comes back within the test's time.
            QUEUE_LEASE_SECONDS="3",
        )
        daemon = Daemon(sock, env).start()
        timings: dict[str, float] = {}

        def kill_and_follow() -> None:
            # The replica stops hearing the primary; writes go on for a moment (acknowledged
            # at once without WAIT; refused by WAIT 1 and answered locally with it), then the
            # primary dies and the replica, which never got them, is promoted.
            assert layout.replica is not None
            cut = layout.cut_replication()
            if min_replicas_ack:
                daemon.wait_for_event("redis_down", timeout=LAYOUT_TIMEOUT_S)
            else:
                wait_until(
                    "writes after the cut", lambda: layout.primary_offset() > cut + 20_000 or None
                )
            old = layout.kill_primary()
            killed_at = time.monotonic()
            layout.replica.resume()
            new = layout.wait_for_new_primary(old)
            timings["no_primary_s"] = time.monotonic() - killed_at
            # The old primary's host comes back as a replica of the new one, so WAIT 1 can
            # be met again and the daemon can hand its local backlog back.
            layout.rejoin_killed_as_replica(new)

        try:
            ledger = await load_then(
                sock, kill_and_follow, acked_at_least=300, completed_at_least=100
            )
            async with AsyncClient(sock, timeout_s=10.0) as client:
                after = await back_on_redis(client, RECOVERY_TIMEOUT_S)
            outcome = await check(sock, ledger)
        finally:
            daemon.stop()
    counts = {
        "min_replicas_ack": min_replicas_ack,
        "acknowledged": outcome.acked,
        "found": outcome.acked - len(outcome.lost),
        "completed": outcome.completed,
        "lost": len(outcome.lost),
        "completion_lost": len(outcome.completion_lost),
        "settled_twice": len(outcome.settled_twice),
        "no_primary_s": round(timings["no_primary_s"], 2),
        **after,
    }
    for key, value in counts.items():
        record_property(key, value)
    print("sentinel failover:", counts)
    assert after["failovers"] >= 1, "the daemon never noticed the primary die"
    assert daemon.events("redis_recovered"), "the daemon never came back to Redis"
    if min_replicas_ack >= 1:
        assert outcome.lost == [], f"acknowledged after WAIT 1, then lost: {outcome.lost[:5]}"
