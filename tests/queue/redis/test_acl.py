"""The daemon as a least-privilege Redis user (GitHub issue 24, item 4).

The ACL is the one line docs/operations.md gives ("A least-privilege Redis user"), read from
the page, so the page and the test cannot drift apart. A real redis-server has that user; the
daemon's named queues and its limiter, built from Settings as the daemon builds them, run every
op (the operators' list, requeue and purge, take, dead letters, the limiter's, the outbox
queues' included), the sweep, the long-poll watcher, the eviction-policy check and the hand-over
of a local backlog as that user, and Redis's own ACL LOG (every refused command and key, a
script's calls included) stays empty.
Then each permission of the line is taken away in turn: something must be refused, so the line
is minimal for what the daemon does.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis

from sidecar.config import Settings
from sidecar.errors import BackendUnavailable
from sidecar.models import QueueName, QueueStatus, ServingMode
from sidecar.protocol import List, Purge, Requeue
from sidecar.queue.base import QueueStore
from sidecar.queue.build import build_local_queue, build_queues, build_redis_queue
from sidecar.queue.limit.build import build_limiter
from sidecar.queue.limit.gcra import Ask, Breaker
from sidecar.queue.resilient import ResilientQueue
from sidecar.server.operators import OperatorOps
from tests.support.helpers import make_request
from tests.support.redis_server import RedisServer

DOC = Path(__file__).resolve().parents[3] / "docs/operations.md"
PASSWORD = "acl-test-password"
WAIT_S = 15.0

# Real processes: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow


def documented_acl() -> list[str]:
    """The arguments of the documented `ACL SETUSER` (after the user name), as Redis gets them."""
    text = DOC.read_text()
    section = text.split("## A least-privilege Redis user", 1)[1].split("\n## ", 1)[0]
    [line] = re.findall(r"^redis-cli ACL SETUSER .*$", section, flags=re.M)
    words = shlex.split(line)
    assert words[:4] == ["redis-cli", "ACL", "SETUSER", "sidecar"], words
    return [w for w in words[4:] if not w.startswith(">")]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def admin(server: RedisServer) -> SyncRedis:
    return SyncRedis(unix_socket_path=server.socket_path)


def set_user(server: RedisServer, rules: list[str]) -> None:
    with admin(server) as r:
        r.execute_command("ACL", "SETUSER", "sidecar", *rules, f">{PASSWORD}")
        r.execute_command("ACL", "LOG", "RESET")


def acl_log(server: RedisServer) -> list[str]:
    """Each refusal Redis logged: what was refused (a command or a key) and where."""
    with admin(server) as r:
        entries = r.acl_log()
    return [
        " ".join(_text(e.get(k)) for k in ("reason", "object", "context", "username"))
        for e in entries
    ]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def settings_for(server: RedisServer, tmp_path: Path, **more: object) -> Settings:
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    return Settings(
        # The user name in the URL, the password in its file, as docs/operations.md says.
        redis_url=f"unix://sidecar@{server.socket_path}",
        redis_password_file=str(password_file),
        redis_sweep_interval_s=0.05,
        redis_poll_interval_s=0.02,
        redis_probe_initial_s=0.02,
        redis_probe_max_s=0.1,
        redis_watch_interval_s=0.05,
        state_dir=str(tmp_path / "state"),
        **more,  # type: ignore[arg-type]
    )


async def exercise(server: RedisServer, tmp_path: Path, *, backlog: bool = True) -> None:
    """Every call the daemon makes to Redis, as the `sidecar` user; raises what any raised.

    backlog: start with a local backlog to hand over (its scripts are the enqueue's, which
    the ops run anyway).
    """
    clock = time.time
    settings = settings_for(server, tmp_path)

    # A local backlog from an outage (one of its enqueues uncertain: reconciled first), handed
    # over when the resilient store starts.
    if backlog:
        local = build_local_queue(settings)
        await local.start()
        await local.enqueue([make_request(clock, queue_id=f"backlog-{i}") for i in range(3)])
        await local.enqueue([make_request(clock, queue_id="uncertain")], uncertain=True)
        await local.close()

    # Every named queue (requests, deliveries, pickups) on one client, as the daemon builds them.
    queues = build_queues(settings)
    await queues.start()
    try:
        queue = queues.requests
        assert isinstance(queue, ResilientQueue)
        for store in queues.stores.values():
            assert isinstance(store, ResilientQueue)
            assert store.mode == ServingMode.REDIS, await store.health()
        await queue.wait_until(queue.backlog_moved, WAIT_S)
        redis = queue.redis
        # The generation marker and the eviction-policy check (INFO), again.
        assert await redis.check_generation() is None
        await redis.probe()

        await run_ops(queue)
        await operator_ops(queue)
        await limiter_ops(settings, queue, server)
        await outbox_ops(queues.outbox, server)
        await watch_and_sweep(queue, server, tmp_path)
    finally:
        await queues.close(1.0)


async def run_ops(queue: ResilientQueue) -> None:
    """Every op of the protocol, through the resilient store while Redis serves."""
    clock = time.time
    await queue.enqueue([make_request(clock, queue_id=f"r{i}") for i in range(10)])
    await queue.enqueue([make_request(clock, queue_id="r0")])  # a duplicate id
    jobs = await queue.dequeue(4, 30)
    assert len(jobs) == 4
    leases = {j.queue_id: j.lease_id for j in jobs}
    a, b, c, d = (j.queue_id for j in jobs)
    assert all(leases.values())
    await queue.extend(a, leases[a] or "", 60)
    await queue.complete(a, leases[a] or "")
    await queue.complete_brief(b, leases[b] or "")  # complete_many's path
    outcome = await queue.complete_next(c, leases[c] or "", 2, 30, None)  # complete_next
    assert outcome.error is None and outcome.leased
    await queue.fail(d, leases[d] or "", "boom", retry=True, delay_s=0.05)  # delayed
    await queue.fail(outcome.leased[0].queue_id, outcome.leased[0].lease_id or "", "x",
                     retry=False)  # fmt: skip
    queued = [q for q in (f"r{i}" for i in range(10))
              if (s := await queue.status(q)) is not None
              and s.status is QueueStatus.QUEUED]  # fmt: skip
    await queue.cancel(queued[0])
    assert await queue.status("nope") is None
    stats = await queue.stats()
    assert stats.balanced, stats
    await queue.redis.queued_by_priority()  # the queue gauges (ZCOUNT)
    health = await queue.health()
    assert health.status == "ok", health
    assert (await queue.redis.health()).status == "ok"  # PING


async def operator_ops(queue: ResilientQueue) -> None:
    """take, a dead letter of each kind, list (each status, both orders, a priority filter,
    cursor pages), requeue (by id, by filter) and purge, through the daemon's OperatorOps."""
    clock = time.time
    ops = OperatorOps(payloads_allowed=True)
    await queue.enqueue([make_request(clock, queue_id="t1", priority=7),
                         make_request(clock, queue_id="soon", ttl_s=0.05)])  # fmt: skip
    taken = await queue.take("t1", 30)
    assert taken is not None and taken.status is QueueStatus.PROCESSING
    await queue.complete("t1", taken.lease_id or "")
    # A dead letter expired unprocessed: the sweep moves it to its index.
    deadline = time.monotonic() + WAIT_S
    while (s := await queue.status("soon")) is None or s.status is not QueueStatus.EXPIRED:
        assert time.monotonic() < deadline, f"soon never expired: {s}"
        await queue.redis.sweep()
    for status in ("queued", "delayed", "processing", "failed", "completed", "expired"):
        for order in ("oldest", "newest"):
            # With payloads (read from their own keys) one way, metadata alone the other.
            req = List(id=1, status=status, order=order, payload=order == "newest")
            await ops.list_page(req, queue)
    for order in ("oldest", "newest"):
        [first] = (await ops.list_page(List(id=1, status="queued", priority=5, order=order,
                                            limit=1), queue)).items  # fmt: skip
        assert first.priority == 5
        # Cursor pages of an index (completed: a, b, c, t1): by rank from the cursor's entry.
        page = await ops.list_page(List(id=1, status="completed", order=order, limit=1), queue)
        assert page.next_cursor is not None
        more = await ops.list_page(
            List(id=1, status="completed", order=order, limit=1, cursor=page.next_cursor), queue
        )
        assert [i.queue_id for i in more.items] != [i.queue_id for i in page.items], more
    # Requeue: the failed dead letter by id, the expired one by filter, a queued one unchanged.
    [failed] = (await ops.list_page(List(id=1, status="failed"), queue)).items
    by_id = await ops.requeue(Requeue(id=1, queue_id=failed.queue_id), queue, None)
    assert by_id.ids == [failed.queue_id], by_id
    by_filter = await ops.requeue(Requeue(id=1, status="expired"), queue, None)
    assert by_filter.ids == ["soon"], by_filter
    again = await ops.requeue(Requeue(id=1, queue_id="soon"), queue, None)
    assert again.unchanged == ["soon"], again
    # Purge: finished records, and (forced) a request being processed.
    assert (await ops.purge(Purge(id=1, status="completed"), queue, None)).purged >= 4
    await queue.take("soon", 30)
    assert (await ops.purge(Purge(id=1, status="processing", force=True), queue, None)).purged


async def limiter_ops(settings: Settings, queue: ResilientQueue, server: RedisServer) -> None:
    """The limiter as the daemon builds it beside a queue on Redis: each of its calls."""
    limiter = build_limiter(settings, queue)
    ask = Ask(rpm=600, tpm=10_000, tokens=100, fresh=True)
    assert (await limiter.acquire("acl", ask)).granted
    await limiter.settle("acl", 10_000, -50)
    assert await limiter.pause("acl", 0.01) > 0
    state = await limiter.report("acl", ok=False, probe=False, failures=1, reset_s=0.01)
    assert state is Breaker.OPEN
    with admin(server) as r:  # Redis's limiter answered, not the local one
        assert r.exists("{sidecar}:limit:acl")


async def outbox_ops(outbox: dict[str, QueueStore], server: RedisServer) -> None:
    """A result POSTed (deliveries: enqueue, dequeue, complete) and one picked up (take)."""
    clock = time.time
    deliveries, pickups = outbox[QueueName.DELIVERIES], outbox[QueueName.PICKUPS]
    await deliveries.enqueue([make_request(clock, queue_id="result-1")])
    [job] = await deliveries.dequeue(1, 30)
    await deliveries.complete(job.queue_id, job.lease_id or "")
    await pickups.enqueue([make_request(clock, queue_id="result-2")])
    picked = await pickups.take("result-2", 30)
    assert picked is not None
    await pickups.complete(picked.queue_id, picked.lease_id or "")
    with admin(server) as r:  # in Redis, under each outbox queue's hash tag
        assert r.exists("{sidecar:deliveries}:seq", "{sidecar:pickups}:seq") == 2


async def watch_and_sweep(queue: ResilientQueue, server: RedisServer, tmp_path: Path) -> None:
    """The watcher, the sweep, a discard, the policy check and WAIT, as the user."""
    clock = time.time
    redis = queue.redis
    # The long-poll watcher (ZCARD, ZCOUNT) and the delayed request coming due.
    await redis.wait_for_work(0.2)
    # A lease that lapses is taken back by the sweep; the sweeper runs it too.
    [short] = await queue.dequeue(1, 0.05)
    swept = await redis.sweep()
    deadline = time.monotonic() + WAIT_S
    while (s := await queue.status(short.queue_id)) is not None and s.status is (
        QueueStatus.PROCESSING
    ):
        assert time.monotonic() < deadline, "the lapsed lease was not taken back"
        swept = await redis.sweep()
    assert swept is not None
    # A duplicate copy discarded (reconciliation's path), and the policy check seeing a
    # change while the daemon runs.
    await queue.enqueue([make_request(clock, queue_id="dup")])
    assert await redis.discard_queued("dup")
    with admin(server) as r:
        r.config_set("maxmemory-policy", "allkeys-lru")
    await redis.check_generation()
    assert any("maxmemory-policy is allkeys-lru" in w for w in redis.warnings)
    with admin(server) as r:
        r.config_set("maxmemory-policy", "noeviction")
    await redis.check_generation()
    assert not redis.warnings
    # WAIT (REDIS_MIN_REPLICAS_ACK): no replica here, so the write is not confirmed; what
    # matters is that WAIT was not refused.
    acked = build_redis_queue(
        settings_for(server, tmp_path, redis_min_replicas_ack=1,
                     redis_replicas_ack_timeout_ms=10)
    )  # fmt: skip
    await acked.start()
    try:
        with pytest.raises(BackendUnavailable, match="replicas did not confirm"):
            await acked.probe()
    finally:
        await acked.close()


async def test_the_documented_user_runs_everything_with_nothing_refused(
    server: RedisServer, tmp_path: Path
) -> None:
    set_user(server, documented_acl())
    await exercise(server, tmp_path)
    assert acl_log(server) == []


def permissions() -> list[str]:
    return [w for w in documented_acl() if w.startswith(("+", "~"))]


@pytest.mark.parametrize("dropped", permissions())
async def test_each_documented_permission_is_needed(
    server: RedisServer, tmp_path: Path, dropped: str
) -> None:
    set_user(server, [w for w in documented_acl() if w != dropped])
    # Without the backlog: a hand-over refused with NOPERM leaves its task's error unobserved
    # (sidecar/queue/resilient/handover.py), which this suite fails on by itself.
    failure: Exception | None = None
    try:
        await exercise(server, tmp_path, backlog=False)
    except Exception as exc:  # any failure will do; ACL LOG says which refusal
        failure = exc
    assert acl_log(server), f"nothing was refused without {dropped} (then: {failure!r})"


async def test_a_user_without_info_still_uses_redis_and_says_the_policy_is_unknown(
    server: RedisServer, tmp_path: Path
) -> None:
    set_user(server, [w for w in documented_acl() if w != "+info"])
    settings = settings_for(server, tmp_path)
    queue = build_redis_queue(settings)
    await queue.start()  # before: NOPERM out of start, and the daemon kept off Redis for good
    try:
        await queue.enqueue([make_request(time.time, queue_id="x")])
        health = await queue.health()
        assert health.status == "degraded", health
        assert any("cannot be read" in r and "+info" in r for r in health.reasons), health
    finally:
        await queue.close()
