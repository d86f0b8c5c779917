"""The worker helper: take requests, run a handler on each, keep their leases, settle them.

`sidecar.client.run_worker`, `sidecar.client.PermanentFailure` and `sidecar.client.RetryLater`
are the same objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from sidecar.client.aio import AsyncClient
from sidecar.client.connection import observe
from sidecar.errors import BackendUnavailable, SidecarError, SidecarUnavailable, UnknownOp
from sidecar.protocol import DEFAULT_QUEUE, CompleteManyResult, Job, RequestInfo

log = structlog.get_logger("sidecar.client")
# The most completions one complete_many carries. Smaller requests keep several in flight, so
# the worker, the daemon and Redis work at once instead of in turns on one large batch.
SETTLE_BATCH = 16


class PermanentFailure(Exception):
    """Raise from a worker handler to fail the request without a retry."""


class RetryLater(Exception):
    """Raise from a worker handler to put the request back, held for `delay_s` seconds.

    `counts=False` (the default): the delivery is not counted against the request's
    max_attempts (the daemon's `fail(retry=True, delay_s=..., counts=False)`), for a request
    whose handler could not run it for a reason outside the request (a dependency that is
    down); only its TTL bounds the waits. `counts=True` is a plain retry, delayed. `reason`
    is the fail's reason (default: the exception's text).
    """

    def __init__(self, delay_s: float = 0.0, *, counts: bool = False, reason: str = "") -> None:
        delay = float(delay_s)
        if not delay >= 0:  # NaN included
            raise ValueError(f"delay_s must be >= 0, not {delay_s!r}")
        super().__init__(reason or f"retry in {delay:g} s")
        self.delay_s = delay
        self.counts = counts
        self.reason = reason or f"retry in {delay:g} s"


Handler = Callable[[Job], Awaitable[None]]


async def run_worker(
    handler: Handler,
    *,
    path: str | None = None,
    concurrency: int = 1,
    lease_s: float | None = None,
    wait_s: float = 5.0,
    stop: asyncio.Event | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    queue: str = DEFAULT_QUEUE,
) -> None:
    """Take requests and run handler on each, extending the lease while it runs.

    queue: the named queue to drain (`requests`; the deliverer drains `deliveries`).

    ready, when given, is awaited before each poll for new jobs and returns once jobs may be
    taken (or `stop` is set): a handler that knows no job can be served now (the LLM worker's
    open breaker) keeps them queued rather than taking each and putting it back.

    A handler that returns completes the request; one that raises fails it with a retry
    (PermanentFailure: without; RetryLater: held back for its delay, by default without
    counting the delivery as an attempt). Runs until `stop` is set. Long-polling dequeues
    use their own connection: on a shared one, replies come in order, so every extend and
    complete would wait behind the poll and leases could lapse under a running handler. The
    jobs that complete in one loop pass are settled in one request that also takes as many
    next jobs (complete_many), so a busy worker needs one round trip per batch of jobs, not two
    per job.
    """
    stop = stop or asyncio.Event()
    async with AsyncClient(path) as poller, AsyncClient(path) as settler:
        hello = await poller.hello()
        lease = lease_s or hello.limits.default_lease_s
        slots = _Slots(concurrency, hello.limits.max_batch)
        keeper = _LeaseKeeper(settler, lease, queue)
        keeping = asyncio.get_running_loop().create_task(keeper.run())
        keeping.add_done_callback(observe)
        jobs = _Jobs(
            settler, handler, keeper, slots, stop, lease, hello.limits.max_delay_s, queue
        )
        backoff = 0.05
        try:
            while not stop.is_set():
                if ready is not None:
                    await ready()
                    if stop.is_set():
                        break
                # While completions are out, they take the next jobs (and free slots);
                # the poller asks for jobs only when none is, so it never races them.
                free = slots.take(concurrency) if not jobs.settling else 0
                if free <= 0:  # a free slot first: a job taken is always run at once
                    await slots.wait_freed()
                    continue
                try:
                    # As many as there are free slots, in one request.
                    taken = await poller.dequeue(free, lease_s=lease, wait_s=wait_s, queue=queue)
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
    runs, and one by each job that a request in flight (a dequeue, a complete_many) may bring
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

    def wake(self) -> None:
        self._freed.set()

    async def wait_freed(self) -> None:
        self._freed.clear()
        await self._freed.wait()


class _Jobs:
    """The running jobs: each holds one slot from its start until its handler ends. The jobs
    that complete in one loop pass are then settled together, and bring the next jobs."""

    def __init__(
        self,
        client: AsyncClient,
        handler: Handler,
        keeper: _LeaseKeeper,
        slots: _Slots,
        stop: asyncio.Event,
        lease_s: float,
        max_delay_s: float,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        self.client, self.handler, self.keeper = client, handler, keeper
        self.slots, self.stop, self.lease_s = slots, stop, lease_s
        # The daemon's longest delay_s (hello): a longer RetryLater holds the request that
        # long rather than have its fail refused and its lease lapse (a counted attempt).
        self.max_delay_s = max_delay_s
        self.queue = queue  # the named queue the jobs came from, where they are settled
        self.running: set[asyncio.Task[None]] = set()
        self.settling = 0  # completions waiting to be sent or in flight
        self._done: list[Job] = []  # completed this loop pass, not sent yet
        self._scheduled = False
        self._batches = True  # False once the daemon turns out older than complete_many
        self._loop = asyncio.get_running_loop()

    def start(self, jobs: list[Job]) -> None:
        """Run each job in a slot already taken for it."""
        for job in jobs:
            self._track(self._loop.create_task(self._run(job)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        task.add_done_callback(observe)

    async def wait_all(self) -> None:
        """Until every job has ended and been settled (a settle may have started others)."""
        while self.running or self._done:
            self._send_completes()
            await asyncio.gather(*self.running, return_exceptions=True)

    async def _run(self, job: Job) -> None:
        self.keeper.add(job)
        failed: _Failed | None = None  # when the handler raised
        try:
            try:
                await self.handler(job)
            except PermanentFailure as exc:
                failed = _Failed(f"{exc}", retry=False)
            except RetryLater as exc:
                delay_s = min(exc.delay_s, self.max_delay_s)
                failed = _Failed(exc.reason, retry=True, delay_s=delay_s, counts=exc.counts)
            except Exception as exc:
                failed = _Failed(f"{type(exc).__name__}: {exc}", retry=True)
            finally:
                self.slots.give(1)  # the handler's slot, free while its outcome is sent
        except BaseException:
            self.keeper.remove(job)
            raise
        if failed is None:
            self._complete(job)  # its lease is kept until the completion is answered
            return
        try:
            await _settle(failed.send(self.client, job, self.queue), job)
        finally:
            self.keeper.remove(job)

    def _complete(self, job: Job) -> None:
        """Join the completions of this loop pass: they leave together (at most SETTLE_BATCH
        in one request), and each request asks for as many new jobs as it completes."""
        self._done.append(job)
        self.settling += 1
        if len(self._done) >= SETTLE_BATCH:
            self._send_completes()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._send_scheduled)

    def _send_scheduled(self) -> None:
        self._scheduled = False
        self._send_completes()

    def _send_completes(self) -> None:
        batch, self._done = self._done, []
        if batch:
            # The slots the batch's jobs gave back (and up to SETTLE_BATCH free ones): a job
            # taken is always run at once, and the poller waits while completions are out.
            # None when stopping, nor for plain completes (a daemon older than complete_many).
            asks = not self.stop.is_set() and self._batches
            want = self.slots.take(max(len(batch), SETTLE_BATCH)) if asks else 0
            self._track(self._loop.create_task(self._settle_batch(batch, want)))

    async def _completed(self, batch: list[Job], want: int) -> CompleteManyResult | None:
        """complete_many for batch; None when the daemon is older than it, after plain
        completes (which AsyncClient still sends together)."""
        if self._batches:
            leases = [(job.queue_id, job.lease_id) for job in batch]
            try:
                return await self.client.complete_many(
                    leases, want, lease_s=self.lease_s, info=False, queue=self.queue
                )
            except UnknownOp:
                self._batches = False
        complete, queue = self.client.complete, self.queue
        await asyncio.gather(
            *(_settle(complete(j.queue_id, j.lease_id, queue=queue), j) for j in batch)
        )
        return None

    async def _settle_batch(self, batch: list[Job], want: int) -> None:
        try:
            got = await self._completed(batch, want)
        except SidecarError as exc:
            # The daemon or its store is briefly away: a completion not taken lapses, and its
            # request is handed out again (delivery is at least once).
            self.slots.give(want)
            for job in batch:
                log.warning("settle_failed", queue_id=job.queue_id, code=exc.code,
                            error=exc.message)  # fmt: skip
            return
        except BaseException:
            self.slots.give(want)
            raise
        finally:
            self.settling -= len(batch)
            for job in batch:
                self.keeper.remove(job)
            if not self.settling:
                self.slots.wake()  # the poller's turn: it waits while completions are out
        if got is None:
            self.slots.give(want)
            return
        for job, one in zip(batch, got.results, strict=False):
            if one.error is not None:
                log.warning("settle_failed", queue_id=job.queue_id, code=one.error.code,
                            error=one.error.message)  # fmt: skip
        # Each new job holds a slot of its own from now; `want` was only held for the reply.
        self.slots.taken += len(got.items)
        self.slots.give(want)
        self.start(got.items)


@dataclass(frozen=True)
class _Failed:
    """How a handler that raised is reported: one fail call."""

    reason: str
    retry: bool
    delay_s: float | None = None  # None: the plain fail of a handler that raised
    counts: bool = True

    def send(self, client: AsyncClient, job: Job, queue: str) -> Awaitable[RequestInfo]:
        if self.delay_s is None:
            return client.fail(
                job.queue_id, job.lease_id, self.reason, retry=self.retry, queue=queue
            )
        return client.fail(job.queue_id, job.lease_id, self.reason, retry=self.retry,
                           delay_s=self.delay_s, counts=self.counts, queue=queue)  # fmt: skip


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

    def __init__(self, client: AsyncClient, lease_s: float, queue: str = DEFAULT_QUEUE) -> None:
        self._client = client
        self._queue = queue
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
            await self._client.extend(job.queue_id, job.lease_id, self._lease_s, queue=self._queue)
        except (BackendUnavailable, SidecarUnavailable):
            pass  # the store or the daemon is briefly away; the next round tries again
        except SidecarError as exc:
            if self._due.pop(job.lease_id, None) is not None:  # not settled meanwhile
                log.warning("lease_lost", queue_id=job.queue_id, code=exc.code, error=exc.message)
        except Exception:
            # Kept for the next round: one odd failure must not stop every job's extensions.
            log.exception("lease_extend_failed", queue_id=job.queue_id)
