"""Load on the real daemon: thousands queued, rejection at the watermark, recovery below low."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.client import AsyncClient, item
from sidecar.errors import QueueFull
from tests.support.daemon import running_daemon

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

MAX_SIZE = 2000  # watermarks 0.8 / 0.6: refuse from 1600 held, accept again at 1200


async def produce(client: AsyncClient, start: int, count: int) -> tuple[list[str], list[QueueFull]]:
    acked: list[str] = []
    rejected: list[QueueFull] = []
    for i in range(start, start + count):
        try:
            res = await client.enqueue({"prompt": f"request {i}", "pad": "x" * (i % 700)})
            acked.append(res.queue_id)
        except QueueFull as err:
            rejected.append(err)
    return acked, rejected


async def test_watermark_rejects_then_recovers_and_loses_nothing() -> None:
    with running_daemon(
        QUEUE_MAX_SIZE=str(MAX_SIZE), QUEUE_HIGH_WATERMARK="0.8", QUEUE_LOW_WATERMARK="0.6"
    ) as d:
        clients = [await AsyncClient(d.socket_path).connect() for _ in range(8)]
        try:
            results = await asyncio.gather(
                *(produce(c, n * 320, 320) for n, c in enumerate(clients))
            )
            acked = [qid for ids, _ in results for qid in ids]
            rejected = [err for _, errs in results for err in errs]
            print(f"acknowledged={len(acked)} rejected={len(rejected)}")
            assert len(acked) == 1600
            assert len(rejected) == 2560 - 1600
            details = rejected[0].details
            assert details["reason"] == "high_watermark"
            assert details["items"] == 1600 and details["max_items"] == MAX_SIZE
            assert details["retry_after_s"] > 0

            c = clients[0]
            health = await c.health()
            assert health.status == "degraded"
            # Drain to just above the low watermark: still refusing (no flapping).
            drained = await drain(c, 399)
            with pytest.raises(QueueFull):
                await c.enqueue("still above low")
            drained += await drain(c, 1)  # 1200 held = the low watermark: accepting again
            extra = await c.enqueue_many([item({"after": i}) for i in range(10)])
            assert all(r.created for r in extra)

            stats = await c.stats()
            assert not stats.breaker_open
            assert stats.accepted == 1610 and stats.completed == 400
            assert stats.rejections["high_watermark"] == len(rejected) + 1
            assert stats.balanced
            # Nothing acknowledged is lost: every id is findable, queued or completed.
            every = acked + [r.queue_id for r in extra]
            found = await asyncio.gather(*(c.status(q) for q in every))
            statuses = {s.queue_id: s.status for s in found}
            lost = len(acked) + len(extra) - len(statuses)
            print(f"acknowledged={len(acked) + len(extra)} found={len(statuses)} lost={lost}")
            assert lost == 0
            assert sorted(drained) == sorted(q for q, s in statuses.items() if s == "completed")
        finally:
            for client in clients:
                await client.close()


async def drain(client: AsyncClient, count: int) -> list[str]:
    done: list[str] = []
    while len(done) < count:
        jobs = await client.dequeue(min(100, count - len(done)))
        assert jobs
        for job in jobs:
            await client.complete(job.queue_id, job.lease_id)
            done.append(job.queue_id)
    return done
