"""The outbox queues through the real daemon and its journal: results acknowledged in
`deliveries` and `pickups` survive a SIGKILL of the daemon (acknowledged vs found, zero lost);
one picked up (taken, then completed) stays gone; one taken by a taker that died is taken
again once its lease lapses."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.client import AsyncClient
from sidecar.errors import NotFound, SidecarError
from tests.support.daemon import running_daemon

# A real daemon started twice, loaded by concurrent producers: left out of `tests/run --quick`.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

OUTBOX = ("deliveries", "pickups")
PRODUCERS = 4  # per queue
WAIT_S = 20.0
ENOUGH = 300  # acknowledged per queue before the kill


async def _produce(
    path: str, queue: str, n: int, acked: dict[str, set[str]], enough: asyncio.Event
) -> None:
    """Enqueue results one by one until the daemon dies; each ok reply is acked. `enough` is
    set once every queue has ENOUGH acknowledged."""
    async with AsyncClient(path, timeout_s=2.0) as client:
        i = 0
        while True:
            queue_id = f"{queue}-{n}-{i}"
            i += 1
            try:
                await client.enqueue({"result": queue_id}, queue_id=queue_id, queue=queue)
            except SidecarError:
                return  # the daemon is gone: this one's outcome is unknown, not acked
            acked[queue].add(queue_id)
            if min(len(a) for a in acked.values()) >= ENOUGH:
                enough.set()


async def _wait_taken(client: AsyncClient, queue_id: str) -> str:
    """Take queue_id once its lease (held by a taker that died) has lapsed; its lease_id."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = await client.take(queue_id, lease_s=30.0)
        if job is not None:
            return job.lease_id
        await asyncio.sleep(0.1)  # a condition with a deadline: the 1 s lease lapses
    raise AssertionError(f"{queue_id} was never handed back")


async def test_outbox_entries_survive_a_sigkill_of_the_daemon() -> None:
    with running_daemon(QUEUE_LEASE_SECONDS="1") as daemon:
        path = daemon.socket_path
        acked: dict[str, set[str]] = {q: set() for q in OUTBOX}
        picked: set[str] = set()  # taken and completed: gone for good
        abandoned: list[str] = []  # taken by a "taker" that dies with the daemon
        enough = asyncio.Event()
        async with AsyncClient(path) as client:
            for i in range(20):
                await client.enqueue({"n": i}, queue_id=f"seed-{i}", queue="pickups")
                acked["pickups"].add(f"seed-{i}")
            for i in range(10):
                job = await client.take(f"seed-{i}")
                assert job is not None
                await client.complete(job.queue_id, job.lease_id, queue="pickups")
                picked.add(job.queue_id)
            for i in range(10, 15):
                job = await client.take(f"seed-{i}")
                assert job is not None
                abandoned.append(job.queue_id)
        producers = [
            asyncio.create_task(_produce(path, queue, n, acked, enough))
            for queue in OUTBOX
            for n in range(PRODUCERS)
        ]
        await asyncio.wait_for(enough.wait(), WAIT_S)
        await asyncio.to_thread(daemon.kill)  # SIGKILL, mid-stream
        await asyncio.wait_for(asyncio.gather(*producers), WAIT_S)
        daemon.start()

        lost: list[str] = []
        async with AsyncClient(path) as client:
            for queue in OUTBOX:
                for queue_id in sorted(acked[queue] - picked):
                    try:
                        await client.status(queue_id, queue=queue)
                    except NotFound:
                        lost.append(queue_id)
                stats = await client.stats(queue=queue)
                kept = len(acked[queue] - picked)
                # Unacknowledged enqueues in flight at the kill may also be there (at most
                # one per producer), never fewer than what was acknowledged.
                assert kept <= stats.queued + stats.processing <= kept + PRODUCERS
            for queue_id in sorted(picked):
                with pytest.raises(NotFound):
                    await client.status(queue_id, queue="pickups")
                assert await client.take(queue_id) is None
            for queue_id in abandoned:
                lease_id = await _wait_taken(client, queue_id)
                done = await client.complete(queue_id, lease_id, queue="pickups")
                assert done.status == "completed"
        total = sum(len(a) for a in acked.values())
        print(f"acked={total} picked={len(picked)} lost={len(lost)}")
        assert min(len(a) for a in acked.values()) >= ENOUGH
        assert lost == []
