"""Dead letters in the local store beyond the contract: what they cost the heap, their bounds
(count and bytes), that they never make the store refuse a request, and that every drop is
logged; an operator's purge of very many journaled in bounded records."""

from __future__ import annotations

import gc
import random
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from sidecar.config import ConfigError, Settings
from sidecar.errors import QueueFull
from sidecar.models import ListStatus, QueueName
from sidecar.queue.build import build_local_queue, build_queues, build_redis_queue
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.local.events import Purged, Revived
from tests.conftest import make_local
from tests.support.helpers import FakeClock, make_request

LEASE_S = 30.0


@pytest.mark.slow
async def test_dead_letter_bytes_match_the_real_heap_cost(clock: FakeClock) -> None:
    """Within ±10% of tracemalloc: thousands of dead letters of mixed sizes (10 B to 16 KiB),
    each failed for good with a reason of its own, payload kept."""
    rnd = random.Random(11)
    queue = make_local(clock, None, max_items=10**6, max_bytes=10**10, dead_retention_s=10**6)
    await queue.start()
    bodies = [{"prompt": "p" * int(10 * (1600 ** rnd.random()))} for _ in range(3000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, body in enumerate(bodies):
            req = make_request(clock, body, queue_id=f"dead-{i:06d}")
            # An exact copy, as the daemon keeps a payload (msgspec's encode over-allocates).
            req.payload = bytes(bytearray(req.payload or b""))
            await queue.enqueue([req])
        while jobs := await queue.dequeue(500, LEASE_S):
            for job in jobs:
                await queue.fail(job.queue_id, job.lease_id or "", f"bad {job.queue_id}", False)
        clock.advance(LEASE_S + 1)  # the lease entries fall due and go
        stats = await queue.stats()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert stats.dead_letters == len(bodies) and stats.items == 0
    reported = stats.retained_bytes  # the dead letters', and nothing else is retained
    assert reported == stats.dead_letters_bytes
    print(f"tracemalloc={used} reported={reported} ratio={reported / used:.3f}")
    assert 0.9 * used <= reported <= 1.1 * used
    rec = await queue.status("dead-000000")
    assert rec is not None and msgspec.msgpack.decode(rec.payload or b"") == bodies[0]
    await queue.close()


# -- bounds: bytes as well as count; never a refused request; never silent ---------------------


def _journaled(clock: FakeClock, folder: Path, **options: Any) -> LocalQueue:
    params: dict[str, Any] = {
        "max_items": 10_000, "max_bytes": 100 * 1024 * 1024, "high_watermark": 0.8,
        "low_watermark": 0.6, "retention_s": 60.0, "dead_retention_s": 6000.0,
    }  # fmt: skip
    params.update(options)
    max_journal = params.pop("max_journal", 1024 * 1024 * 1024)
    journal = Journal(folder, fsync=False, max_bytes=max_journal)
    return LocalQueue(clock=clock, journal=journal, **params)


async def _fail_for_good(queue: LocalQueue, clock: FakeClock, qid: str, size: int = 10) -> None:
    await queue.enqueue([make_request(clock, {"p": "x" * size}, queue_id=qid, max_attempts=1)])
    [job] = await queue.dequeue(1, LEASE_S)
    await queue.fail(qid, job.lease_id or "", "provider said 400", retry=False)


async def test_past_max_dead_bytes_the_oldest_go_counted_and_logged(
    clock: FakeClock, tmp_path: Path
) -> None:
    """Dead letters of 100 KB under a 350 KB cap: the fourth pushes the first out, counted
    (stats and metric source) and logged with its queue_id; the three newest stay."""
    queue = _journaled(clock, tmp_path / "state", max_dead_bytes=350_000)
    await queue.start()
    with structlog.testing.capture_logs() as logs:
        for i in range(4):
            await _fail_for_good(queue, clock, f"big-{i}", size=100_000)
            clock.advance(1)
        stats = await queue.stats()
    assert stats.dead_letters == 3 and stats.dead_letters_dropped == 1
    assert 300_000 < stats.dead_letters_bytes <= 350_000
    assert await queue.status("big-0") is None
    assert (await queue.status("big-3")) is not None
    dropped = [e for e in logs if e["event"] == "dead_letter_dropped"]
    assert [e["queue_id"] for e in dropped] == ["big-0"]
    assert dropped[0]["log_level"] == "warning" and dropped[0]["bytes"] > 100_000
    assert dropped[0]["cap"] == "max_dead_bytes" and dropped[0]["status"] == "failed"
    await queue.close()
    # The cap holds after a restart with a smaller one: trimmed at start, counted again.
    again = _journaled(clock, tmp_path / "state", max_dead_bytes=150_000)
    with structlog.testing.capture_logs() as logs:
        await again.start()
    stats = await again.stats()
    assert stats.dead_letters == 1 and stats.dead_letters_dropped == 3
    assert [e["queue_id"] for e in logs if e["event"] == "dead_letter_dropped"] == [
        "big-1", "big-2",
    ]  # fmt: skip
    await again.close()


async def test_expired_dead_letters_never_make_the_store_refuse(
    clock: FakeClock, tmp_path: Path
) -> None:
    """A 4 MiB journal, 40 requests of 100 KB that expire unprocessed (4 MB of dead letters
    in every snapshot): the next enqueues are still taken, up to the live budget."""
    queue = _journaled(clock, tmp_path / "state", max_journal=4 * 1024 * 1024)
    await queue.start()
    for i in range(40):
        req = make_request(clock, {"p": "x" * 100_000}, queue_id=f"exp-{i}", ttl_s=10)
        await queue.enqueue([req])
    clock.advance(11)
    stats = await queue.stats()
    assert stats.items == 0 and stats.dead_letters == 40
    for i in range(20):  # 2 MB of live requests: segments fill, snapshots hold the dead too
        await queue.enqueue([make_request(clock, {"p": "z" * 100_000}, queue_id=f"new-{i}")])
    assert queue._journal is not None
    assert queue._journal.disk_bytes > queue._journal.max_bytes  # dead letters beside it
    stats = await queue.stats()
    assert stats.items == 20 and stats.dead_letters == 40 and stats.rejections == {}
    # The live budget itself still holds: 4 MiB of live requests do not fit.
    with pytest.raises(QueueFull) as info:
        for i in range(40):
            req = make_request(clock, {"p": "w" * 100_000}, queue_id=f"more-{i}")
            await queue.enqueue([req])
    assert info.value.details["reason"] == "max_journal"
    await queue.close()


async def test_an_outbox_store_logs_its_dead_letter_drops(tmp_path: Path) -> None:
    """The deliveries and pickups stores are built without hooks: the store logs itself."""
    settings = Settings.from_env(
        {"SIDECAR_STATE_DIR": str(tmp_path / "state"), "QUEUE_MAX_DEAD": "1",
         "SIDECAR_JOURNAL_FSYNC": "off"}
    )  # fmt: skip
    queues = build_queues(settings)
    await queues.start()
    try:
        deliveries = queues.locals[QueueName.DELIVERIES.value]
        assert deliveries._state.max_dead_bytes == settings.queue_max_dead_bytes == 64 << 20
        clock = FakeClock()
        with structlog.testing.capture_logs() as logs:
            for qid in ("o1", "o2"):
                await deliveries.enqueue([make_request(clock, queue_id=qid, max_attempts=1)])
                [job] = await deliveries.dequeue(1, LEASE_S)
                await deliveries.fail(qid, job.lease_id or "", "gone", retry=False)
            await deliveries.stats()
        assert [e["queue_id"] for e in logs if e["event"] == "dead_letter_dropped"] == ["o1"]
    finally:
        await queues.close(0.0)


async def test_both_stores_get_the_dead_letter_byte_cap(tmp_path: Path) -> None:
    env = {"SIDECAR_STATE_DIR": str(tmp_path / "state"), "QUEUE_MAX_DEAD_MB": "1.5"}
    settings = Settings.from_env(env)
    local = build_local_queue(settings, journaled=False)
    assert local._state.max_dead_bytes == 1_572_864
    redis = build_redis_queue(Settings.from_env({**env, "REDIS_URL": "redis://127.0.0.1:1"}))
    try:
        assert redis._max_dead_bytes == 1_572_864
    finally:
        await redis.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("-1", "QUEUE_MAX_DEAD_MB='-1' is invalid: expected a number of megabytes >= 0"),
        ("lots", "QUEUE_MAX_DEAD_MB='lots' is invalid: expected a number of megabytes >= 0"),
        ("nan", "QUEUE_MAX_DEAD_MB='nan' is invalid"),
    ],
)
def test_a_bad_max_dead_mb_names_the_variable(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"QUEUE_MAX_DEAD_MB": raw})
    assert message in str(info.value)


# -- an operator's purge of very many: journal records of bounded size -------------------------


async def test_a_purge_of_25k_dead_letters_is_journaled_in_chunks(
    clock: FakeClock, tmp_path: Path
) -> None:
    """Every Purged and Revived record names at most 10,000 ids (a record longer than the
    journal's 16 MiB tail limit would stop the next start); replay ends in the same state."""
    folder = tmp_path / "state"
    queue = _journaled(clock, folder, max_items=100_000, max_dead=100_000)
    await queue.start()
    n = 25_000
    reqs = [make_request(clock, queue_id=f"d-{i:05d}", ttl_s=5) for i in range(n)]
    for i in range(0, n, 1000):
        await queue.enqueue(reqs[i : i + 1000])
    clock.advance(6)
    assert (await queue.stats()).dead_letters == n
    requeued = await queue.requeue_dead([f"d-{i:05d}" for i in range(12_000)])
    assert len(requeued.requeued) == 12_000
    assert await queue.purge_records(ListStatus.EXPIRED, None) == n - 12_000
    assert await queue.purge_records(ListStatus.QUEUED, None) == 12_000
    before = await queue.stats()
    # Read the segment as a restart would, before close compacts it into a snapshot.
    journal = queue._journal
    assert journal is not None
    [segment] = sorted(folder.glob("journal-*.log"))
    events = list(journal._events(segment, last=True))
    sizes = {
        kind: [len(e.qids) for e in events if isinstance(e, kind)] for kind in (Purged, Revived)
    }
    assert sizes == {Revived: [10_000, 2_000], Purged: [10_000, 3_000, 10_000, 2_000]}
    # The files as a crash now would leave them (no final snapshot): replay gives the same state.
    shutil.copytree(folder, tmp_path / "crashed")
    await queue.close()
    again = _journaled(clock, tmp_path / "crashed", max_items=100_000, max_dead=100_000)
    await again.start()
    after = await again.stats()
    assert (after.queued, after.dead_letters, after.failed, after.expired) == (
        before.queued, before.dead_letters, before.failed, before.expired,
    )  # fmt: skip
    assert after.queued == 0 and after.dead_letters == 0 and after.retained == 0
    assert await again.status("d-00000") is None and await again.status("d-24999") is None
    await again.close()
