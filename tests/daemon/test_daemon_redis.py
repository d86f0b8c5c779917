"""The real daemon with REDIS_URL set, on redis-servers these tests start themselves.

The local-mode suite (tests/daemon/test_daemon.py) runs here again against a daemon backed by Redis:
its tests are imported by name, so pytest collects them in this module and resolves their
`daemon` fixture here. The few that assert local-only details have Redis-mode versions below.
Then what only Redis gives: durability across daemon and Redis restarts, two daemons sharing
one queue, the eviction-policy check, and credentials that never reach the logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.client import AsyncClient, Client, decode_payload
from sidecar.protocol import Job, StatsResult
from tests.daemon import test_daemon as local_suite
from tests.support.daemon import (
    Daemon,
    daemon_env,
    running_daemon,
    serve_expecting_refusal,
    short_tmpdir,
)
from tests.support.redis_server import RedisServer

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

T = TypeVar("T")

cli = local_suite.cli
# How long a daemon may take to notice that Redis is back (its probe backs off to 2 s).
RECOVERY_DEADLINE_S = 15.0


def wait_for(check: Callable[[], T | None], deadline_s: float, what: str) -> T:
    """Repeat `check` (each call a real request to the daemon) until it returns a value."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        time.sleep(0.02)  # a bounded pause between two real polls, not a wait for an outcome


def assert_books(stats: StatsResult, **expected: int) -> None:
    """The combined books balance and hold the expected counts."""
    assert stats.balanced, stats
    got = {name: getattr(stats, name) for name in expected}
    assert got == expected, stats


# -- the local-mode suite, with REDIS_URL set ---------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """One daemon on one redis-server for the imported suite; checks Redis served it all."""
    with (
        RedisServer() as server,
        running_daemon(REDIS_URL=server.url, QUEUE_LEASE_SECONDS="30") as d,
    ):
        yield d
        # Every imported test must have run on Redis, not quietly on the local fallback.
        with Client(d.socket_path) as c:
            stats = c.stats()
        assert stats.mode == "redis" and stats.failovers == 0, stats
        assert stats.stores["local"].accepted == 0, stats
        assert stats.stores["redis"].accepted > 0 and stats.balanced, stats


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.socket_path) as c:
        yield c


# These run unchanged: each asserts nothing that depends on the store behind the daemon.
test_every_op_through_the_async_client = local_suite.test_every_op_through_the_async_client
test_errors_arrive_as_typed_exceptions = local_suite.test_errors_arrive_as_typed_exceptions
test_batch_enqueue_and_batch_dequeue = local_suite.test_batch_enqueue_and_batch_dequeue
test_complete_next_settles_and_leases_in_one_request = (
    local_suite.test_complete_next_settles_and_leases_in_one_request
)
test_complete_many_settles_each_lease_on_its_own_and_leases_more = (
    local_suite.test_complete_many_settles_each_lease_on_its_own_and_leases_more
)
test_idempotent_enqueue_over_the_wire = local_suite.test_idempotent_enqueue_over_the_wire
test_many_tasks_share_one_connection = local_suite.test_many_tasks_share_one_connection
test_long_poll_dequeue_wakes_on_enqueue = local_suite.test_long_poll_dequeue_wakes_on_enqueue
test_long_poll_returns_empty_after_its_wait = (
    local_suite.test_long_poll_returns_empty_after_its_wait
)
test_worker_helper_completes_and_fails = local_suite.test_worker_helper_completes_and_fails
test_sync_client_round_trip = local_suite.test_sync_client_round_trip
test_cli_every_command = local_suite.test_cli_every_command
test_socket_file_mode_is_0660 = local_suite.test_socket_file_mode_is_0660
# Not imported: the unreachable-daemon tests start no daemon, so Redis changes nothing for
# them; local-mode degraded health (the watermark) has its Redis counterpart in the
# eviction-policy test below; restarts and stale sockets are covered by the durability tests.


@pytest.fixture(scope="module")
def expected_mode() -> str:
    return "redis"


test_hello_reports_version_and_limits = local_suite.test_hello_reports_version_and_limits


def test_cli_health_and_stats(daemon: Daemon) -> None:
    health = cli(daemon, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.startswith("ok: mode=redis")
    as_json = json.loads(cli(daemon, "health", "--json").stdout)
    assert (as_json["status"], as_json["mode"], as_json["reasons"]) == ("ok", "redis", [])
    table = cli(daemon, "stats").stdout
    assert "breaker_open" in table and "balanced" in table and "failovers" in table
    rows = dict(row.split(maxsplit=1) for row in table.splitlines())
    assert (rows["mode"], rows["stores"]) == ("redis", "local, redis")
    stats = json.loads(cli(daemon, "stats", "--json").stdout)
    assert (stats["store"], stats["mode"], stats["warnings"]) == ("resilient", "redis", [])
    assert set(stats["stores"]) == {"redis", "local"}
    assert stats["stores"]["redis"]["store"] == "redis"
    assert stats["stores"]["local"]["store"] == "local"


def test_second_daemon_on_a_live_socket_refuses(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        q = c.enqueue("must survive a refused second daemon")
        # The same environment, so the refused daemon also connects to the shared Redis;
        # its own state folder, so the socket (not the journal's lock) is what refuses it.
        with short_tmpdir() as own_state:
            proc = serve_expecting_refusal({**daemon.env, "SIDECAR_STATE_DIR": str(own_state)})
        assert proc.returncode == 1
        assert "another sidecar is already serving" in proc.stderr
        assert c.health().status == "ok"
        assert c.status(q.queue_id).status == "queued"
        assert c.cancel(q.queue_id).status == "failed"  # leaves the shared queue empty


# -- durability -----------------------------------------------------------------------------------


def enqueue_mixed(c: Client, n: int, tag: str) -> list[tuple[int, int, str, dict[str, Any]]]:
    """Enqueue n requests one by one with mixed priorities; (priority, arrival, id, payload)."""
    sent = []
    for i in range(n):
        payload = {"tag": tag, "i": i, "prompt": f"request {i}", "nested": [i, {"k": "v" * i}]}
        priority = (i * 7) % 9  # 0..8, interleaved so arrival order differs from priority
        res = c.enqueue(payload, priority=priority)
        assert res.created and res.status == "queued"
        sent.append((priority, i, res.queue_id, payload))
    return sent


def drain(c: Client, expected: int) -> list[Job]:
    """Lease everything queued, a few at a time (order must hold across calls too)."""
    jobs: list[Job] = []
    while len(jobs) < expected:
        batch = c.dequeue(7)
        assert batch, f"queue ran dry after {len(jobs)} of {expected}"
        jobs += batch
    assert c.dequeue(5) == []
    return jobs


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_requests_survive_a_daemon_restart_in_order(how: signal.Signals) -> None:
    n = 50
    with RedisServer(appendonly=True) as server, short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        env = daemon_env(sock, REDIS_URL=server.url)
        first = Daemon(sock, env).start()
        try:
            with Client(sock) as c:
                sent = enqueue_mixed(c, n, "restart")
        finally:
            code = first.stop(how)
        assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)

        second = Daemon(sock, env).start()  # SIGKILL left a stale socket file: replaced
        try:
            with Client(sock) as c:
                assert c.hello().mode == "redis"
                assert all(c.status(qid).status == "queued" for _, _, qid, _ in sent)
                assert_books(c.stats(), accepted=n, queued=n)
                jobs = drain(c, n)
                expected = sorted(sent)  # priority first, then arrival
                assert [j.queue_id for j in jobs] == [qid for _, _, qid, _ in expected]
                assert [decode_payload(j) for j in jobs] == [p for _, _, _, p in expected]
                assert [j.priority for j in jobs] == [p for p, _, _, _ in expected]
                for job in jobs:
                    assert c.complete(job.queue_id, job.lease_id).status == "completed"
                assert_books(c.stats(), accepted=n, queued=0, processing=0, completed=n)
        finally:
            assert second.stop() == 0


def test_requests_survive_a_redis_kill_and_restart_with_aof() -> None:
    n, during = 30, 5
    with (
        RedisServer(appendonly=True) as server,
        running_daemon(REDIS_URL=server.url) as d,
        Client(d.socket_path) as c,
    ):
        sent = enqueue_mixed(c, n, "aof")
        server.kill()
        # While Redis is away the daemon answers from its local queue, inside the call.
        outage = [c.enqueue({"during": i}, priority=9).queue_id for i in range(during)]
        health = c.health()
        assert (health.status, health.mode) == ("degraded", "local_fallback")
        assert "redis unavailable" in health.reasons[0]

        server.start()  # same folder: the AOF is replayed

        def recovered() -> bool | None:
            h = c.health()
            if (h.status, h.mode) != ("ok", "redis"):
                return None
            redis = c.stats().stores.get("redis")
            return True if redis is not None and redis.queued == n + during else None

        wait_for(recovered, RECOVERY_DEADLINE_S, "health ok on redis with the backlog moved")
        stats = c.stats()
        assert (stats.failovers, stats.recoveries, stats.redis_data_lost) == (1, 1, 0)
        assert stats.warnings == [] and stats.stores["local"].queued == 0
        jobs = drain(c, n + during)
        # The survivors in priority-then-arrival order; then the outage's requests
        # (priority 9, behind every survivor), in the order they arrived.
        assert [j.queue_id for j in jobs] == [qid for _, _, qid, _ in sorted(sent)] + outage
        assert [decode_payload(j) for j in jobs[:n]] == [p for _, _, _, p in sorted(sent)]
        for job in jobs:
            c.complete(job.queue_id, job.lease_id)
        assert_books(c.stats(), queued=0, processing=0, completed=n + during)


# -- two daemons, one queue ---------------------------------------------------------------------


async def test_two_daemons_share_one_queue_and_complete_each_request_once() -> None:
    total, workers_per_daemon = 500, 4
    with RedisServer() as server, short_tmpdir() as tmp:
        socks = [str(tmp / "a.sock"), str(tmp / "b.sock")]
        daemons = [Daemon(s, daemon_env(s, REDIS_URL=server.url)).start() for s in socks]
        try:
            handouts: Counter[str] = Counter()
            completions: Counter[str] = Counter()
            served: Counter[str] = Counter()
            enqueued: list[str] = []

            async def produce(path: str, start: int) -> None:
                async with AsyncClient(path) as c:
                    mine = range(start, total, 2)
                    for at in range(0, len(mine), 25):
                        chunk = mine[at : at + 25]
                        results = await asyncio.gather(
                            *(c.enqueue({"n": i}, priority=i % 10) for i in chunk)
                        )
                        enqueued.extend(r.queue_id for r in results)

            async def work(path: str) -> None:
                async with AsyncClient(path) as c:
                    while sum(completions.values()) < total:
                        for job in await c.dequeue(4, wait_s=0.2):
                            handouts[job.queue_id] += 1
                            served[path] += 1
                            info = await c.complete(job.queue_id, job.lease_id)
                            assert info.status == "completed"
                            completions[job.queue_id] += 1

            async with asyncio.timeout(25):
                await asyncio.gather(
                    *(produce(path, i) for i, path in enumerate(socks)),
                    *(work(path) for path in socks for _ in range(workers_per_daemon)),
                )

            assert len(enqueued) == len(set(enqueued)) == total
            assert set(handouts) == set(enqueued) and set(handouts.values()) == {1}
            assert set(completions) == set(enqueued) and set(completions.values()) == {1}
            assert all(served[path] > 0 for path in socks), served
            for path in socks:
                async with AsyncClient(path) as c:
                    stats = await c.stats()
                assert stats.mode == "redis" and stats.stores["local"].accepted == 0
                assert_books(stats, accepted=total, queued=0, processing=0, completed=total)
        finally:
            assert [d.stop() for d in daemons] == [0, 0]


# -- Redis hygiene, credentials, configuration ---------------------------------------------------


def test_eviction_policy_other_than_noeviction_degrades_health() -> None:
    with (
        RedisServer(maxmemory_policy="allkeys-lru") as server,
        running_daemon(REDIS_URL=server.url) as d,
    ):
        health = cli(d, "health")
        assert health.returncode == 1, health.stdout + health.stderr
        assert health.stdout.startswith("degraded: mode=redis")
        assert "maxmemory-policy is allkeys-lru" in health.stdout
        stats = json.loads(cli(d, "stats", "--json").stdout)
        assert stats["mode"] == "redis"
        assert any("maxmemory-policy is allkeys-lru" in w for w in stats["warnings"])
        [event] = d.events("redis_eviction_policy_unsafe")
        assert event["maxmemory_policy"] == "allkeys-lru"
        # Degraded, not down: it still serves from Redis.
        with Client(d.socket_path) as c:
            q = c.enqueue("still served")
            assert c.stats().stores["redis"].queued == 1
            assert c.cancel(q.queue_id).status == "failed"


SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    "how",
    [
        "url_userinfo",
        "password_file",
        "url_query",
    ],
)
def test_redis_credentials_never_reach_the_logs(how: str) -> None:
    with RedisServer(password=SECRET) as server, short_tmpdir() as tmp:
        env: dict[str, str] = {"REDIS_URL": server.url}
        if how == "url_userinfo":
            env["REDIS_URL"] = f"unix://:{SECRET}@{server.socket_path}"
        elif how == "url_query":
            env["REDIS_URL"] = f"unix://{server.socket_path}?password={SECRET}"
        else:
            pw_file = tmp / "redis-password"
            pw_file.write_text(SECRET + "\n")
            os.chmod(pw_file, 0o600)
            env["REDIS_PASSWORD_FILE"] = str(pw_file)
        with running_daemon(**env) as d:
            with Client(d.socket_path) as c:
                assert c.hello().mode == "redis"
                q = c.enqueue({"authenticated": True})
                assert c.stats().stores["redis"].queued == 1
                [job] = c.dequeue()
                assert job.queue_id == q.queue_id
                c.complete(job.queue_id, job.lease_id)
                # An outage makes the daemon log Redis errors too; they must be clean as well.
                server.kill()
                c.enqueue("during the outage")
                assert c.health().mode == "local_fallback"
            assert d.stop() == 0
        assert d.events("serving") and d.events("redis_down")
        assert [line for line in d.stderr_lines if SECRET in line] == []


def test_unreadable_password_file_is_a_configuration_error() -> None:
    with short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        missing = str(tmp / "no-such-password")
        env = daemon_env(sock, REDIS_URL=f"unix://{tmp}/r.sock", REDIS_PASSWORD_FILE=missing)
        proc = serve_expecting_refusal(env)
        assert not Path(sock).exists()
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"sidecar: configuration error: REDIS_PASSWORD_FILE={missing!r}")
