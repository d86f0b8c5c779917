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
    wait behind the poll and leases could lapse under a running handler. A job that completes
    takes the next jobs for its own slot and any free ones in the same request
    (complete_next), so a busy worker needs one round trip per job, not two.
    """
    from sidecar.client import AsyncClient  # here: sidecar.client re-exports this module

    stop = stop or asyncio.Event()
    async with AsyncClient(path) as poller, AsyncClient(path) as settler:
        hello = await poller.hello()
        lease = lease_s or hello.limits.default_lease_s
        slots = _Slots(concurrency, hello.limits.max_batch)
        keeper = _LeaseKeeper(settler, lease)
        keeping = asyncio.get_running_loop().create_task(keeper.run())
        keeping.add_done_callback(observe)
        jobs = _Jobs(settler, handler, keeper, slots, stop, lease)
        backoff = 0.05
        try:
            while not stop.is_set():
                free = slots.take(concurrency)
                if free <= 0:  # a free slot first: a job taken is always run at once
                    await slots.wait_freed()
                    continue
                try:
                    # As many as there are free slots, in one request.
                    taken = await poller.dequeue(free, lease_s=lease, wait_s=wait_s)
                except SidecarError as exc:
                    slots.give(free)
                    # The daemon or its store is briefly away: back off, and keep the jobs
                    # that are running.
                    log.warning("dequeue_failed", code=exc.code, error=exc.message)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                slots.give(free - len(taken))
                jobs.start(taken)
            await jobs.wait_all()
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)


class _Slots:
    """How many of the worker's `concurrency` slots are taken: one by each job whose handler
    runs, and one by each job that a request in flight (a dequeue, a complete_next) may bring
    back. A job's settle does not hold a slot: the next jobs are asked for while it is sent."""

    def __init__(self, concurrency: int, max_batch: int) -> None:
        self.limit = concurrency
        self.max_batch = max_batch
        self.taken = 0
        self._freed = asyncio.Event()

    def take(self, most: int) -> int:
        """Up to `most` free slots (at most max_batch), now taken; 0 when none is free."""
        n = max(0, min(self.limit - self.taken, most, self.max_batch))
        self.taken += n
        return n

    def give(self, n: int) -> None:
        if n > 0:
            self.taken -= n
            self._freed.set()

    async def wait_freed(self) -> None:
        self._freed.clear()
        await self._freed.wait()


class _Jobs:
    """The running jobs: each holds one slot from its start until its handler ends; its task
    then settles it outside the slot."""

    def __init__(
        self,
        client: AsyncClient,
        handler: Handler,
        keeper: _LeaseKeeper,
        slots: _Slots,
        stop: asyncio.Event,
        lease_s: float,
    ) -> None:
        self.client, self.handler, self.keeper = client, handler, keeper
        self.slots, self.stop, self.lease_s = slots, stop, lease_s
        self.running: set[asyncio.Task[None]] = set()
        self.settling = False  # a complete_next is in flight
        self._loop = asyncio.get_running_loop()

    def start(self, jobs: list[Job]) -> None:
        """Run each job in a slot already taken for it."""
        for job in jobs:
            task = self._loop.create_task(self._run(job))
            self.running.add(task)
            task.add_done_callback(self._finished)
            task.add_done_callback(observe)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)

    async def wait_all(self) -> None:
        """Until every job has ended (a job ending may have started others)."""
        while self.running:
            await asyncio.gather(*self.running, return_exceptions=True)

    async def _run(self, job: Job) -> None:
        self.keeper.add(job)
        failed: tuple[str, bool] | None = None  # (reason, retry) when the handler raised
        try:
            try:
                await self.handler(job)
            except PermanentFailure as exc:
                failed = (f"{exc}", False)
            except Exception as exc:
                failed = (f"{type(exc).__name__}: {exc}", True)
            finally:
                self.slots.give(1)  # the handler's slot, free while its outcome is sent
            if failed is None:
                await self._complete(job)
            else:
                reason, retry = failed
                call = self.client.fail(job.queue_id, job.lease_id, reason, retry=retry)
                await _settle(call, job)
        finally:
            self.keeper.remove(job)

    async def _complete(self, job: Job) -> None:
        """Complete the job. One completion at a time (none in flight, not stopping) also takes
        the next jobs in the same request: one for this job's slot (handed on) and one for each
        slot free now. Completions that come meanwhile are sent plainly: the daemon folds them
        into one Redis run, and the poller refills their slots in one dequeue, which measured
        faster than a complete_next each (their dequeues do not fold)."""
        # Its own slot was given back a moment ago, with no await since: it is free for the
        # jobs this request brings, unless a dequeue in flight already counts on it.
        want = 0 if self.stop.is_set() or self.settling else self.slots.take(self.slots.max_batch)
        if want == 0:
            await _settle(self.client.complete(job.queue_id, job.lease_id), job)
            return
        self.settling = True
        try:
            got = await self.client.complete_next(
                job.queue_id, job.lease_id, want, lease_s=self.lease_s
            )
        except SidecarError as exc:
            self.slots.give(want)
            log.warning("settle_failed", queue_id=job.queue_id, code=exc.code, error=exc.message)
            return
        finally:
            self.settling = False
        if got.error is not None:
            log.warning("settle_failed", queue_id=job.queue_id, code=got.error.code,
                        error=got.error.message)  # fmt: skip
        # Each new job holds a slot of its own from now; `want` was only held for the reply.
        self.slots.taken += len(got.items)
        self.slots.give(want)
        self.start(got.items)


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
