"""Workers: take queued requests, call the provider, settle them, deliver results by callback.

Built on the public client (`dequeue`, `extend`, `complete`, `fail`). While the provider is
unavailable a request goes back with `fail(retry, delay_s=..., counts=False)` (its Retry-After,
else a backoff by attempt), so the queue holds it back instead of the worker sleeping on a
lease, and the wait costs no attempt: its TTL bounds it. A permanent error (a 4xx other than
408/429) fails it for good. A result is POSTed to the request's `callback_url` (retried, then
logged) or only logged as delivered: it is never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import structlog

from sidecar.client import AsyncClient, decode_payload
from sidecar.config import Settings
from sidecar.errors import InvalidState, LeaseMismatch, SidecarError
from sidecar.llm.breaker import Breaker
from sidecar.llm.errors import ProviderRejected, ProviderUnavailable
from sidecar.llm.providers import Body, Provider, build_provider, load_api_key
from sidecar.llm.recorder import DevelopmentResponseRecorder
from sidecar.protocol import Job

log = structlog.get_logger("sidecar.llm.worker")


class QueuedLLMRequest(msgspec.Struct):
    """The payload the gateway enqueues (gateway.queued_payload)."""

    request: dict[str, Any]
    callback_url: str | None = None


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """Tunables of one worker process."""

    concurrency: int = 4
    lease_s: float = 60.0
    wait_s: float = 5.0  # one long poll; the loop re-checks `stop` between polls
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    callback_attempts: int = 3
    callback_timeout_s: float = 5.0
    callback_backoff_s: float = 0.2


def backoff_s(attempts: int, opts: WorkerOptions) -> float:
    """Exponential backoff by delivery count: base, 2*base, 4*base, ... up to backoff_max_s."""
    return float(min(opts.backoff_max_s, opts.backoff_base_s * 2 ** max(0, attempts - 1)))


class LLMWorker:
    """Drains the queue through the provider; run() until `stop` is set."""

    def __init__(
        self,
        sidecar: AsyncClient,
        provider: Provider,
        *,
        breaker: Breaker | None = None,
        options: WorkerOptions | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.sidecar = sidecar
        self.provider = provider
        self.breaker = breaker or Breaker()
        self.opts = options or WorkerOptions()
        self._http = http or httpx.AsyncClient(timeout=self.opts.callback_timeout_s)
        self.counts = {"completed": 0, "retried": 0, "failed": 0, "callbacks": 0}

    async def run(self, stop: asyncio.Event) -> None:
        """`concurrency` loops of dequeue → provider → settle, until stop is set."""
        if self.opts.concurrency == 1:
            await self._serve(stop)
            return
        # One connection per loop: on main, concurrent first calls on one fresh AsyncClient
        # each open a connection and the later one breaks the earlier one's calls, so a
        # shared client would fail its first calls after every (re)connect.
        loops = [self._sibling() for _ in range(self.opts.concurrency)]
        try:
            async with asyncio.TaskGroup() as tg:
                for n, loop in enumerate(loops):
                    tg.create_task(loop._serve(stop), name=f"llm-worker-{n}")
        finally:
            for loop in loops:
                await loop.sidecar.close()

    def _sibling(self) -> LLMWorker:
        """A one-loop worker on its own connection, sharing provider, breaker and counts."""
        opts = dataclasses.replace(self.opts, concurrency=1)
        client = AsyncClient(self.sidecar.path, timeout_s=self.sidecar.timeout_s)
        sib = LLMWorker(client, self.provider, breaker=self.breaker, options=opts, http=self._http)
        sib.counts = self.counts
        return sib

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # The call slot is claimed before a lease is taken: while the provider is known
            # to be down (or one probe is out), requests stay queued and keep their attempts.
            if not self.breaker.allow():
                await self.breaker.wait(stop)
                continue
            try:
                jobs = await self.sidecar.dequeue(1, lease_s=self.opts.lease_s,
                                                  wait_s=self.opts.wait_s)  # fmt: skip
            except SidecarError as exc:
                self.breaker.release()
                log.warning("llm_worker_dequeue_failed", code=exc.code, error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            if not jobs:
                self.breaker.release()
            for job in jobs:
                await self.process(job, allowed=True)

    async def process(self, job: Job, *, allowed: bool = False) -> None:
        """Call the provider for one leased job and settle it; the lease is kept alive meanwhile."""
        bound = log.bind(queue_id=job.queue_id, attempts=job.attempts)
        try:
            queued = decode_payload(job, QueuedLLMRequest)
        except msgspec.ValidationError as exc:
            bound.error("llm_failed", reason="bad_payload", error=str(exc))
            if allowed:
                self.breaker.release()
            await self._settle(self.sidecar.fail(job.queue_id, job.lease_id, "bad payload",
                                                 retry=False), bound)  # fmt: skip
            return
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(job))
        try:
            await self._call_and_settle(job, queued, bound, allowed)
        except Exception:
            # A bug in a provider must not stop the worker: the request goes back, delayed.
            bound.exception("llm_worker_error")
            await self._retry(job, "worker_error", backoff_s(job.attempts, self.opts), bound)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _call_and_settle(
        self, job: Job, queued: QueuedLLMRequest, bound: Any, allowed: bool
    ) -> None:
        if not allowed and not self.breaker.allow():
            delay = max(self.breaker.retry_in(), self.opts.backoff_base_s)
            await self._retry(job, "breaker_open", delay, bound, counts=False)
            return
        try:
            reply = await self.provider.complete(queued.request)
        except ProviderUnavailable as exc:
            self.breaker.failure()
            delay = exc.retry_after_s or backoff_s(job.attempts, self.opts)
            # The provider's outage is not the request's fault: the delivery is not counted.
            await self._retry(job, exc.reason, delay, bound, counts=False)
            return
        except ProviderRejected as exc:
            self.breaker.success()
            reason = f"provider answered {exc.status}"
            await self._deliver(job, queued, {"status": "failed", "http_status": exc.status,
                                              "error": exc.body}, bound)  # fmt: skip
            if await self._settle(self.sidecar.fail(job.queue_id, job.lease_id, reason,
                                                    retry=False), bound):  # fmt: skip
                self.counts["failed"] += 1
                bound.info("llm_failed", reason=reason, retry=False)
            return
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        # Deliver before completing: a crash in between hands the request out again
        # (at least once), never completes one whose result went nowhere.
        await self._deliver(job, queued, {"status": "completed", "response": reply.body}, bound)
        if await self._settle(self.sidecar.complete(job.queue_id, job.lease_id), bound):
            self.counts["completed"] += 1
            bound.info("llm_completed", provider=self.provider.name)

    async def _retry(
        self, job: Job, reason: str, delay_s: float, bound: Any, *, counts: bool = True
    ) -> None:
        info = await self._settle(
            self.sidecar.fail(job.queue_id, job.lease_id, reason, retry=True, delay_s=delay_s,
                              counts=counts),
            bound,
        )  # fmt: skip
        if info is not None:
            self.counts["retried"] += 1
            bound.info("llm_retried", reason=reason, delay_s=round(delay_s, 3),
                       status=info.status)  # fmt: skip

    async def _settle(self, call: Any, bound: Any) -> Any:
        """Run a settle; a lease someone else owns now is logged and dropped, not raised."""
        try:
            return await call
        except (InvalidState, LeaseMismatch) as exc:
            bound.warning("llm_lease_lost", code=exc.code)
        except SidecarError as exc:
            # The lease lapses and the request is handed out again: nothing is lost.
            bound.error("llm_settle_failed", code=exc.code, error=str(exc))
        return None

    async def _keep_lease(self, job: Job) -> None:
        every = self.opts.lease_s / 3
        while True:
            await asyncio.sleep(every)  # a timer, not a poll: the lease must be renewed on time
            try:
                await self.sidecar.extend(job.queue_id, job.lease_id, lease_s=self.opts.lease_s)
            except SidecarError as exc:
                log.warning("llm_extend_failed", queue_id=job.queue_id, code=exc.code)

    async def _deliver(
        self, job: Job, queued: QueuedLLMRequest, result: Body, bound: Any
    ) -> None:
        """POST the result to callback_url (retried, then logged), or log it as delivered."""
        if not queued.callback_url:
            bound.info("llm_delivered", via="log")
            return
        body = {"queue_id": job.queue_id, **result}
        for attempt in range(1, self.opts.callback_attempts + 1):
            try:
                resp = await self._http.post(queued.callback_url, json=body)
                if resp.status_code < 300:
                    self.counts["callbacks"] += 1
                    bound.info("llm_callback_delivered", http_status=resp.status_code)
                    return
                error = f"callback answered {resp.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            if attempt < self.opts.callback_attempts:
                await asyncio.sleep(self.opts.callback_backoff_s * 2 ** (attempt - 1))
        bound.error("llm_callback_failed", attempts=self.opts.callback_attempts, error=error)

    async def aclose(self) -> None:
        """Close the callback client."""
        await self._http.aclose()


def build_recorder(settings: Settings) -> DevelopmentResponseRecorder | None:
    """The recorder the settings ask for (development and RECORD_LLM_RESPONSES), else None."""
    secrets: tuple[str, ...] = ()
    if settings.llm_provider != "mock":
        key = load_api_key(settings)
        secrets = (key,) if key else ()
    return DevelopmentResponseRecorder.from_settings(
        settings.environment,
        settings.record_llm_responses,
        settings.llm_response_log_dir,
        settings.llm_response_log_max_mb,
        secrets,
    )


def worker_options(settings: Settings, concurrency: int) -> WorkerOptions:
    """The options `sidecar work` runs with: its --concurrency and the LLM_* settings."""
    return WorkerOptions(
        concurrency=concurrency,
        lease_s=settings.queue_lease_s,
        backoff_base_s=settings.llm_retry_backoff_base_s,
        backoff_max_s=settings.llm_retry_backoff_max_s,
        callback_attempts=settings.llm_callback_attempts,
        callback_timeout_s=settings.llm_callback_timeout_s,
    )


async def serve_worker(
    settings: Settings, *, concurrency: int = 4, stop: asyncio.Event | None = None
) -> dict[str, int]:
    """What `sidecar work` runs: a worker on the configured provider until SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    provider = build_provider(settings, build_recorder(settings))
    breaker = Breaker(failures=settings.llm_breaker_failures, reset_s=settings.llm_breaker_reset_s)
    options = worker_options(settings, concurrency)
    sidecar = AsyncClient(settings.socket_path)
    worker = LLMWorker(sidecar, provider, breaker=breaker, options=options)
    log.info("llm_worker_started", provider=provider.name, concurrency=concurrency,
             socket=settings.socket_path)  # fmt: skip
    try:
        await worker.run(stop)
    finally:
        await worker.aclose()
        await provider.aclose()
        await sidecar.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("llm_worker_stopped", **worker.counts)
    return worker.counts
