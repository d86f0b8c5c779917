"""RedisQueue under hostile and unlucky input (issue 7), on a real redis-server.

Huge and infinite durations, a retention of 0, a pipeline that redis-py resends after a
dropped connection, a clock behind Redis's own, an eviction policy changed while running.
The store is called directly, below the protocol's bounds, so the scripts must be safe alone.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sidecar.errors import InvalidState, NotFound
from sidecar.models import QueuedRequest, QueueStatus
from sidecar.queue.redis import RedisQueue
from sidecar.queue.redis.keys import MAX_TIME_S
from sidecar.queue.redis.wire import WireClient
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    FACTORY_RETENTION_S,
    QueueFactory,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_server_fixture,  # noqa: F401
    run_script,
)

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

RETENTION_S = FACTORY_RETENTION_S  # what make_queue builds with
LEASE_S = 30.0

async def _members(raw: Redis, key: str) -> list[str]:
    reply: Any = await raw.zrange(key, 0, -1)
    return [m.decode() for m in reply]


async def _books(queue: RedisQueue, raw: Redis) -> tuple[int, int]:
    """(queued, processing) from stats, checked against the indexes and the hashes."""
    stats = await queue.stats()
    assert stats.balanced, stats
    pending = await _members(raw, queue.keys.pending)
    leased = await _members(raw, queue.keys.leases)
    # No phantom: every index entry has its hash.
    for queue_id in pending + leased:
        assert await raw.exists(queue.keys.request(queue_id)) == 1, queue_id
    assert (stats.queued, stats.processing) == (len(pending), len(leased))
    return stats.queued, stats.processing


# -- item 1: durations past what a double of milliseconds holds ----------------------------------


@pytest.mark.parametrize("ttl_s", [math.inf, 1e16, 9.3e15, 1e300])
async def test_enqueue_with_a_huge_ttl_is_kept_and_handed_out(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, ttl_s: float
) -> None:
    queue = await make_queue()
    req = make_request(clock, ttl_s=ttl_s, queue_id="forever")
    [res] = await queue.enqueue([req])
    assert res.created and res.request.expires_at == MAX_TIME_S
    st = await queue.status("forever")
    assert st is not None and st.status is QueueStatus.QUEUED
    assert st.expires_at == MAX_TIME_S
    assert await raw.pttl(queue.keys.request("forever")) == -1  # pending: no native TTL
    assert await _books(queue, raw) == (1, 0)
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.queue_id == "forever" and job.lease_id is not None
    done = await queue.complete("forever", job.lease_id)
    assert done.status is QueueStatus.COMPLETED


@pytest.mark.parametrize("lease_s", [math.inf, 1e16])
async def test_dequeue_with_a_huge_lease_destroys_no_other_producers_requests(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, lease_s: float
) -> None:
    producer, worker = await make_queue(), await make_queue()
    ids = [f"p{i}" for i in range(7)]
    await producer.enqueue([make_request(clock, i, queue_id=q) for i, q in enumerate(ids)])
    jobs = await worker.dequeue(5, lease_s)
    assert [j.queue_id for j in jobs] == ids[:5]
    assert {j.lease_expires_at for j in jobs} == {MAX_TIME_S}
    for job in jobs:
        assert await raw.exists(worker.keys.request(job.queue_id)) == 1
    assert await _books(producer, raw) == (2, 5)
    # The leases are real: extend and complete them, and the rest is still handed out.
    assert jobs[0].lease_id is not None
    ext = await worker.extend(jobs[0].queue_id, jobs[0].lease_id, lease_s)
    assert ext.lease_expires_at == MAX_TIME_S
    for job in jobs:
        assert job.lease_id is not None
        await worker.complete(job.queue_id, job.lease_id)
    rest = await worker.dequeue(5, LEASE_S)
    assert [j.queue_id for j in rest] == ids[5:]
    stats = await producer.stats()
    assert (stats.completed, stats.processing, stats.accepted) == (5, 2, 7)


async def test_scripts_clamp_huge_times_on_their_own(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    # Called as a caller that skips RedisQueue's own bounds would: a raw FCALL (or EVALSHA).
    queue = await make_queue()
    keys = queue.keys.script_keys()
    now = clock()
    for n, expires in enumerate(("inf", "1e16", "1e300")):
        qid = f"raw{n}"
        item = (qid, 5, now, expires, 3, b"x", 0)
        reply = await run_script(
            raw, queue, "enqueue", (*keys, queue.keys.request(qid)), now, RETENTION_S, 1, *item
        )
        assert reply[1][0][0] == 1
    lease = ("l0", "l1", "l2")
    reply = await run_script(
        raw, queue, "dequeue", keys, now, RETENTION_S, "inf", 10, -1, 160, *lease
    )
    assert len(reply[1]) == 3
    assert await _books(queue, raw) == (0, 3)
    # A huge retention: the terminal hash gets an expiry in the future, not one that wrapped.
    key = queue.keys.request("raw0")
    reply = await run_script(
        raw, queue, "complete", (*keys, key), now, "1e300", "raw0", "l0", "1"
    )
    assert reply[0] == 0
    assert await raw.exists(key) == 1 and await raw.pttl(key) > 0
    st = await queue.status("raw0")
    assert st is not None and st.status is QueueStatus.COMPLETED


async def test_a_bad_argument_is_refused_before_anything_changes(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, i, queue_id=f"k{i}") for i in range(3)])
    keys = queue.keys.script_keys()
    now = clock()
    # NaN reaches a script only from a caller below RedisQueue; it must not pop anything first.
    with pytest.raises(ResponseError, match=r"lease_until"):
        await run_script(raw, queue, "dequeue", keys, now, RETENTION_S, "nan", 10, "l0", "l1")
    good = ("new-a", 5, now, now + 60, 3, b"x", 0)
    bad = ("new-b", 42, now, now + 60, 3, b"x", 0)
    with pytest.raises(ResponseError, match=r"priority"):
        both = (*keys, queue.keys.request("new-a"), queue.keys.request("new-b"))
        await run_script(raw, queue, "enqueue", both, now, RETENTION_S, 2, *good, *bad)
    assert await queue.status("new-a") is None  # all or none
    # A settle missing an argument fails before its lease is touched.
    [job] = await queue.dequeue(1, LEASE_S)
    key = queue.keys.request(job.queue_id)
    with pytest.raises(ResponseError, match=r"reason"):
        await run_script(
            raw, queue, "fail", (*keys, key), now, RETENTION_S, job.queue_id, job.lease_id or ""
        )
    st = await queue.status(job.queue_id)
    assert st is not None and (st.status, st.lease_id) == (QueueStatus.PROCESSING, job.lease_id)
    assert await queue.fail(job.queue_id, job.lease_id or "", "ok now", retry=True)
    assert await _books(queue, raw) == (3, 0)
    # Through RedisQueue, NaN is a ValueError naming the value; nothing changes either.
    with pytest.raises(ValueError, match="lease_s"):
        await queue.dequeue(2, math.nan)
    with pytest.raises(ValueError, match="expires_at"):
        await queue.enqueue([make_request(clock, ttl_s=math.nan)])
    assert await _books(queue, raw) == (3, 0)


async def test_a_pending_hash_never_vanishes_through_redis_own_ttl(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    # A daemon whose clock is hours behind Redis's: any native TTL computed from its times
    # would already be past in Redis's eyes.
    clock.advance(-(RETENTION_S + 4 * 3600))
    queue = await make_queue()
    req = make_request(clock, ttl_s=60, queue_id="behind")
    await queue.enqueue([req])
    assert await raw.exists(queue.keys.request("behind")) == 1
    stats = await queue.stats()
    assert stats.bytes == req.size_bytes
    clock.advance(61)
    await queue.sweep()
    st = await queue.status("behind")
    assert st is not None and st.status is QueueStatus.EXPIRED
    stats = await queue.stats()
    assert (stats.bytes, stats.expired, stats.queued) == (0, 1, 0)
    assert stats.balanced


# -- item 2: a retention of 0 --------------------------------------------------------------------


async def test_settles_with_retention_zero_answer_the_settled_record(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue(retention_s=0.0)
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("c", "f", "r", "x")])
    jobs = {j.queue_id: j for j in await queue.dequeue(3, LEASE_S)}
    assert sorted(jobs) == ["c", "f", "r"]
    lease = {q: j.lease_id or "" for q, j in jobs.items()}
    done = await queue.complete("c", lease["c"])
    assert (done.queue_id, done.status) == ("c", QueueStatus.COMPLETED)
    failed = await queue.fail("f", lease["f"], "boom", retry=False)
    assert (failed.status, failed.reason) == (QueueStatus.FAILED, "boom")
    requeued = await queue.fail("r", lease["r"], "again", retry=True)
    assert requeued.status is QueueStatus.QUEUED
    cancelled = await queue.cancel("x")
    assert (cancelled.status, cancelled.reason) == (QueueStatus.FAILED, "cancelled")
    # The reply was the last sight of them: gone from Redis, nothing left in any index.
    for q in ("c", "f", "x"):
        assert await queue.status(q) is None
        assert await raw.exists(queue.keys.request(q)) == 0
    assert await raw.zcard(queue.keys.retained) == 0
    stats = await queue.stats()
    assert (stats.completed, stats.failed, stats.queued, stats.retained) == (1, 2, 1, 0)
    assert stats.balanced and stats.bytes == requeued.size_bytes
    with pytest.raises(NotFound):
        await queue.cancel("x")


# -- item 15: fail is idempotent like complete; every script is safe to run twice ----------------


async def test_fail_repeated_with_the_same_lease_answers_the_same_outcome(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("dead", "retry")])
    jobs = {j.queue_id: j.lease_id or "" for j in await queue.dequeue(2, LEASE_S)}
    first = await queue.fail("dead", jobs["dead"], "bad input", retry=False)
    again = await queue.fail("dead", jobs["dead"], "bad input", retry=False)
    # The repeat may read the record back with the dead letter's payload (kept for a
    # requeue); the outcome a client sees (RequestInfo carries no payload) is the same.
    assert without_payload(again) == without_payload(first)
    assert again.status is QueueStatus.FAILED
    first = await queue.fail("retry", jobs["retry"], "flaky", retry=True)
    again = await queue.fail("retry", jobs["retry"], "flaky", retry=True)
    assert again == first and again.status is QueueStatus.QUEUED
    stats = await queue.stats()
    assert (stats.failed, stats.queued, stats.processing) == (1, 1, 0)
    assert await raw.zcard(queue.keys.pending) == 1
    # A fail with the lease of another op's settle is not a repeat of it.
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.lease_id is not None
    await queue.complete("retry", job.lease_id)
    with pytest.raises(InvalidState):
        await queue.fail("retry", job.lease_id, "late", retry=False)


_SCRIPT_COMMANDS = ("FCALL", "EVALSHA")


@pytest.fixture
def drop_first_reply(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next pipeline of scripts runs on Redis, then its connection drops before the reply.

    The runner (or redis-py, on its own pipeline) then reconnects and resends the whole batch
    (its one retry on a connection error), which is what a real drop after the write reached
    Redis does. Returns a list that gets one entry per drop, so a test can check the drop
    happened. Both paths are armed: the lean connection (a plain server) and redis-py's.
    """
    real = Pipeline._execute_pipeline
    real_wire = WireClient.send
    dropped: list[int] = []

    async def lossy(self: Pipeline, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        replies = await real(self, connection, commands, raise_on_error)
        if not dropped and any(args[0] in _SCRIPT_COMMANDS for args, _ in commands):
            dropped.append(len(commands))
            raise RedisConnectionError("connection dropped before the reply was read")
        return replies

    def lossy_wire(self: WireClient, commands: Sequence[bytes]) -> asyncio.Future[list[Any]] | None:
        sent = real_wire(self, commands)
        scripts = any(name.encode() in c for name in _SCRIPT_COMMANDS for c in commands)
        if sent is None or dropped or not scripts:
            return sent
        dropped.append(len(commands))
        lost: asyncio.Future[list[Any]] = sent.get_loop().create_future()

        def drop(_: object) -> None:  # Redis has run them: the replies are never read
            self.drop()  # the connection really goes: the resend needs a fresh one
            lost.set_exception(RedisConnectionError("connection dropped before the reply was read"))

        sent.add_done_callback(drop)
        return lost

    monkeypatch.setattr(Pipeline, "_execute_pipeline", lossy)
    monkeypatch.setattr(WireClient, "send", lossy_wire)
    return dropped


async def test_a_resent_dequeue_returns_its_first_leases_and_takes_no_more(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, drop_first_reply: list[int]
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, i, queue_id=f"d{i}") for i in range(4)])
    drop_first_reply.clear()  # the enqueue's pipeline was the one dropped; arm it again
    jobs = await queue.dequeue(2, LEASE_S)
    assert drop_first_reply, "the reply was dropped and the pipeline resent"
    assert [j.queue_id for j in jobs] == ["d0", "d1"]
    for job in jobs:
        st = await queue.status(job.queue_id)
        assert st is not None and (st.lease_id, st.attempts) == (job.lease_id, 1)
    assert await _books(queue, raw) == (2, 2)


@pytest.mark.parametrize("op", ["complete", "fail", "fail_retry", "cancel", "extend"])
async def test_a_resent_settle_answers_what_it_did(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, drop_first_reply: list[int], op: str
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("leased", "queued")])
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.queue_id == "leased" and job.lease_id is not None
    drop_first_reply.clear()
    if op == "complete":
        rec = await queue.complete("leased", job.lease_id)
        want = (QueueStatus.COMPLETED, 1, 1, 0)
    elif op == "fail":
        rec = await queue.fail("leased", job.lease_id, "no", retry=False)
        want = (QueueStatus.FAILED, 1, 1, 0)
    elif op == "fail_retry":
        rec = await queue.fail("leased", job.lease_id, "later", retry=True)
        want = (QueueStatus.QUEUED, 0, 2, 0)
    elif op == "cancel":
        rec = await queue.cancel("queued")
        want = (QueueStatus.FAILED, 1, 0, 1)
    else:
        rec = await queue.extend("leased", job.lease_id, LEASE_S * 2)
        want = (QueueStatus.PROCESSING, 0, 1, 1)
    assert drop_first_reply, "the reply was dropped and the pipeline resent"
    stats = await queue.stats()
    assert (rec.status, stats.completed + stats.failed, stats.queued, stats.processing) == want
    assert stats.balanced


async def test_a_resent_enqueue_stores_one_copy(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, drop_first_reply: list[int]
) -> None:
    queue = await make_queue()
    [res] = await queue.enqueue([make_request(clock, queue_id="once")])
    assert drop_first_reply
    # One copy. The reply the caller reads is the resent run's, which found the request
    # stored: created is False although this call created it (see lua/enqueue.lua).
    assert (res.request.queue_id, res.request.seq) == ("once", 1)
    assert await _books(queue, raw) == (1, 0)
    assert (await queue.stats()).accepted == 1


async def test_a_resent_discard_answers_that_it_discarded(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, drop_first_reply: list[int]
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("dup", "keep")])
    drop_first_reply.clear()
    assert await queue.discard_queued("dup") is True
    assert drop_first_reply
    assert await queue.status("dup") is None
    assert await _books(queue, raw) == (1, 0)
    assert (await queue.stats()).accepted == 1
    assert await queue.discard_queued("dup") is False  # a new call: nothing left to discard


# -- item 15: the eviction policy is re-checked while the daemon runs ----------------------------


async def test_an_eviction_policy_changed_while_running_is_reported_then_cleared(
    make_queue: QueueFactory, raw: Redis
) -> None:
    queue = await make_queue()
    assert await queue.check_generation() is None
    assert (await queue.health()).status == "ok"
    with structlog.testing.capture_logs() as logs:
        await raw.config_set("maxmemory-policy", "volatile-lru")
        assert await queue.check_generation() is None
        report = await queue.health()
        assert report.status == "degraded"
        [warning] = (await queue.stats()).warnings
        assert "volatile-lru" in warning and report.reasons == [warning]
        await queue.check_generation()  # unchanged: no second warning, no second log line
        assert len((await queue.stats()).warnings) == 1
        await raw.config_set("maxmemory-policy", "noeviction")
        await queue.check_generation()
        assert (await queue.health()).status == "ok"
        assert (await queue.stats()).warnings == []
    events = [(e["event"], e.get("maxmemory_policy"), e.get("previous")) for e in logs]
    assert events == [
        ("redis_eviction_policy_unsafe", "volatile-lru", "noeviction"),
        ("redis_eviction_policy_safe", "noeviction", "volatile-lru"),
    ]


@pytest.mark.parametrize(
    ("text", "stored"),
    [("1700000000.25", 1700000000.25), ("0x10", 16.0), (" 12", 12.0), ("1e300", MAX_TIME_S)],
)
async def test_enqueue_script_stores_any_time_it_accepts_as_text_the_store_reads_back(
    make_queue: QueueFactory, raw: Redis, text: str, stored: float
) -> None:
    """enqueue.lua keeps a plain decimal time as sent and formats anything else Lua's tonumber
    accepts (hex, spaces, past MAX_TIME), so no record holds a time Python cannot parse."""
    queue = await make_queue()
    keys = queue.keys
    args: list[str | bytes | float] = [1700000000.0, RETENTION_S, 1, "odd", 5]
    args += [text, text, 3, b"p", 0]
    fixed = keys.script_keys()
    await run_script(raw, queue, "enqueue", (*fixed, keys.request("odd")), *args)
    st = await queue.status("odd")
    assert st is not None and st.created_at == stored and st.expires_at == stored


@pytest.mark.parametrize(
    ("text", "stored"), [("7", 7), ("07", 7), ("7.0", 7), ("0x7", 7), (" 7", 7), ("7e0", 7)]
)
async def test_enqueue_script_stores_any_whole_number_it_accepts_as_digits(
    make_queue: QueueFactory, raw: Redis, text: str, stored: int
) -> None:
    """enqueue.lua keeps plain digits as sent and formats any other text Lua's tonumber reads
    as a whole number, so priority and attempts always read back as Python ints."""
    queue = await make_queue()
    keys = queue.keys
    args: list[str | bytes | float] = [1700000000.0, RETENTION_S, 1, "odd", text]
    args += [1700000000.5, 1700009000.5, text, b"p", text]
    fixed = keys.script_keys()
    await run_script(raw, queue, "enqueue", (*fixed, keys.request("odd")), *args)
    st = await queue.status("odd")
    assert st is not None
    assert (st.priority, st.max_attempts, st.attempts) == (stored, stored, stored)
    kept = await raw.hget(keys.request("odd"), "priority")
    assert isinstance(kept, bytes) and kept.isdigit()


def without_payload(rec: QueuedRequest) -> QueuedRequest:
    return msgspec.structs.replace(rec, payload=None)
