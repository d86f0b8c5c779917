"""The real daemon on Redis under issue 7's unlucky settings: a retention of 0, and an eviction
policy changed while it runs. What a client sees, and that the daemon and other clients go on.
"""

from __future__ import annotations

import pytest
from redis import Redis

from sidecar.client import Client
from sidecar.errors import NotFound
from tests.daemon.test_daemon_redis import assert_books, wait_for
from tests.support.daemon import running_daemon
from tests.support.redis_server import RedisServer

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

# The daemon re-reads the policy every watch interval (1 s); generous for a loaded machine.
POLICY_DEADLINE_S = 15.0


def test_settles_with_retention_zero_answer_what_happened() -> None:
    with (
        RedisServer() as server,
        running_daemon(REDIS_URL=server.url, QUEUE_RETENTION_HOURS="0") as d,
        Client(d.socket_path) as c,
        Client(d.socket_path) as other,
    ):
        ids = [c.enqueue({"n": i}).queue_id for i in range(4)]
        jobs = {j.queue_id: j for j in c.dequeue(3)}
        done, failed, again = (jobs[q] for q in ids[:3])
        assert c.complete(done.queue_id, done.lease_id).status == "completed"
        info = c.fail(failed.queue_id, failed.lease_id, "bad prompt", retry=False)
        assert (info.status, info.reason) == ("failed", "bad prompt")
        assert c.fail(again.queue_id, again.lease_id, "503", retry=True).status == "queued"
        assert c.cancel(ids[3]).status == "failed"
        # The settling reply was the last sight of them; asking again is an ordinary not_found.
        with pytest.raises(NotFound):
            c.status(done.queue_id)
        with pytest.raises(NotFound):
            c.complete(done.queue_id, done.lease_id)
        # Another client, and this one, carry on.
        [job] = other.dequeue()
        assert job.queue_id == again.queue_id
        assert other.complete(job.queue_id, job.lease_id).status == "completed"
        assert_books(c.stats(), accepted=4, completed=2, failed=2, queued=0, processing=0)
    assert d.events("op_failed") == []  # how the daemon logs what it answers internal_error
    assert not [line for line in d.stderr_lines if "Traceback" in line]


def test_an_eviction_policy_changed_while_serving_shows_in_health() -> None:
    with (
        RedisServer() as server,
        running_daemon(REDIS_URL=server.url) as d,
        Client(d.socket_path) as c,
    ):
        assert c.health().status == "ok"
        admin = Redis(unix_socket_path=str(server.socket_path))
        try:
            admin.config_set("maxmemory-policy", "allkeys-lru")
            health = wait_for(
                lambda: h if (h := c.health()).status == "degraded" else None,
                POLICY_DEADLINE_S,
                "health degraded after the policy changed",
            )
            assert health.mode == "redis"
            assert any("allkeys-lru" in r for r in health.reasons), health
            assert any("allkeys-lru" in w for w in c.stats().warnings)
            assert c.cancel(c.enqueue("still served").queue_id).status == "failed"
            admin.config_set("maxmemory-policy", "noeviction")
            wait_for(
                lambda: True if c.health().status == "ok" else None,
                POLICY_DEADLINE_S,
                "health ok again after the policy was restored",
            )
        finally:
            admin.close()
    [unsafe] = d.events("redis_eviction_policy_unsafe")
    assert (unsafe["maxmemory_policy"], unsafe["previous"]) == ("allkeys-lru", "noeviction")
    [safe] = d.events("redis_eviction_policy_safe")
    assert safe["previous"] == "allkeys-lru"
