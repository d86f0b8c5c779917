"""RedisQueue on a real redis-server: sharing, leases across instances, TTL, durability, scripts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.errors import InvalidState, LeaseMismatch, NotFound
from sidecar.models import QueueStatus
from sidecar.queue.redis import SCRIPT_ERRORS, RedisQueue, SweepCounts
from sidecar.queue.redis.keys import ScriptCode
from tests.support.helpers import FakeClock, make_request
from tests.support.redis_server import (  # the fixtures are imported to be found by name
    FACTORY_RETENTION_S,
    QueueFactory,
    RedisServer,
    make_queue_fixture,  # noqa: F401
    raw_fixture,  # noqa: F401
    redis_queue_for,
    redis_server_fixture,  # noqa: F401
    run_script,
    script_runs,
)

RETENTION_S = FACTORY_RETENTION_S  # what make_queue builds with
LEASE_S = 30.0


async def test_two_instances_complete_every_request_exactly_once(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    a, b = await make_queue(), await make_queue()
    ids = [f"r{i:03d}" for i in range(300)]
    await a.enqueue(
        [make_request(clock, i, queue_id=q, priority=i % 10) for i, q in enumerate(ids)]
    )
    handled: dict[str, list[str]] = {}

    async def worker(queue: RedisQueue, name: str) -> None:
        while jobs := await queue.dequeue(7, LEASE_S):
            for job in jobs:
                assert job.lease_id is not None
                handled.setdefault(job.queue_id, []).append(name)
                await queue.complete(job.queue_id, job.lease_id)

    workers = [worker(q, f"{n}{k}") for k in range(4) for n, q in (("a", a), ("b", b))]
    await asyncio.gather(*workers)
    assert sorted(handled) == ids
    assert all(len(names) == 1 for names in handled.values())
    served_by = {names[0][0] for names in handled.values()}
    assert served_by == {"a", "b"}
    stats = await b.stats()
    assert (stats.completed, stats.queued, stats.processing) == (300, 0, 0)
    assert stats.balanced


async def test_lapsed_lease_is_reclaimed_once_when_two_instances_sweep(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    a, b = await make_queue(), await make_queue()
    await a.enqueue([make_request(clock, i) for i in range(20)])
    jobs = await a.dequeue(20, LEASE_S)
    assert len(jobs) == 20
    clock.advance(LEASE_S + 1)
    first, second = await asyncio.gather(a.sweep(), b.sweep())
    assert first.requeued + second.requeued == 20
    stats = await a.stats()
    assert (stats.queued, stats.processing, stats.accepted) == (20, 0, 20)
    assert stats.balanced
    again = await b.dequeue(50, LEASE_S)
    assert sorted(j.queue_id for j in again) == sorted(j.queue_id for j in jobs)
    assert {j.attempts for j in again} == {2}


async def test_two_instances_never_lease_one_request_twice(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    a, b = await make_queue(), await make_queue()
    await a.enqueue([make_request(clock, i) for i in range(50)])
    got_a, got_b = await asyncio.gather(a.dequeue(40, LEASE_S), b.dequeue(40, LEASE_S))
    ids_a, ids_b = {j.queue_id for j in got_a}, {j.queue_id for j in got_b}
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == 50


async def test_ttl_and_retention_through_status_and_native_ttl(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    # max_dead=0: no dead letters, so the expired request keeps metadata only, for RETENTION_S
    # (a dead letter's retention and native TTL: tests/queue/test_contract_list*.py).
    queue = await make_queue(max_dead=0)
    req = make_request(clock, ttl_s=10)
    await queue.enqueue([req])
    key = queue.keys.request(req.queue_id)
    # While pending, no native TTL: only a script may remove what the queue must keep.
    assert await raw.pttl(key) == -1
    clock.advance(11)
    st = await queue.status(req.queue_id)
    assert st is not None
    assert (st.status, st.reason, st.payload) == (QueueStatus.EXPIRED, "ttl_elapsed", None)
    # Once terminal, the native TTL is the retention, counted by Redis's own clock.
    terminal_ttl_s = await raw.pttl(key) / 1000
    assert RETENTION_S - 2 <= terminal_ttl_s <= RETENTION_S
    assert await raw.hexists(key, "payload") == 0
    clock.advance(RETENTION_S - 1)
    assert (await queue.status(req.queue_id)) is not None
    clock.advance(2)
    assert await queue.status(req.queue_id) is None
    assert await raw.exists(key) == 0
    assert await raw.zcard(queue.keys.retained) == 0


@pytest.mark.slow
async def test_redis_removes_a_terminal_hash_itself_when_retention_ends(
    redis_server: RedisServer, raw: Redis, clock: FakeClock
) -> None:
    # The real clock here, so Redis's own TTL is what removes the hash, not a script.
    await raw.config_set("notify-keyspace-events", "Ex")
    pubsub = raw.pubsub()
    expired_events: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_expired(message: dict[str, Any]) -> None:
        await expired_events.put(message["data"])

    await pubsub.subscribe(**{"__keyevent@0__:expired": on_expired})
    listener = asyncio.create_task(pubsub.run())
    queue = redis_queue_for(redis_server.url, time.time, retention_s=0.2, sweep_interval_s=None)
    await queue.start()
    try:
        await queue.enqueue([make_request(clock, queue_id="gc-me")])
        [job] = await queue.dequeue(1, LEASE_S)
        assert job.lease_id is not None
        await queue.complete(job.queue_id, job.lease_id)
        key = queue.keys.request("gc-me")
        # The retention, rounded up to a whole ms: purge_at - NOW is a float difference that
        # may land a hair above 0.2 s, so its ceiling in ms can be 201.
        assert 0 < await raw.pttl(key) <= 201
        # Redis announces the removal itself: wait for that event, not for a guessed time.
        removed = await asyncio.wait_for(expired_events.get(), 5)
        assert removed == key.encode()
        assert await raw.exists(key) == 0
    finally:
        await queue.close()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # redis-py leaves it unannotated


async def test_requests_survive_closing_and_reopening_the_store(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    first = await make_queue()
    specs = [("low", 9), ("urgent", 0), ("mid-1", 5), ("mid-2", 5)]
    for name, prio in specs:
        await first.enqueue([make_request(clock, name, queue_id=name, priority=prio)])
    await first.close()
    second = await make_queue()
    assert second.generation == first.generation
    got = await second.dequeue(10, LEASE_S)
    assert [j.queue_id for j in got] == ["urgent", "mid-1", "mid-2", "low"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_requests_survive_a_redis_restart_with_aof(how: str, clock: FakeClock) -> None:
    # appendfsync always: each write reaches the kernel before the reply, so even SIGKILL keeps
    # it. This proves the AOF is replayed, not that it was fsync'd: a SIGKILLed redis-server
    # keeps what reached the page cache.
    with RedisServer(appendonly=True) as server:
        queue = redis_queue_for(server.url, clock, retention_s=RETENTION_S, sweep_interval_s=None)
        await queue.start()
        reqs = [make_request(clock, i, queue_id=f"d{i}", priority=9 - i) for i in range(5)]
        await queue.enqueue(reqs)
        await queue.close()
        server.kill() if how == "kill" else server.stop()
        server.start()
        again = redis_queue_for(server.url, clock, retention_s=RETENTION_S, sweep_interval_s=None)
        await again.start()
        try:
            assert again.generation == queue.generation
            got = await again.dequeue(10, LEASE_S)
            assert [j.queue_id for j in got] == ["d4", "d3", "d2", "d1", "d0"]
            assert [j.payload for j in got] == [r.payload for r in reversed(reqs)]
        finally:
            await again.close()


async def test_concurrent_calls_share_pipelines(make_queue: QueueFactory, clock: FakeClock) -> None:
    queue = await make_queue()
    n = 50
    reqs = [make_request(clock, i, queue_id=f"c{i}") for i in range(n)]
    before = queue.flushes
    results = await asyncio.gather(*(queue.enqueue([r]) for r in reqs))
    assert queue.flushes - before < n
    # Each caller got the answer to its own call.
    assert [res.request.queue_id for [res] in results] == [r.queue_id for r in reqs]
    assert all(res.created for [res] in results)
    before = queue.flushes
    statuses = await asyncio.gather(*(queue.status(r.queue_id) for r in reqs))
    assert queue.flushes - before < n
    assert [s.queue_id for s in statuses if s is not None] == [r.queue_id for r in reqs]
    assert len({res.request.seq for [res] in results}) == n


async def test_pending_score_orders_exactly_at_large_seq(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    # Far into the sequence, where a float of priority + seq / 1e9 would blur neighbours.
    await raw.set(queue.keys.seq, (1 << 48) - 10)
    reqs = [make_request(clock, i, queue_id=f"s{i}", priority=9) for i in range(5)]
    await queue.enqueue(reqs)
    await queue.enqueue([make_request(clock, queue_id="urgent", priority=8)])
    got = await queue.dequeue(10, LEASE_S)
    assert [j.queue_id for j in got] == ["urgent", "s0", "s1", "s2", "s3", "s4"]


# -- each script's error returns, on real Redis -------------------------------------------------


async def _raw_eval(
    raw: Redis, queue: RedisQueue, script: str, now: float, *args: Any, named: int = 1
) -> Any:
    """Run a script as RedisQueue does; the first `named` args after now are queue_ids."""
    keys = queue.keys.script_keys()
    if script not in ("dequeue", "sweep", "stats", "enqueue"):
        keys += tuple(queue.keys.request(q) for q in args[:named])
    return await run_script(raw, queue, script, keys, now, queue.retention_s, *args)


async def test_script_error_codes(make_queue: QueueFactory, clock: FakeClock, raw: Redis) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="queued"), make_request(clock, queue_id="x")])
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.queue_id == "queued" and job.lease_id is not None
    now = clock()
    later = str(now + LEASE_S)
    cases: list[tuple[str, tuple[str, ...], list[Any]]] = [
        ("extend", ("nope", "l", later), [-1]),
        ("extend", ("x", "l", later), [-2, b"queued"]),
        ("extend", ("queued", "not-it", later), [-3]),
        # complete.lua takes a batch: each request's own code inside {0, results}.
        ("complete", ("nope", "l", "1"), [0, [[-1]]]),
        ("complete", ("x", "l", "0"), [0, [[-2, b"queued"]]]),
        ("complete", ("queued", "not-it", "1"), [0, [[-3]]]),
        ("fail", ("nope", "l", "r", "1"), [-1]),
        ("fail", ("x", "l", "r", "0"), [-2, b"queued"]),
        ("fail", ("queued", "not-it", "r", "1"), [-3]),
        ("cancel", ("nope", "token"), [-1]),
        ("cancel", ("queued", "token"), [-2, b"processing"]),
        ("status", ("nope",), [-1]),
    ]
    for script, args, expected in cases:
        assert await _raw_eval(raw, queue, script, now, *args) == expected, (script, args)
    # Rejected calls changed nothing.
    stats = await queue.stats()
    assert (stats.queued, stats.processing, stats.accepted) == (1, 1, 2)
    st = await queue.status("queued")
    assert st is not None and st.lease_id == job.lease_id


async def test_script_error_codes_map_to_the_contract_errors(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    assert {code: cls for code, (cls, _) in SCRIPT_ERRORS.items()} == {
        ScriptCode.NOT_FOUND: NotFound,
        ScriptCode.INVALID_STATE: InvalidState,
        ScriptCode.LEASE_MISMATCH: LeaseMismatch,
    }
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="q")])
    with pytest.raises(InvalidState) as info:
        await queue.extend("q", "lease", LEASE_S)
    assert info.value.details == {"queue_id": "q", "status": "queued"}
    assert "queued" in info.value.message
    with pytest.raises(NotFound):
        await queue.fail("nope", "lease", "r", retry=True)
    [job] = await queue.dequeue(1, LEASE_S)
    with pytest.raises(InvalidState) as info:
        await queue.cancel(job.queue_id)
    assert info.value.details["status"] == "processing"
    with pytest.raises(LeaseMismatch):
        await queue.fail(job.queue_id, "other", "r", retry=False)


async def test_background_sweeper_expires_without_any_call(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await make_queue(sweep_interval_s=0.05)
    swept = asyncio.Event()
    real_sweep = queue.sweep

    async def spy() -> SweepCounts:
        counts = await real_sweep()
        if counts.expired:
            swept.set()
        return counts

    monkeypatch.setattr(queue, "sweep", spy)
    await queue.enqueue([make_request(clock, ttl_s=5, queue_id="short")])
    clock.advance(6)
    await asyncio.wait_for(swept.wait(), 5)
    assert await raw.zcard(queue.keys.pending) == 0
    assert await raw.hget(queue.keys.request("short"), "status") == b"expired"
    assert await raw.hget(queue.keys.stats, "expired") == b"1"


# -- what the failover manager uses -------------------------------------------------------------


async def test_check_generation_notices_a_redis_that_came_back_empty(
    redis_server: RedisServer, make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="lost")])
    assert await queue.check_generation() is None
    first = queue.generation
    redis_server.kill()  # no persistence: the server restarts empty
    redis_server.start()
    assert await queue.check_generation() == "generation marker missing"
    assert queue.generation is not None and queue.generation != first
    assert await queue.check_generation() is None  # the new data set is now the reference
    assert await queue.status("lost") is None


async def test_discard_queued_removes_only_a_queued_request_and_its_books(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id=q) for q in ("leased", "dup", "keep")])
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.queue_id == "leased"
    assert await queue.discard_queued("dup") is True
    assert await queue.discard_queued("dup") is False
    assert await queue.discard_queued("leased") is False
    assert await queue.discard_queued("never-seen") is False
    assert await queue.status("dup") is None
    stats = await queue.stats()
    assert (stats.accepted, stats.queued, stats.processing) == (2, 1, 1)
    assert stats.balanced
    keep = await queue.status("keep")
    assert keep is not None and stats.bytes == job.size_bytes + keep.size_bytes


@pytest.mark.slow
async def test_idle_waiters_share_one_watch_and_wake_on_another_hosts_enqueue(
    make_queue: QueueFactory, raw: Redis, clock: FakeClock
) -> None:
    waiting, producer = await make_queue(poll_interval_s=0.05), await make_queue()
    await raw.config_resetstat()
    waiters = [asyncio.create_task(waiting.wait_for_work(10)) for _ in range(50)]
    await asyncio.sleep(0.5)  # ten poll intervals with nothing queued
    assert not any(w.done() for w in waiters)
    calls = await raw.info("commandstats")
    zcards = calls.get("cmdstat_zcard", {}).get("calls", 0)
    assert 1 <= zcards <= 20, calls  # one watch for all 50 waiters, not 50 polls
    assert script_runs(calls) == 0  # no dequeue scripts while idle
    await producer.enqueue([make_request(clock, "from another host")])
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert len(await waiting.dequeue(5, LEASE_S)) == 1


async def test_a_delayed_fail_parks_the_request_in_the_delayed_zset(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="d")])
    [job] = await queue.dequeue(1, LEASE_S)
    assert job.lease_id is not None
    await queue.fail("d", job.lease_id, "provider 429", True, 30.0)
    keys = queue.keys
    assert await raw.zscore(keys.delayed, "d") == pytest.approx(clock() + 30.0)
    assert await raw.zscore(keys.pending, "d") is None
    assert await raw.hget(keys.request("d"), "not_before") is not None
    # A bad not_before from a caller below RedisQueue is refused before anything changes.
    with pytest.raises(ResponseError, match=r"not_before"):
        await _raw_eval(raw, queue, "fail", clock(), "d", "l", "r", "1", "nan")
    clock.advance(31)
    [again] = await queue.dequeue(1, LEASE_S)
    assert again.queue_id == "d"
    assert await raw.zcard(keys.delayed) == 0
    assert await raw.hget(keys.request("d"), "not_before") is None


async def test_an_uncounted_fail_run_twice_gives_the_attempt_back_once(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    """redis-py resends a whole pipeline after a dropped connection: fail.lua runs again with
    the same arguments, and must not take attempts down a second time."""
    queue = await make_queue()
    await queue.enqueue([make_request(clock, queue_id="u")])
    [job] = await queue.dequeue(1, LEASE_S)
    args = ("u", job.lease_id, "provider down", "1", 0, "0")
    first = await _raw_eval(raw, queue, "fail", clock(), *args)
    again = await _raw_eval(raw, queue, "fail", clock(), *args)
    assert (len(first), len(again)) == (2, 3)  # the second run knows it is a repeat
    assert await raw.hget(queue.keys.request("u"), "attempts") == b"0"
    # Without the eighth argument (a caller before counts) a fail is counted, as before.
    [job] = await queue.dequeue(1, LEASE_S)
    await _raw_eval(raw, queue, "fail", clock(), "u", job.lease_id, "worker error", "1", 0)
    assert await raw.hget(queue.keys.request("u"), "attempts") == b"1"


async def test_enqueue_holds_back_a_moved_request_until_its_not_before(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    queue = await make_queue()
    reqs = [make_request(clock, queue_id=q) for q in ("held", "due", "free")]
    reqs[0].attempts = 2  # a request moved from the local queue keeps its deliveries
    held_until = {"held": clock() + 30.0, "due": clock() - 1.0}
    # Two calls in one loop pass fold into one run: both send eight values per request.
    runs = script_runs(await raw.info("commandstats"))
    first, second = await asyncio.gather(
        queue.enqueue(reqs[:2], held_until=held_until), queue.enqueue(reqs[2:])
    )
    assert script_runs(await raw.info("commandstats")) == runs + 1
    assert all(r.created for r in first + second)
    keys = queue.keys
    assert await raw.zscore(keys.delayed, "held") == pytest.approx(clock() + 30.0)
    assert await raw.zscore(keys.pending, "held") is None
    assert await raw.zscore(keys.delayed, "due") is None  # its time has come: in line at once
    assert await raw.hget(keys.request("held"), "not_before") is not None
    got = await queue.dequeue(5, 3600.0)
    assert [j.queue_id for j in got] == ["due", "free"]
    assert (await queue.stats()).queued == 1
    clock.advance(31)
    [job] = await queue.dequeue(5, LEASE_S)
    assert (job.queue_id, job.attempts) == ("held", 3)
    assert await raw.hget(keys.request("held"), "not_before") is None
    # Seven values per request (the layout before not_before) are still accepted; a bad
    # not_before is refused before anything is written.
    now = clock()
    old = ("old", 5, now, now + 60, 3, b"x", 0)
    fixed = (*keys.script_keys(), keys.request("old"))
    reply = await run_script(raw, queue, "enqueue", fixed, now, queue.retention_s, 1, *old)
    assert reply[1][0][0] == 1 and await raw.zscore(keys.pending, "old") is not None
    bad = ("bad", 5, now, now + 60, 3, b"x", 0, "nan")
    fixed = (*keys.script_keys(), keys.request("bad"))
    with pytest.raises(ResponseError, match=r"not_before"):
        await run_script(raw, queue, "enqueue", fixed, now, queue.retention_s, 1, *bad)
    assert await raw.exists(keys.request("bad")) == 0


async def test_leases_are_scored_in_whole_milliseconds_and_old_second_scores_are_kept(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    """The leases zset scores a lease end in integer ms (rounded up): Redis keeps an integer
    score as a number in a small zset instead of parsing text at each comparison. A live lease
    scored in seconds by an older version is indexed again at its end, not dropped, so it is
    still reclaimed when it lapses."""
    queue = await make_queue()
    await queue.enqueue([make_request(clock, i, queue_id=f"q{i}") for i in range(2)])
    first, second = await queue.dequeue(2, LEASE_S)
    assert first.lease_expires_at is not None
    keys = queue.keys
    score = await raw.zscore(keys.leases, first.queue_id)
    assert score == math.ceil(first.lease_expires_at * 1000) and score == int(score)
    extended = await queue.extend(first.queue_id, str(first.lease_id), 2 * LEASE_S)
    assert extended.lease_expires_at is not None
    assert await raw.zscore(keys.leases, first.queue_id) == math.ceil(
        extended.lease_expires_at * 1000
    )
    # As an older version scored it: seconds, so it looks long lapsed to a millisecond bound.
    assert second.lease_expires_at is not None
    await raw.zadd(keys.leases, {second.queue_id: second.lease_expires_at})
    assert (await queue.sweep()).requeued == 0  # live: neither reclaimed nor dropped
    assert await raw.zscore(keys.leases, second.queue_id) == math.ceil(
        second.lease_expires_at * 1000
    )
    clock.advance(LEASE_S + 1)
    assert (await queue.sweep()).requeued == 1  # the second lapsed; the first was extended
    now = await queue.status(second.queue_id)
    assert now is not None and now.status == QueueStatus.QUEUED


async def test_a_brief_complete_settles_like_complete_without_the_record(
    make_queue: QueueFactory, clock: FakeClock
) -> None:
    queue = await make_queue()
    await queue.enqueue([make_request(clock, i, queue_id=f"b{i}") for i in range(2)])
    first, second = await queue.dequeue(2, LEASE_S)
    assert first.lease_id is not None and second.lease_id is not None
    await queue.complete_brief(first.queue_id, first.lease_id)
    await queue.complete_brief(first.queue_id, first.lease_id)  # a repeat changes nothing
    done = await queue.status(first.queue_id)
    assert done is not None and done.status == QueueStatus.COMPLETED
    with pytest.raises(LeaseMismatch):
        await queue.complete_brief(second.queue_id, "not-its-lease")
    with pytest.raises(NotFound):
        await queue.complete_brief("never-enqueued", "x")
    # A brief and a full complete folded into one run each get their own reply.
    full, _ = await asyncio.gather(
        queue.complete(second.queue_id, second.lease_id),
        queue.complete_brief(first.queue_id, first.lease_id),
    )
    assert full.status == QueueStatus.COMPLETED
    stats = await queue.stats()
    assert (stats.completed, stats.processing) == (2, 0)


async def test_expiry_is_scored_in_whole_milliseconds_and_old_second_scores_are_kept(
    make_queue: QueueFactory, clock: FakeClock, raw: Redis
) -> None:
    """Like the leases: the expiry zset scores in integer ms (rounded up), and a queued
    request scored in seconds by an older version is indexed again at its expiry by the sweep,
    not dropped, so it still expires on time."""
    queue = await make_queue()
    [new, old] = [make_request(clock, i, ttl_s=3600, queue_id=f"e{i}") for i in range(2)]
    await queue.enqueue([new, old])
    keys = queue.keys
    assert await raw.zscore(keys.expiry, "e0") == math.ceil(new.expires_at * 1000)
    await raw.zadd(keys.expiry, {"e1": old.expires_at})  # as an older version scored it
    assert (await queue.sweep()).expired == 0  # not due: neither expired nor dropped
    assert await raw.zscore(keys.expiry, "e1") == math.ceil(old.expires_at * 1000)
    # A request put back in line (its lease lapsed) is indexed in ms too.
    [job] = await queue.dequeue(1, LEASE_S)
    clock.advance(LEASE_S + 1)
    assert (await queue.sweep()).requeued == 1
    assert await raw.zscore(keys.expiry, job.queue_id) == math.ceil(job.expires_at * 1000)
    clock.advance(3600)
    assert (await queue.sweep()).expired == 2
    for queue_id in ("e0", "e1"):
        st = await queue.status(queue_id)
        assert st is not None and st.status == QueueStatus.EXPIRED
