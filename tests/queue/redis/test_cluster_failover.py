"""Redis Cluster with replicas: the primary of the queue's slot SIGKILLed under load.

Three primaries with one replica each on loopback; producers and workers through the real
daemon with REDIS_MIN_REPLICAS_ACK=1. The replica of the primary that owns the `{sidecar}` slot
is cut off (paused, its link dropped), so it lacks what the primary takes from then on; the
primary is killed while those writes wait on WAIT, the cluster promotes the replica, and the
killed node comes back as the new primary's replica, which lets the daemon return to Redis.
Every enqueue the daemon acknowledged must then be found (0 lost). Completions the dead
primary had not replicated are undone and run again (at-least-once): counted, and each must
come back to a worker. The counts are printed and kept as test properties.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.crc import key_slot

from sidecar.client import AsyncClient
from tests.support.crash import back_on_redis, check, load_then
from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.support.redis_topology import ReplicatedCluster, wait_until

# Real processes under load; about 25 s on an idle machine (the cluster's start included).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

RECOVERY_TIMEOUT_S = 40.0
# The daemon's default key prefix: every key of its queue hashes to this slot.
QUEUE_SLOT = key_slot(b"{sidecar}")


async def test_queue_slot_primary_killed_under_load_loses_no_acknowledged_enqueue(
    record_property: Any,
) -> None:
    with ReplicatedCluster() as cluster, short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        env = daemon_env(
            sock,
            REDIS_URL=cluster.url,
            REDIS_CLUSTER="true",
            REDIS_MIN_REPLICAS_ACK="1",
            # A lease cut short by the outage comes back within the test's time.
            QUEUE_LEASE_SECONDS="3",
        )
        daemon = Daemon(sock, env).start()
        timings: dict[str, float] = {}
        seen: dict[str, int] = {}

        def kill_and_follow() -> None:
            primary = cluster.owner(QUEUE_SLOT)
            replica, cut = cluster.cut_replication(primary)

            def offset() -> int:
                return int(primary.info("replication")["master_repl_offset"])

            # Writes go on past the cut, each enqueue pipeline held in its WAIT 1 (no replica
            # confirms) until the first WAIT times out: the kill lands on them. 1000 bytes is
            # more than one enqueue (a lone probe or dequeue writes less).
            wait_until("writes after the cut", lambda: offset() > cut + 1000 or None)
            seen["written_after_cut_bytes"] = offset() - cut
            primary.kill()
            killed_at = time.monotonic()
            replica.resume()
            new = cluster.wait_for_new_owner(QUEUE_SLOT, primary)
            timings["no_owner_s"] = time.monotonic() - killed_at
            assert new is replica
            # The promoted replica has no replica of its own, so WAIT 1 cannot be met until
            # the killed node is back as its replica and synced (N + 1 replicas for N).
            cluster.rejoin(primary)

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
        "acknowledged": outcome.acked,
        "found": outcome.acked - len(outcome.lost),
        "completed": outcome.completed,
        "lost": len(outcome.lost),
        "completion_lost": len(outcome.completion_lost),
        "settled_twice": len(outcome.settled_twice),
        "no_owner_s": round(timings["no_owner_s"], 2),
        # Refused, never acknowledged: queue_full once the local queue reached its limit.
        "refused": len(ledger.errors),
        **seen,
        **after,
    }
    for key, value in counts.items():
        record_property(key, value)
    reasons = sorted({str(e.get("error") or e.get("key")) for e in daemon.events("redis_down")})
    print("cluster failover:", counts, "redis_down:", reasons)
    assert after["failovers"] >= 1, "the daemon never noticed the primary die"
    assert daemon.events("redis_recovered"), "the daemon never came back to Redis"
    assert outcome.lost == [], f"acknowledged after WAIT 1, then lost: {outcome.lost[:5]}"
    # At-least-once: a completion the dead primary had not replicated is undone, and that
    # request must reach a worker again (not end failed, expired or stuck).
    undone_not_rerun = set(outcome.completion_lost) - set(outcome.settled_twice)
    assert not undone_not_rerun, f"completions undone, never run again: {undone_not_rerun}"
