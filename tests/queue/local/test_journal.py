"""The local store's journal: replay, torn tails, damage, write failures, compaction (issue 8).

In-process, so each fault is placed exactly. `crash()` leaves the files as a SIGKILL would:
no final snapshot, the lock released by the closed descriptor.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

import msgspec
import pytest
import structlog

from sidecar.errors import QueueFull, StorageUnavailable
from sidecar.models import QueueStats, QueueStatus
from sidecar.queue.local import Journal, JournalError, LocalQueue
from sidecar.queue.local.events import AnyEvent, Requeued
from tests.conftest import make_local
from tests.support.crash import crash_local as crash
from tests.support.daemon import running_daemon, serve_expecting_refusal
from tests.support.helpers import FakeClock, make_request

BOOKS = ("queued", "processing", "accepted", "completed", "failed", "expired", "items", "bytes")


def books(stats: QueueStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in BOOKS} | {"retained": stats.retained}


def journal_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if p.name.startswith(("journal-", "snapshot-")))


def move_aside(state: Path, prefix: str) -> None:
    [path] = [p for p in state.iterdir() if p.name.startswith(prefix)]
    path.rename(f"{path}.damaged")


def segment(state: Path) -> Path:
    [seg] = sorted(state.glob("journal-*.log"))
    return seg


async def reopen(clock: FakeClock, state: Path, **journal: object) -> LocalQueue:
    q = make_local(clock, state)
    if journal:
        q._journal = Journal(state, fsync=False, **journal)  # type: ignore[arg-type]
    await q.start()
    return q


async def busy_store(clock: FakeClock, state: Path) -> LocalQueue:
    """A store after every kind of change: enqueue, lease, extend, complete, fail, cancel."""
    q = await reopen(clock, state)
    for i in range(40):
        await q.enqueue([make_request(clock, i, queue_id=f"r{i}", priority=i % 10)])
    jobs = await q.dequeue(20, 30)
    await q.extend(jobs[0].queue_id, jobs[0].lease_id or "", 90)
    for job in jobs[1:6]:
        await q.complete(job.queue_id, job.lease_id or "")
    for job in jobs[6:9]:
        await q.fail(job.queue_id, job.lease_id or "", "provider 503", retry=True)
    for job in jobs[9:11]:
        await q.fail(job.queue_id, job.lease_id or "", "bad request", retry=False)
    queued = [f"r{i}" for i in range(40) if (await q.status(f"r{i}")).status is QueueStatus.QUEUED]  # type: ignore[union-attr]
    for qid in queued[:4]:
        await q.cancel(qid)
    return q


async def test_a_restart_after_a_crash_replays_to_the_same_books(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await busy_store(clock, tmp_path)
    before = books(await q.stats())
    records = {f"r{i}": await q.status(f"r{i}") for i in range(40)}
    crash(q)
    again = await reopen(clock, tmp_path)
    assert books(await again.stats()) == before
    assert {qid: await again.status(qid) for qid in records} == records
    await again.close()
    # A clean stop writes a snapshot; starting from it gives the same books again.
    third = await reopen(clock, tmp_path)
    assert books(await third.stats()) == before
    await third.close()


async def test_a_lease_that_lapsed_while_down_is_queued_again_with_its_attempt(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id="a")])
    [job] = await q.dequeue(1, 30)
    crash(q)
    clock.advance(31)
    again = await reopen(clock, tmp_path)
    st = await again.status("a")
    assert st is not None and st.status is QueueStatus.QUEUED and st.attempts == 1
    [retry] = await again.dequeue(1, 30)
    assert retry.queue_id == "a" and retry.attempts == 2 and retry.lease_id != job.lease_id
    await again.close()


async def test_a_request_taken_for_the_hand_over_comes_back_queued_and_uncertain(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id=f"h{i}") for i in range(3)])
    taken = await q.take_for_handover(2)
    assert [r.queue_id for r in taken] == ["h0", "h1"] and q.moving == 2
    crash(q)  # between the taking and Redis's answer
    again = await reopen(clock, tmp_path)
    assert again.moving == 0 and again.queued == 3
    assert again.uncertain_ids() == ["h0", "h1"]
    assert [j.queue_id for j in await again.dequeue(3, 30)] == ["h0", "h1", "h2"]
    await again.close()


async def test_a_torn_last_record_is_cut_with_a_warning(clock: FakeClock, tmp_path: Path) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id=f"t{i}") for i in range(3)])
    crash(q)
    seg = segment(tmp_path)
    whole = seg.stat().st_size
    with seg.open("ab") as f:  # half a record: the length says 200 bytes, 10 follow
        f.write((200).to_bytes(4, "big") + b"\0\0\0\0" + b"x" * 10)
    with structlog.testing.capture_logs() as logs:
        again = await reopen(clock, tmp_path)
    [cut] = [e for e in logs if e["event"] == "journal_tail_cut"]
    assert cut["offset"] == whole and cut["bytes"] == 18 and cut["log_level"] == "warning"
    assert (await again.stats()).queued == 3
    await again.close()


async def test_a_truncated_last_record_loses_only_that_record(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    for i in range(3):
        await q.enqueue([make_request(clock, queue_id=f"t{i}")])
    crash(q)
    seg = segment(tmp_path)
    os.truncate(seg, seg.stat().st_size - 5)  # the write of t2 was cut by the crash
    again = await reopen(clock, tmp_path)
    assert [await again.status(f"t{i}") is not None for i in range(3)] == [True, True, False]
    await again.enqueue([make_request(clock, queue_id="t3")])
    crash(again)
    third = await reopen(clock, tmp_path)  # the cut tail does not read as damage later
    assert (await third.stats()).queued == 3
    await third.close()


async def test_a_flipped_byte_before_the_tail_stops_the_start(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    for i in range(10):
        await q.enqueue([make_request(clock, queue_id=f"f{i}")])
    crash(q)
    seg = segment(tmp_path)
    data = bytearray(seg.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalError) as info:
        await reopen(clock, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(seg) in message and "damaged at byte" in message
    assert f"mv {seg} {seg}.damaged" in message


@pytest.mark.slow
def test_the_daemon_refuses_to_start_on_a_damaged_journal_with_one_line() -> None:
    with running_daemon() as daemon:
        from sidecar.client import Client

        with Client(daemon.socket_path) as c:
            for i in range(10):
                c.enqueue({"i": i})
        daemon.kill()
        state = Path(daemon.env["SIDECAR_STATE_DIR"])
        seg = segment(state)
        data = bytearray(seg.read_bytes())
        data[len(data) // 2] ^= 0xFF
        seg.write_bytes(bytes(data))
        proc = serve_expecting_refusal(daemon.env)
    assert proc.returncode == 1
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("sidecar:")]
    assert "damaged at byte" in line and f"mv {seg}" in line


class FailingDisk:
    """The journal's write seam: ENOSPC (or another errno) while `full` is set."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.full = False
        self.err = err
        self.torn = 0

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if not self.full:
            return os.write(fd, data)
        if len(data) > 1 and not self.torn:
            # A partial write first, as a filling disk does, then the error: the journal
            # must cut the half record, or the next start would read it as damage.
            self.torn = os.write(fd, data[: len(data) // 2])
            return self.torn
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_a_failed_write_refuses_the_enqueue_and_loses_nothing_acknowledged(
    clock: FakeClock, tmp_path: Path, err: int
) -> None:
    disk = FailingDisk(err)
    q = await reopen(clock, tmp_path, write=disk.write)
    q.recover_every_s = 0.0  # every enqueue retries the journal: no wait between attempts
    for i in range(5):
        await q.enqueue([make_request(clock, queue_id=f"ok{i}")])
    disk.full = True
    with pytest.raises(StorageUnavailable) as info:
        await q.enqueue([make_request(clock, queue_id="refused")])
    assert errno.errorcode[err] in info.value.message
    assert disk.torn > 0
    assert await q.status("refused") is None  # not acknowledged, not stored
    with pytest.raises(StorageUnavailable):  # refused up front while the disk stays full
        await q.enqueue([make_request(clock, queue_id="refused2")])
    health = await q.health()
    assert health.status == "degraded" and "journal cannot write" in health.reasons[0]
    stats = await q.stats()
    assert stats.queued == 5 and any("journal cannot write" in w for w in stats.warnings)
    [job] = await q.dequeue(1, 30)  # what is held is still served
    await q.complete(job.queue_id, job.lease_id or "")
    disk.full = False
    await q.enqueue([make_request(clock, queue_id="after")])  # the disk took a snapshot again
    assert (await q.health()).status == "ok"
    before = books(await q.stats())
    crash(q)
    again = await reopen(clock, tmp_path)
    assert books(await again.stats()) == before
    assert [await again.status(f"ok{i}") is not None for i in range(5)] == [True] * 5
    assert await again.status("refused") is None and await again.status("after") is not None
    await again.close()


async def test_compaction_keeps_few_files_and_the_same_state(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path, compact_bytes=4096)
    for i in range(300):
        await q.enqueue([make_request(clock, {"i": i, "pad": "p" * 100}, queue_id=f"c{i}")])
        if i % 3 == 0:
            [job] = await q.dequeue(1, 30)
            await q.complete(job.queue_id, job.lease_id or "")
    before = books(await q.stats())
    files = journal_files(tmp_path)
    assert len(files) == 2, files  # one snapshot, one segment: older ones were removed
    crash(q)
    again = await reopen(clock, tmp_path)
    assert books(await again.stats()) == before
    await again.close()


async def test_the_journal_limit_refuses_with_queue_full(clock: FakeClock, tmp_path: Path) -> None:
    q = await reopen(clock, tmp_path, max_bytes=64 * 1024)
    stored = 0
    with pytest.raises(QueueFull) as info:
        for i in range(1000):
            await q.enqueue([make_request(clock, {"pad": "p" * 500}, queue_id=f"j{i}")])
            stored += 1
    assert info.value.details["reason"] == "max_journal"
    assert 0 < stored < 1000 and (await q.stats()).queued == stored
    await q.close()


async def test_one_daemon_per_state_folder_created_0700(clock: FakeClock, tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    q = await reopen(clock, state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    second = make_local(clock, state)
    with pytest.raises(JournalError, match="in use by another sidecar"):
        await second.start()
    await q.close()


async def test_a_snapshot_moved_aside_loses_its_requests_but_the_start_goes_on(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id=f"s{i}") for i in range(3)])
    await q.close()  # s0..s2 now live in the snapshot only
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id="late")])
    await q.cancel("s0")  # a change, in the segment, to a request of the snapshot
    crash(q)
    move_aside(tmp_path, "snapshot-")  # what the operator does after damage
    with structlog.testing.capture_logs() as logs:
        again = await reopen(clock, tmp_path)
    assert [e["count"] for e in logs if e["event"] == "journal_changes_skipped"] == [1]
    assert await again.status("late") is not None and await again.status("s1") is None
    await again.close()


async def test_a_delayed_retry_stays_delayed_across_a_crash_and_a_snapshot(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id="a")])
    [job] = await q.dequeue(1, 30)
    await q.fail("a", job.lease_id or "", "provider 429", True, 20.0)
    crash(q)
    again = await reopen(clock, tmp_path)  # replays the Requeued event with its not_before
    assert await again.dequeue(1, 30) == []
    await again.close()  # a clean stop: the snapshot's Held record carries not_before
    third = await reopen(clock, tmp_path)
    assert await third.dequeue(1, 30) == []
    clock.advance(21)
    [retry] = await third.dequeue(1, 30)
    assert retry.queue_id == "a" and retry.attempts == 2
    await third.close()


async def test_a_cancelled_waiter_leaves_its_group_commit_to_the_others(
    clock: FakeClock, tmp_path: Path
) -> None:
    # Before the fix, a cancelled waiter (its client went away) cancelled the shared future
    # of its fsync group: every other request of that group failed with CancelledError, and
    # the journal's close failed with it.
    q = make_local(clock, tmp_path, fsync=True)
    await q.start()
    try:
        gone = asyncio.create_task(q.enqueue([make_request(clock, 1, queue_id="gone")]))
        kept = asyncio.create_task(q.enqueue([make_request(clock, 2, queue_id="kept")]))
        await asyncio.sleep(0)  # both appended in this pass, both waiting for its one fsync
        gone.cancel()
        [res] = await asyncio.wait_for(kept, 10)
        assert res.created and res.request.queue_id == "kept"
        assert gone.cancelled()
    finally:
        await q.close()
    assert q.unkept_at_close == 0  # the close's own wait on the journal did not fail


async def test_an_uncounted_fail_replays_its_refund_once(clock: FakeClock, tmp_path: Path) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id="u", max_attempts=1)])
    [job] = await q.dequeue(1, 30)
    back = await q.fail("u", job.lease_id or "", "provider down", True, 5.0, False)
    assert back.attempts == 0
    again = await q.fail("u", job.lease_id or "", "provider down", True, 5.0, False)
    assert again.attempts == 0  # a repeat: nothing given back twice, nothing journaled
    crash(q)
    replayed = await reopen(clock, tmp_path)  # the Requeued event carries the refund
    st = await replayed.status("u")
    assert st is not None and (st.status, st.attempts) == (QueueStatus.QUEUED, 0)
    await replayed.close()  # the snapshot holds the record with its attempts as they are
    third = await reopen(clock, tmp_path)
    assert await third.dequeue(1, 30) == []  # still held back
    clock.advance(6)
    [retry] = await third.dequeue(1, 30)
    assert retry.attempts == 1
    await third.close()


def test_a_requeued_event_journaled_before_refund_existed_replays_as_then() -> None:
    # The array a daemon before `counts` wrote: tag, qid, at, reason, failed_lease, not_before.
    old = msgspec.msgpack.encode(["req", "a", 1.5, "provider 503", "lease-1", 9.0])
    event = msgspec.msgpack.Decoder(AnyEvent).decode(old)
    assert isinstance(event, Requeued)
    assert (event.qid, event.failed_lease, event.not_before, event.refund) == (
        "a",
        "lease-1",
        9.0,
        False,
    )


async def test_a_delayed_request_is_taken_for_the_hand_over_and_comes_back_delayed(
    clock: FakeClock, tmp_path: Path
) -> None:
    q = await reopen(clock, tmp_path)
    await q.enqueue([make_request(clock, queue_id=f"d{i}", priority=5 - i) for i in range(3)])
    [job] = await q.dequeue(1, 30)  # d2, the most urgent
    await q.fail(job.queue_id, job.lease_id or "", "provider 429", True, 20.0)
    taken = await q.take_for_handover(10)
    # The delayed one goes too, and the batch is in line order (priority, then arrival).
    assert [r.queue_id for r in taken] == ["d2", "d1", "d0"] and q.queued == 0
    assert q.held_until([r.queue_id for r in taken]) == {"d2": pytest.approx(clock() + 20.0)}
    await q.return_handover(["d2", "d1", "d0"])  # Redis refused the batch
    assert [j.queue_id for j in await q.dequeue(5, 30)] == ["d1", "d0"]  # d2 still held back
    taken = await q.take_for_handover(10)
    assert [r.queue_id for r in taken] == ["d2"]
    crash(q)  # between the taking and Redis's answer
    again = await reopen(clock, tmp_path)
    assert again.uncertain_ids() == ["d2"] and again.queued == 1
    assert await again.dequeue(1, 30) == []  # held back still, after the crash
    clock.advance(21)
    [retry] = await again.dequeue(1, 30)
    assert retry.queue_id == "d2" and retry.attempts == 2
    await again.close()
