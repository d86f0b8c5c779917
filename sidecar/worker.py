"""The worker helper: take requests, run a handler on each, keep their leases, settle them.

`sidecar.client.run_worker` and `sidecar.client.PermanentFailure` are the same objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from sidecar.client_conn import observe
from sidecar.errors import BackendUnavailable, SidecarError, SidecarUnavailable
from sidecar.protocol import Job, RequestInfo

if TYPE_CHECKING:
    from sidecar.client import AsyncClient

log = structlog.get_logger("sidecar.client")



class PermanentFailure(Exception):
    """Raise from a worker handler to fail the request without a retry."""


Handler = Callable[[Job], Awaitable[None]]


async def run_worker(
    handler: Handler,
    *,
    path: str | None = None,
    concurrency: int = 1,
    lease_s: float | None = None,
    wait_s: float = 5.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Take requests and run handler on each, extending the lease while it runs.

    A handler that returns completes the request; one that raises fails it with a retry
    (PermanentFailure: without). Runs until `stop` is set. Long-polling dequeues use their own
    connection: on a shared one, replies come in order, so every extend and complete would
    wait behind the poll and leases could lapse under a running handler.
    """
    from sidecar.client import AsyncClient  # here: sidecar.client re-exports this module

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with AsyncClient(path) as poller, AsyncClient(path) as settler:
        hello = await poller.hello()
        lease = lease_s or hello.limits.default_lease_s
        keeper = _LeaseKeeper(settler, lease)
        keeping = loop.create_task(keeper.run())
        keeping.add_done_callback(observe)
        running: set[asyncio.Task[None]] = set()
        freed = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            freed.set()

        backoff = 0.05
        try:
            while not stop.is_set():
                free = min(concurrency - len(running), hello.limits.max_batch)
                if free <= 0:  # a free slot first: a job taken is always run at once
                    freed.clear()
                    await freed.wait()
                    continue
                try:
                    # As many as there are free slots, in one request.
                    jobs = await poller.dequeue(free, lease_s=lease, wait_s=wait_s)
                except SidecarError as exc:
                    # The daemon or its store is briefly away: back off, and keep the jobs
                    # that are running.
                    log.warning("dequeue_failed", code=exc.code, error=exc.message)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                for job in jobs:
                    task = loop.create_task(_run_job(settler, handler, job, keeper))
                    running.add(task)
                    task.add_done_callback(finished)
                    task.add_done_callback(observe)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)


async def _run_job(client: AsyncClient, handler: Handler, job: Job, keeper: _LeaseKeeper) -> None:
    keeper.add(job)
    try:
        try:
            await handler(job)
        except PermanentFailure as exc:
            await _settle(client.fail(job.queue_id, job.lease_id, f"{exc}", retry=False), job)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            await _settle(client.fail(job.queue_id, job.lease_id, why, retry=True), job)
        else:
            await _settle(client.complete(job.queue_id, job.lease_id), job)
    finally:
        keeper.remove(job)


async def _settle(call: Awaitable[RequestInfo], job: Job) -> None:
    """Report a job's outcome; a settle that fails is logged, never left to an unread task."""
    try:
        await call
    except SidecarError as exc:
        # The daemon restarted, or the lease lapsed: if the settle did not take effect the
        # lease lapses and the request is handed out again (delivery is at least once).
        log.warning("settle_failed", queue_id=job.queue_id, code=exc.code, error=exc.message)


class _LeaseKeeper:
    """One task for every running job: extends each lease a third of its length after the last.

    One timer for all of them instead of a task per job; the leases due at once are extended
    concurrently on the shared settling client.
    """

    def __init__(self, client: AsyncClient, lease_s: float) -> None:
        self._client = client
        self._period = lease_s / 3
        self._lease_s = lease_s
        self._due: dict[str, tuple[float, Job]] = {}  # by lease_id
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def add(self, job: Job) -> None:
        # Every job's first extension is due after the ones already held (same period), so
        # the timer needs waking only when it had nothing to keep.
        if not self._due:
            self._wake.set()
        self._due[job.lease_id] = (self._loop.time() + self._period, job)

    def remove(self, job: Job) -> None:
        self._due.pop(job.lease_id, None)

    async def run(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._loop.time()
            first = min(at for at, _ in self._due.values())
            if first > now:
                await asyncio.sleep(first - now)
                continue
            ready = [job for at, job in self._due.values() if at <= now]
            for job in ready:
                self._due[job.lease_id] = (now + self._period, job)
            await asyncio.gather(*(self._extend(job) for job in ready))

    async def _extend(self, job: Job) -> None:
        try:
            await self._client.extend(job.queue_id, job.lease_id, self._lease_s)
        except (BackendUnavailable, SidecarUnavailable):
            pass  # the store or the daemon is briefly away; the next round tries again
        except SidecarError as exc:
            if self._due.pop(job.lease_id, None) is not None:  # not settled meanwhile
                log.warning("lease_lost", queue_id=job.queue_id, code=exc.code, error=exc.message)
        except Exception:
            # Kept for the next round: one odd failure must not stop every job's extensions.
            log.exception("lease_extend_failed", queue_id=job.queue_id)
