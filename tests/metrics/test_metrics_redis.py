"""The metrics of real daemons backed by a real redis-server: shared gauges, failover, two hosts."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from collections.abc import Iterator

import pytest

from sidecar.client import Client
from sidecar.metrics import DaemonMetrics
from sidecar.models import QueueStatus
from sidecar.queue.base import new_request
from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.support.helpers import FakeClock
from tests.support.metrics_scrape import Samples, promtool, samples, scrape, value, wait_scrape
from tests.support.redis_server import (
    QueueFactory,
    RedisServer,
    make_queue_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
)

SHARED = {"scope": "shared", "store": "redis"}


@pytest.fixture
def redis_daemon() -> Iterator[tuple[Daemon, RedisServer]]:
    with RedisServer() as server, short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        daemon = Daemon(sock, daemon_env(sock, REDIS_URL=server.url, SIDECAR_METRICS_ADDR=":0"))
        daemon.start()
        try:
            yield daemon, server
        finally:
            daemon.stop()


@pytest.mark.slow
def test_redis_queue_gauges_are_shared_and_its_events_counted(
    redis_daemon: tuple[Daemon, RedisServer],
) -> None:
    daemon, _ = redis_daemon
    with Client(daemon.socket_path) as c:
        for priority in (2, 2, 8):
            c.enqueue({"p": priority}, priority=priority, max_attempts=5)
        text = scrape(daemon)
        assert value(text, "sidecar_mode", mode="redis") == 1
        assert value(text, "sidecar_queue_requests", status="queued", **SHARED) == 3
        assert value(text, "sidecar_queue_ready_requests", priority="2", **SHARED) == 2
        assert value(text, "sidecar_queue_ready_requests", priority="8", **SHARED) == 1
        assert value(text, "sidecar_queue_requests", status="queued", scope="host") == 0
        assert value(text, "sidecar_queue_oldest_queued_age_seconds", **SHARED) > 0
        [job] = c.dequeue(1)
        c.fail(job.queue_id, job.lease_id, "try later", retry=True)
        [job] = c.dequeue(1)
        c.fail(job.queue_id, job.lease_id, "no", retry=False)
        c.cancel(c.enqueue({"x": 1}).queue_id)
        c.enqueue({"x": 2}, ttl_s=0.2)
        c.dequeue(1, lease_s=0.2)  # lapses: the sweep (or the scrape's sweep step) requeues it
        text = wait_scrape(
            daemon,
            lambda t: value(t, "sidecar_expiries_total", store="redis") >= 1
            and value(t, "sidecar_retries_total", store="redis", reason="lease_expired") >= 1,
            "the Redis sweep's expiry and lease lapse are counted",
        )
    assert value(text, "sidecar_retries_total", store="redis", reason="worker_retry") == 1
    assert value(text, "sidecar_failures_total", store="redis", reason="worker_failed") == 1
    assert value(text, "sidecar_failures_total", store="redis", reason="cancelled") == 1
    assert value(text, "sidecar_first_lease_wait_seconds_count", store="redis") == 2
    assert value(text, "sidecar_queue_events_total", event="accepted", **SHARED) == 5
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_failover_recovery_and_data_loss_are_counted(
    redis_daemon: tuple[Daemon, RedisServer],
) -> None:
    daemon, server = redis_daemon
    server.kill()
    with Client(daemon.socket_path) as c:
        c.enqueue({"during": "outage"})  # fails over inside this call
        text = wait_scrape(
            daemon,
            lambda t: value(t, "sidecar_degraded_seconds_total") > 0,
            "degraded seconds grow during the outage",
        )
        assert value(text, "sidecar_mode", mode="local_fallback") == 1
        assert value(text, "sidecar_failovers_total") == 1
        assert value(text, "sidecar_handover_backlog_requests") == 1
        assert value(text, "sidecar_queue_requests", status="queued", scope="host") == 1
        # Redis comes back empty (no persistence): its generation marker is gone.
        server.restart()
        text = wait_scrape(
            daemon,
            # The counter moves just after the backlog empties (once the move is on disk).
            lambda t: value(t, "sidecar_recoveries_total") == 1
            and value(t, "sidecar_handover_backlog_requests") == 0
            and value(t, "sidecar_handover_moved_total") == 1,
            "the daemon recovers and moves its backlog",
        )
    assert value(text, "sidecar_mode", mode="redis") == 1
    assert value(text, "sidecar_handover_moved_total") == 1
    assert value(text, "sidecar_redis_data_loss_detections_total") == 1
    assert value(text, "sidecar_queue_requests", status="queued", **SHARED) == 1


# -- the documented PromQL over two hosts ------------------------------------------------------


def with_instance(scrapes: dict[str, str]) -> Samples:
    """All hosts' samples, each with its `instance` label, as Prometheus stores them."""
    out: Samples = {}
    for instance, text in scrapes.items():
        for (name, labels), v in samples(text).items():
            out[(name, labels | {("instance", instance)})] = v
    return out


def max_without_instance(found: Samples, name: str, **match: str) -> Samples:
    """`max without (instance) (name{match})`."""
    groups: dict[tuple[str, frozenset[tuple[str, str]]], float] = defaultdict(lambda: -1e300)
    for (n, labels), v in found.items():
        if n == name and set(match.items()) <= labels:
            key = (n, frozenset(kv for kv in labels if kv[0] != "instance"))
            groups[key] = max(groups[key], v)
    return dict(groups)


@pytest.mark.slow
def test_documented_promql_gives_the_true_totals_over_two_daemons() -> None:
    with RedisServer() as server, short_tmpdir() as tmp:
        daemons = []
        for name in ("a", "b"):
            sock = str(tmp / f"{name}.sock")
            env = daemon_env(sock, REDIS_URL=server.url, SIDECAR_METRICS_ADDR=":0")
            daemons.append(Daemon(sock, env).start())
        try:
            a, b = daemons
            with Client(a.socket_path) as ca, Client(b.socket_path) as cb:
                for n in range(3):
                    ca.enqueue({"n": n})
                for n in range(2):
                    cb.enqueue({"n": n})
                ca.dequeue(2)
                cb.dequeue(1)
            found = with_instance({"a": scrape(a), "b": scrape(b)})
        finally:
            assert [d.stop() for d in daemons] == [0, 0]
    # Shared gauges: one host's value (README: max without (instance)); a plain sum doubles them.
    assert value(found, "sidecar_queue_requests", status="queued", **SHARED) == 4  # naive: x2
    shared = max_without_instance(found, "sidecar_queue_requests", scope="shared")
    host = {k: v for k, v in found.items() if k[0] == "sidecar_queue_requests"
            and ("scope", "host") in k[1]}  # fmt: skip
    total = {**shared, **host}
    assert value(total, "sidecar_queue_requests", status="queued") == 2
    assert value(total, "sidecar_queue_requests", status="processing") == 3
    books = max_without_instance(found, "sidecar_queue_events_total", scope="shared")
    assert value(books, "sidecar_queue_events_total", event="accepted") == 5
    # Per-host counters: the plain sum over hosts.
    assert value(found, "sidecar_first_lease_wait_seconds_count") == 3


async def test_what_a_dequeue_does_on_the_way_is_counted_per_host(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    # No sweeper: the lapsed lease and the elapsed TTL are met only by the next dequeue, which
    # applies them inline; its reply says so, so this host's counters see them too.
    m = DaemonMetrics(version="test", high_watermark=0.8, low_watermark=0.6)
    queue = await make_queue(hooks=m)
    make = [new_request(payload=b"\x80", priority=p, ttl_s=ttl, max_attempts=1, now=clock())
            for p, ttl in ((0, 60.0), (1, 60.0), (2, 5.0))]  # fmt: skip
    await queue.enqueue(make)
    [held] = await queue.dequeue(1, lease_s=10.0)
    clock.advance(11.0)  # its lease lapses with no attempt left; the third one's TTL ends
    [second] = await queue.dequeue(3, lease_s=10.0)
    assert second.queue_id == make[1].queue_id and held.queue_id == make[0].queue_id
    text = (await m.render()).decode()
    assert value(text, "sidecar_failures_total", store="redis", reason="attempts_exhausted") == 1
    assert value(text, "sidecar_expiries_total", store="redis", reason="ttl_elapsed") == 1
    assert (await queue.status(make[2].queue_id)).status is QueueStatus.EXPIRED  # type: ignore[union-attr]


async def test_a_repeated_settle_is_counted_once(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    # A client's retry (or a resent pipeline) of the same fail answers the same record; the
    # change happened once, so the counters move once.
    m = DaemonMetrics(version="test", high_watermark=0.8, low_watermark=0.6)
    queue = await make_queue(hooks=m)
    made = [new_request(payload=b"\x80", priority=5, ttl_s=60.0, max_attempts=3, now=clock())
            for _ in range(2)]  # fmt: skip
    await queue.enqueue(made)
    [job] = await queue.dequeue(1, lease_s=10.0)
    for _ in range(2):
        await queue.fail(job.queue_id, job.lease_id or "", "busy", retry=True)
    text = (await m.render()).decode()
    assert value(text, "sidecar_retries_total", store="redis", reason="worker_retry") == 1
