"""complete_next on the failover manager while Redis is away (protocol.md 8.12): the settle of
a request that Redis holds fails with backend_unavailable, and the local backlog's jobs are
leased all the same; the request stays leased in Redis, settleable once Redis is back."""

from __future__ import annotations

from sidecar.errors import BackendUnavailable
from sidecar.models import QueueStatus
from tests.queue.resilient.test_resilient import RECOVERY_TIMEOUT_S, Clock, build
from tests.support.helpers import make_request
from tests.support.redis_server import RedisServer


async def test_a_settle_that_redis_cannot_take_is_reported_and_local_jobs_are_leased() -> None:
    clock = Clock()
    with RedisServer(appendonly=True) as server:
        queue = build(server)
        await queue.start()
        try:
            await queue.enqueue([make_request(clock, "r", queue_id="in-redis")])
            [job] = await queue.dequeue(1, 30)
            assert job.lease_id is not None
            server.kill()
            # Redis refuses: these go to the local queue in the same call.
            await queue.enqueue([make_request(clock, i, queue_id=f"l{i}") for i in range(3)])
            assert queue.mode == "local_fallback"
            got = await queue.complete_next("in-redis", job.lease_id, 2, 30, None)
            assert isinstance(got.error, BackendUnavailable) and got.completed is None
            assert got.error.details is not None and got.error.details["queue_id"] == "in-redis"
            assert [r.queue_id for r in got.leased] == ["l0", "l1"]
            server.restart()
            await queue.wait_until(queue.backlog_moved, RECOVERY_TIMEOUT_S)
            rec = await queue.status("in-redis")
            assert rec is not None and rec.status is QueueStatus.PROCESSING  # not settled
            done = await queue.complete("in-redis", job.lease_id)
            assert done.status is QueueStatus.COMPLETED
        finally:
            await queue.close()
