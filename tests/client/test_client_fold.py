"""AsyncClient sends the single enqueues of one loop pass as one batch, and the single completes
as one complete_many (sidecar/client/fold.py), and every caller still gets what it alone would
have got. Against the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.client import AsyncClient, item
from sidecar.client.fold import FOLD_ITEM_MAX_BYTES, FOLD_MAX_BYTES, FOLD_MAX_ITEMS
from sidecar.errors import (
    InternalError,
    LeaseMismatch,
    PayloadTooLarge,
    QueueFull,
    SidecarUnavailable,
    UnknownOp,
)
from sidecar.protocol import (
    AnyRequest,
    Complete,
    EnqueuedItem,
    EnqueueResult,
    ErrorReply,
    FrameReader,
    OkReply,
    RequestInfo,
    append_frame,
    decode_request,
    error_reply,
)
from tests.support.daemon import running_daemon
from tests.support.metrics_scrape import value

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow


async def _enqueue_requests(client: AsyncClient) -> float:
    """How many enqueue requests the daemon has answered (its own metric)."""
    text = (await client.metrics()).text
    return value(text, "sidecar_request_duration_seconds_count", op="enqueue")


async def test_concurrent_enqueues_leave_as_one_request_and_each_caller_gets_its_own() -> None:
    with running_daemon() as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            before = await _enqueue_requests(client)
            n = FOLD_MAX_ITEMS + 1
            calls = (client.enqueue({"n": i}, priority=i % 10) for i in range(n))
            got = await asyncio.gather(*calls)
            # The first left at once, with nothing in flight; the rest, made while it was out,
            # left together.
            assert await _enqueue_requests(client) == before + 2
            assert len({g.queue_id for g in got}) == n and all(g.created for g in got)
            jobs = await client.dequeue(n)
            by_id = {j.queue_id: j for j in jobs}
            for i, g in enumerate(got):  # each caller's id names its own payload and priority
                assert by_id[g.queue_id].priority == i % 10
            # Past FOLD_MAX_ITEMS, the batch leaves at once and the rest make another.
            before = await _enqueue_requests(client)
            calls = (client.enqueue({"n": i}) for i in range(2 * FOLD_MAX_ITEMS + 3))
            await asyncio.gather(*calls)
            assert await _enqueue_requests(client) == before + 4  # 1, 32, 32, then 2
            # A payload too large to fold goes alone, beside the batch of the small ones.
            before = await _enqueue_requests(client)
            big = "x" * (FOLD_ITEM_MAX_BYTES + 1)
            small = (client.enqueue(s) for s in "abc")
            await asyncio.gather(client.enqueue(big), *small)
            assert await _enqueue_requests(client) == before + 3  # big, "a" at once, "b" + "c"


async def test_one_refused_item_fails_alone_and_the_others_are_stored_once() -> None:
    with running_daemon(SIDECAR_MAX_PAYLOAD_BYTES="1024") as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            calls = [client.enqueue(f"small {i}") for i in range(5)]
            calls.insert(2, client.enqueue("y" * 2000))  # over this daemon's payload limit
            results = await asyncio.gather(*calls, return_exceptions=True)
            bad = results.pop(2)
            assert isinstance(bad, PayloadTooLarge)
            assert bad.details["size"] > 1024  # its own error, as if sent alone
            assert not any(isinstance(r, BaseException) for r in results)
            stats = await client.stats()
            assert stats.accepted == 5 and stats.queued == 5


async def test_a_full_queue_takes_what_fits_as_single_enqueues_would() -> None:
    async def stored(client: AsyncClient, concurrent: bool) -> int:
        if concurrent:
            calls = [client.enqueue({"n": i}) for i in range(8)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        else:
            results = []
            for i in range(8):  # one at a time: nothing to fold
                try:
                    results.append(await client.enqueue({"n": i}))
                except QueueFull as exc:
                    results.append(exc)
        assert all(isinstance(r, QueueFull) for r in results if isinstance(r, BaseException))
        ok = sum(not isinstance(r, BaseException) for r in results)
        assert (await client.stats()).queued == ok
        return ok

    counts = []
    for concurrent in (True, False):
        with running_daemon(QUEUE_MAX_SIZE="5") as daemon:
            async with AsyncClient(daemon.socket_path) as client:
                counts.append(await stored(client, concurrent))
    # The refused batch was resent item by item: as many got in as one at a time.
    assert counts[0] == counts[1] and 0 < counts[0] < 8


async def test_a_daemon_frame_limit_below_a_batch_turns_folding_off() -> None:
    # A 2 KiB frame limit: each enqueue of a 900-byte payload fits alone, four together do not.
    assert FOLD_MAX_BYTES > 4 * 900
    with running_daemon(SIDECAR_MAX_FRAME_BYTES="2048") as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            got = await asyncio.gather(*(client.enqueue("z" * 900) for _ in range(4)))
            assert len({g.queue_id for g in got}) == 4
            assert (await client.stats()).queued == 4
            before = await _enqueue_requests(client)
            again = await asyncio.gather(*(client.enqueue("z" * 900) for _ in range(4)))
            assert len(again) == 4 and (await client.stats()).queued == 8
            assert await _enqueue_requests(client) == before + 4  # each alone from now on


async def test_a_caller_cancelled_before_the_batch_leaves_stores_nothing() -> None:
    with running_daemon() as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            tasks = [asyncio.create_task(client.enqueue({"n": i})) for i in range(3)]
            # The first left at once, the others joined the batch, which leaves a pass later.
            await asyncio.sleep(0)
            tasks[1].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(done[1], asyncio.CancelledError)
            assert (await client.stats()).accepted == 2


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3])  # 3: the first alone, then a batch of two
async def test_a_daemon_gone_fails_every_caller_of_the_batch(n: int) -> None:
    with running_daemon() as daemon:
        client = await AsyncClient(daemon.socket_path, timeout_s=2.0).connect()
        daemon.stop()
        try:
            results = await asyncio.gather(
                *(client.enqueue({"n": i}) for i in range(n)), return_exceptions=True
            )
        finally:
            await client.close()
    assert all(isinstance(r, SidecarUnavailable) for r in results)


@contextlib.asynccontextmanager
async def fake_daemon(
    path: str, answer: Callable[[AnyRequest], OkReply | ErrorReply]
) -> AsyncIterator[None]:
    """A server on path that answers each request frame with answer(request)."""
    served: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = []

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def serve() -> None:
            frames = FrameReader(1 << 20)
            while data := await reader.read(65536):
                out = bytearray()
                for body in frames.feed(data):
                    append_frame(out, answer(decode_request(body)))
                writer.write(out)

        served.append((asyncio.get_running_loop().create_task(serve()), writer))

    server = await asyncio.start_unix_server(connected, path)
    try:
        yield
    finally:
        server.close()
        for task, writer in served:
            writer.close()
            await asyncio.gather(task, writer.wait_closed(), return_exceptions=True)


async def test_a_reply_with_the_wrong_number_of_items_fails_each_caller_not_hangs(
    tmp_path: Path,
) -> None:
    """A daemon that answers a batch with one result (a bug, or a server that ignores batches)
    leaves no caller waiting: each gets an internal error."""
    one = EnqueueResult(items=[EnqueuedItem(queue_id="x", status="queued", created=True,
                                            priority=5, expires_at=1.0)])  # fmt: skip

    path = str(tmp_path / "s.sock")

    def answer_one(req: AnyRequest) -> OkReply:
        return OkReply(id=req.id, result=one)

    async with fake_daemon(path, answer_one), AsyncClient(path, timeout_s=5.0) as client:
        results = await asyncio.gather(
            *(client.enqueue({"n": i}) for i in range(4)), return_exceptions=True
        )
    # The first left alone, and one result is its right answer; the batch of three is short.
    assert isinstance(results[0], EnqueuedItem)
    assert all(isinstance(r, InternalError) for r in results[1:]), results


async def _requests(client: AsyncClient, op: str) -> float:
    text = (await client.metrics()).text
    return value(text, "sidecar_request_duration_seconds_count", op=op)


async def test_concurrent_completes_leave_as_one_complete_many_each_with_its_own_answer() -> None:
    with running_daemon() as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            await client.enqueue_many([item({"n": n}) for n in range(6)])
            jobs = await client.dequeue(6)
            before = await _requests(client, "complete_many")
            leases = [(j.queue_id, "not-its-lease" if i == 3 else j.lease_id)
                      for i, j in enumerate(jobs)]  # fmt: skip
            calls = [client.complete(queue_id, lease) for queue_id, lease in leases]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert await _requests(client, "complete_many") == before + 1
            # The first left at once, with nothing in flight: the only one that went alone.
            assert await _requests(client, "complete") == 1
            lost = results.pop(3)
            assert isinstance(lost, LeaseMismatch)  # its own error, as complete raises it
            assert lost.details == {"queue_id": jobs[3].queue_id}
            assert [r.queue_id for r in results if isinstance(r, RequestInfo)] == [
                j.queue_id for i, j in enumerate(jobs) if i != 3
            ]
            assert all(isinstance(r, RequestInfo) and r.status == "completed" for r in results)
            stats = await client.stats()
            assert (stats.completed, stats.processing) == (5, 1)
            # One complete alone is sent as a plain complete.
            await client.complete(jobs[3].queue_id, jobs[3].lease_id)
            assert await _requests(client, "complete") == 2


async def test_a_daemon_without_complete_many_gets_single_completes(tmp_path: Path) -> None:
    """An older daemon answers complete_many with unknown_op: each caller's complete is sent
    alone and answered, and the client stops folding completes."""
    ops: list[str] = []

    def info(queue_id: str) -> RequestInfo:
        return RequestInfo(queue_id=queue_id, status="completed", priority=5, attempts=1,
                           max_attempts=3, created_at=1.0, expires_at=2.0, updated_at=1.5,
                           size_bytes=1)  # fmt: skip

    def answer(req: AnyRequest) -> OkReply | ErrorReply:
        ops.append(type(req).__name__)
        if isinstance(req, Complete):
            return OkReply(id=req.id, result=info(req.queue_id))
        return error_reply(req.id, UnknownOp(f"unknown op {type(req).__name__}", {"op": "x"}))

    path = str(tmp_path / "s.sock")
    async with fake_daemon(path, answer), AsyncClient(path, timeout_s=5.0) as client:
        first = await asyncio.gather(*(client.complete(f"q{i}", "l") for i in range(3)))
        second = await asyncio.gather(*(client.complete(f"r{i}", "l") for i in range(2)))
    assert [r.queue_id for r in first + second] == ["q0", "q1", "q2", "r0", "r1"]
    # q0 left at once; q1 and q2 as a complete_many, refused, then each alone; from then on
    # every complete goes alone.
    assert ops == ["Complete", "CompleteMany"] + ["Complete"] * 4
