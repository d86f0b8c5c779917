"""run_worker in-process: how many jobs it asks for, and one lease keeper for all of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest

from sidecar.app import build_server
from sidecar.client import AsyncClient, RetryLater, item, run_worker
from sidecar.client.worker import SETTLE_BATCH
from sidecar.config import Settings
from sidecar.errors import UnknownOp
from sidecar.models import QueuedRequest
from sidecar.protocol import AnyRequest, CompleteMany, Job
from sidecar.queue.base import QueueStore
from sidecar.queue.build import build_local_queue
from sidecar.server import SidecarServer
from tests.support.daemon import short_tmpdir


class Recording:
    """The local store, recording the dequeue sizes asked for and the leases extended (and,
    filled by the fixture, each request's op and the complete_many sizes it carried)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.asked: list[int] = []
        self.extended: list[str] = []
        self.ops: list[str] = []
        self.settled: list[int] = []  # completions per complete_many

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def dequeue(
        self, max_items: int, lease_s: float, max_bytes: int | None = None
    ) -> list[QueuedRequest]:
        self.asked.append(max_items)
        inner = cast(QueueStore, self._inner)
        return await inner.dequeue(max_items, lease_s, max_bytes)

    async def extend(self, queue_id: str, lease_id: str, lease_s: float) -> QueuedRequest:
        self.extended.append(queue_id)
        return await cast(QueueStore, self._inner).extend(queue_id, lease_id, lease_s)


@pytest.fixture
async def served() -> AsyncIterator[tuple[SidecarServer, Recording]]:
    with short_tmpdir() as tmp:
        settings = Settings.from_env({"SIDECAR_SOCKET": str(tmp / "s.sock")})
        store = Recording(build_local_queue(settings, journaled=False))
        server = build_server(settings, cast(QueueStore, store))
        handle = server.state.ops.handle

        async def recorded(req: AnyRequest) -> object:
            store.ops.append(str(type(req).__struct_config__.tag))
            if isinstance(req, CompleteMany):
                store.settled.append(len(req.items))
            return await handle(req)

        server.state.ops.handle = recorded  # type: ignore[method-assign]
        await server.start()
        try:
            yield server, store
        finally:
            await server.drain(5.0)


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting until {what}")


@pytest.mark.slow
async def test_run_worker_asks_for_its_free_slots_and_keeps_every_lease(
    served: tuple[SidecarServer, Recording],
) -> None:
    server, store = served
    async with AsyncClient(server.path) as producer:
        ids = [r.queue_id for r in await producer.enqueue_many([item(n) for n in range(10)])]
        gate = asyncio.Event()
        started: list[Job] = []

        async def handler(job: Job) -> None:
            started.append(job)
            await gate.wait()

        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(handler, path=server.path, concurrency=8, lease_s=1, wait_s=0.2, stop=stop)
        )
        try:
            await until(lambda: len(started) == 8, "eight handlers run")
            assert store.asked[0] == 8  # one request for all eight free slots
            # Leases of 1 s, held past two extension rounds: every running job keeps its lease.
            await until(
                lambda: all(store.extended.count(j.queue_id) >= 2 for j in started),
                "every running job's lease is extended twice",
            )
            gate.set()
            await until(lambda: len(started) == 10, "the last two run as slots free")
            for qid in ids:
                await until_completed(producer, qid)
        finally:
            gate.set()
            stop.set()
            await asyncio.wait_for(worker, 10)
    assert max(store.asked) == 8  # never more than its slots


async def until_completed(client: AsyncClient, queue_id: str) -> None:
    for _ in range(1000):
        if (await client.status(queue_id)).status == "completed":
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{queue_id} never completed")


async def work_through(
    server: SidecarServer,
    count: int,
    concurrency: int,
    *,
    wait_s: float = 0.2,
    during: Callable[[Job], Awaitable[None]] | None = None,
) -> tuple[list[str], list[str]]:
    """Enqueue count requests and run a worker until each was handled and reads completed;
    (the ids enqueued, the ids handled in order). `during` runs inside the handler."""
    async with AsyncClient(server.path) as producer:
        ids = [r.queue_id for r in await producer.enqueue_many([item(n) for n in range(count)])]
        handled: list[str] = []
        done = asyncio.Event()

        async def handler(job: Job) -> None:
            if during is not None:
                await during(job)
            handled.append(job.queue_id)
            if len(handled) == len(ids):
                done.set()

        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(handler, path=server.path, concurrency=concurrency, wait_s=wait_s,
                       stop=stop)
        )  # fmt: skip
        try:
            await asyncio.wait_for(done.wait(), 10)
            for qid in ids:
                await until_completed(producer, qid)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
    return ids, handled


async def test_run_worker_takes_the_next_jobs_as_it_completes_and_never_overruns_its_slots(
    served: tuple[SidecarServer, Recording],
) -> None:
    server, store = served
    running = 0
    most = 0

    async def during(job: Job) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)  # let the other jobs' settles interleave with this one
        running -= 1

    ids, handled = await work_through(server, 40, 4, during=during)
    assert sorted(handled) == sorted(ids)  # each once
    assert most <= 4
    # Completions took the next jobs (complete_many): after the poller's first dequeue, the
    # jobs came with the completions of the ones before them, never more than the free slots.
    assert store.ops.count("complete_many") >= 2 and "complete" not in store.ops
    assert sum(store.settled) == len(ids)
    assert max(store.asked) <= 4 and sum(store.asked) >= len(ids)
    assert (await cast(QueueStore, store).stats()).completed == len(ids)


@pytest.mark.slow
async def test_a_worker_of_one_slot_takes_each_next_job_with_its_completion(
    served: tuple[SidecarServer, Recording],
) -> None:
    """One request per job, not two: every completion carries the request for the next job."""
    server, store = served
    ids, handled = await work_through(server, 5, 1, wait_s=0.5)
    assert handled == ids
    # The first job came from the poller; the other four each with the completion before it.
    assert store.ops[store.ops.index("dequeue") :][:5] == ["dequeue"] + ["complete_many"] * 4
    assert store.asked[:5] == [1] * 5 and store.settled[:4] == [1] * 4


async def test_completions_leave_in_requests_of_at_most_settle_batch(
    served: tuple[SidecarServer, Recording],
) -> None:
    """Many jobs ending at once are settled in several smaller requests, each carrying the
    request for as many next jobs, so several are in flight together."""
    server, store = served
    ids, handled = await work_through(server, 120, 40)
    assert sorted(handled) == sorted(ids)
    assert sum(store.settled) == len(ids) and max(store.settled) == SETTLE_BATCH
    assert max(store.asked) <= 40


async def test_a_daemon_older_than_complete_many_gets_plain_completes(
    served: tuple[SidecarServer, Recording],
) -> None:
    """run_worker against a daemon that answers complete_many with unknown_op (an older one):
    every job is still completed, with plain completes, and the poller fills the slots."""
    server, store = served
    handle = server.state.ops.handle

    async def old(req: AnyRequest) -> object:
        if isinstance(req, CompleteMany):
            raise UnknownOp("unknown op 'complete_many'", {"op": "complete_many"})
        return await handle(req)

    server.state.ops.handle = old  # type: ignore[method-assign]
    ids, handled = await work_through(server, 30, 8)
    assert sorted(handled) == sorted(ids)  # each once: no lease lapsed into a redelivery
    assert (await cast(QueueStore, store).stats()).completed == len(ids)


async def test_retry_later_puts_the_request_back_held_and_uncounted(
    served: tuple[SidecarServer, Recording],
) -> None:
    """RetryLater: fail(retry, delay_s, counts=False) by default; counts=True is a plain
    delayed retry; a handler that raises anything else still fails with a counted retry."""
    server, _ = served
    async with AsyncClient(server.path) as producer:
        await producer.enqueue(item(1), queue_id="held", max_attempts=3)
        await producer.enqueue(item(2), queue_id="counted", max_attempts=3)
        await producer.enqueue(item(3), queue_id="plain", max_attempts=3)
        seen: list[str] = []

        async def handler(job: Job) -> None:
            seen.append(job.queue_id)
            if job.queue_id == "held":
                raise RetryLater(3600, reason="provider down")
            if job.queue_id == "counted":
                raise RetryLater(3600, counts=True)
            raise RuntimeError("boom")

        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(handler, path=server.path, concurrency=3, wait_s=0.1, stop=stop)
        )
        try:
            await until(lambda: {"held", "counted"} <= set(seen), "both ran")
            await until(lambda: seen.count("plain") == 3, "the plain failure retried at once")
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
        held = await producer.status("held")
        assert (held.status, held.attempts, held.reason) == ("queued", 0, "provider down")
        counted = await producer.status("counted")
        assert (counted.status, counted.attempts) == ("queued", 1)
        assert counted.reason == "retry in 3600 s"
        # Both held back for their delay: handed out once each, not again.
        assert seen.count("held") == 1 and seen.count("counted") == 1
        assert await producer.dequeue(3, lease_s=5) == []  # "plain" spent its 3 attempts
        plain = await producer.status("plain")
        assert (plain.status, plain.attempts) == ("failed", 3)
        assert plain.reason is not None and "RuntimeError: boom" in plain.reason


def test_retry_later_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay_s"):
        RetryLater(-1)
    assert RetryLater(2.5).counts is False and RetryLater(2.5).reason == "retry in 2.5 s"


async def test_ready_holds_the_poll_until_jobs_may_be_taken(
    served: tuple[SidecarServer, Recording],
) -> None:
    """While `ready` has not returned no job is taken: they stay queued, untouched."""
    server, store = served
    async with AsyncClient(server.path) as producer:
        for n in range(3):
            await producer.enqueue(item(n), queue_id=f"r{n}")
        asked = asyncio.Event()
        go = asyncio.Event()
        seen: list[str] = []

        async def ready() -> None:
            asked.set()
            await go.wait()

        async def handler(job: Job) -> None:
            seen.append(job.queue_id)

        stop = asyncio.Event()
        work = run_worker(
            handler, path=server.path, concurrency=3, wait_s=0.1, stop=stop, ready=ready
        )
        worker = asyncio.create_task(work)
        try:
            await asyncio.wait_for(asked.wait(), 10)
            stats = await producer.stats()
            assert (stats.queued, stats.processing, seen, store.asked) == (3, 0, [], [])
            go.set()
            await until(lambda: len(seen) == 3, "all three handled once ready")
        finally:
            stop.set()
            go.set()
            await asyncio.wait_for(worker, 10)


async def test_a_retry_later_past_the_daemon_s_longest_delay_holds_for_that_long(
    served: tuple[SidecarServer, Recording],
) -> None:
    """A delay the daemon would refuse is cut to its maximum: held, not left to lapse."""
    server, _ = served
    async with AsyncClient(server.path) as producer:
        await producer.enqueue(item(1), queue_id="far")
        hello = await producer.hello()
        ran = asyncio.Event()

        async def handler(job: Job) -> None:
            ran.set()
            raise RetryLater(hello.limits.max_delay_s * 10, reason="come back much later")

        stop = asyncio.Event()
        worker = asyncio.create_task(
            run_worker(handler, path=server.path, wait_s=0.1, stop=stop, lease_s=3600)
        )
        try:
            await asyncio.wait_for(ran.wait(), 10)
            for _ in range(1000):
                if (await producer.status("far")).status == "queued":
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 10)
        held = await producer.status("far")
        assert (held.status, held.attempts, held.reason) == ("queued", 0, "come back much later")
