"""Workers: take queued requests, call the provider at the fleet's pace, keep every result.

`LLMWorker.handle` is a `sidecar.client.run_worker` handler: run_worker takes the requests
(`concurrency` at once), keeps every lease with one keeper, completes in batches
(`complete_many`), and stops taking new requests once `stop` is set (the running ones finish).
Its `ready` gate holds off taking requests while this process knows the provider's scope is
blocked (the limiter refused with a long wait, the shared breaker is open, the provider asked
for a pause): they stay queued, untouched. The handler's outcome is what the request becomes:

- before the call, the limiter (`sidecar.llm.pacing.Pacer`, the daemon's fleet-wide limiter
  for this provider, base URL, model and API key) reserves one request and the estimated
  tokens (the prompt's, from its size, plus `max_tokens` or LLM_DEFAULT_MAX_TOKENS). A short
  wait is waited out holding the lease; a longer one is `RetryLater(wait, counts=False)`;
- the provider answered: the result is kept in the outbox (`sidecar.llm.outbox.keep_result`:
  `deliveries` with a callback URL, else `pickups`), then the handler returns and the request
  completes. A crash in between hands the request out again, whose result then finds the
  entry already kept under the same queue_id. The tokens the provider reports settle the
  reservation;
- the provider rejected the request (a 4xx other than 408/429): the error is kept as the
  result, then `PermanentFailure`: failed for good. So is a payload that is not a queued
  request;
- the provider is unavailable (refused, reset, timeout, 5xx, 408, 429): `RetryLater(delay,
  counts=False)`, so the wait costs no attempt (its TTL bounds it). The delay is the
  provider's `Retry-After` when it sent one, else a backoff by this process's streak of
  unavailable outcomes in a row (reset by any answer), doubling from
  LLM_RETRY_BACKOFF_BASE_SECONDS to LLM_RETRY_BACKOFF_MAX_SECONDS, with jitter. A
  `Retry-After` or rate-limit headers at zero pause the scope for the whole fleet; every
  outcome feeds the shared breaker (`limit_report`, the granted probe marked as such);
- the outbox cannot take the result now (the daemon full or away): `RetryLater`, never a
  completion whose result went nowhere;
- the result can never be kept (larger than SIDECAR_MAX_PAYLOAD_BYTES, or refused as
  invalid): a small `{queue_id, status: failed, error: result_too_large}` result is kept
  instead, so the caller hears, and `PermanentFailure` (logged `llm_result_too_large`);
- a bug (any other exception): put back after a backoff by attempt, counted.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from sidecar.client import AsyncClient, PermanentFailure, RetryLater, decode_payload, run_worker
from sidecar.config import Settings
from sidecar.errors import InvalidMessage, PayloadTooLarge, SidecarError
from sidecar.llm.errors import ProviderRejected, ProviderUnavailable
from sidecar.llm.outbox import (
    Deliverer,
    DeliveryOptions,
    keep_result,
    outbox_retry_after,
    result_body,
)
from sidecar.llm.pacing import (
    Admission,
    Pacer,
    PacingOptions,
    pacing_options,
    pause_from_headers,
    reserve_tokens,
    scope_for,
    used_tokens,
)
from sidecar.llm.providers import Provider, build_provider, load_api_key
from sidecar.llm.recorder import DevelopmentResponseRecorder
from sidecar.llm.webhooks import WebhookSigner
from sidecar.protocol import Job

log = structlog.get_logger("sidecar.llm.worker")

# The reason (and the result's `error`) of a request whose answer was too large to keep.
TOO_LARGE = "result_too_large"


class QueuedLLMRequest(msgspec.Struct):
    """The payload the gateway enqueues (gateway.queued_payload)."""

    request: dict[str, Any]
    callback_url: str | None = None


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """Tunables of one worker process; each default is its setting's (worker_options)."""

    concurrency: int = 4  # LLM_WORKER_CONCURRENCY
    lease_s: float = 60.0  # QUEUE_LEASE_SECONDS
    wait_s: float = 5.0  # LLM_WORKER_POLL_SECONDS: one long poll
    backoff_base_s: float = 1.0  # LLM_RETRY_BACKOFF_BASE_SECONDS
    backoff_max_s: float = 60.0  # LLM_RETRY_BACKOFF_MAX_SECONDS
    result_ttl_s: float = 24 * 3600.0  # LLM_RESULT_TTL_HOURS, in seconds


def backoff_s(n: int, opts: WorkerOptions) -> float:
    """The n-th backoff in a row (n >= 1): base, 2*base, 4*base, ... up to backoff_max_s."""
    return float(min(opts.backoff_max_s, opts.backoff_base_s * 2 ** max(0, n - 1)))


def jittered(delay_s: float, rand: Callable[[], float] = random.random) -> float:
    """A delay between half of `delay_s` and all of it, so the requests put back together
    during an outage do not all come back at the same moment."""
    return delay_s * (0.5 + 0.5 * rand())


class LLMWorker:
    """Drains the queue through the provider with `run_worker`; run() until `stop` is set.

    `counts` tells the outcomes the handler decided (completed, retried, failed); run_worker
    settles them (a settle that fails is logged there, and its request handed out again when
    its lease lapses). `client` (tests) is used instead of a connection of the worker's own.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        path: str | None = None,
        client: AsyncClient | None = None,
        scope: str | None = None,
        options: WorkerOptions | None = None,
        pacing: PacingOptions | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.path = path  # the daemon's socket (None: SIDECAR_SOCKET or the default)
        self.provider = provider
        self.opts = options or WorkerOptions()
        self._own_client = client is None
        self.client = client or AsyncClient(path)
        self.scope = scope or scope_for(provider.name, "", provider.model, None)
        self.pacer = Pacer(self.client, self.scope, pacing)
        self.counts = {"completed": 0, "retried": 0, "failed": 0}
        # Unavailable outcomes in a row in this process (any answer resets it): the backoff
        # grows with it, since a delivery put back with counts=False leaves `attempts` low.
        self.unavailable_streak = 0
        self._rand = rand

    async def run(self, stop: asyncio.Event) -> None:
        """Handle requests, `concurrency` at once, until stop is set and the running end."""

        async def calls_may_go() -> None:
            await self.pacer.wait_ready(stop)

        await run_worker(self.handle, path=self.path, concurrency=self.opts.concurrency,
                         lease_s=self.opts.lease_s, wait_s=self.opts.wait_s,
                         stop=stop, ready=calls_may_go)  # fmt: skip

    async def handle(self, job: Job) -> None:
        """run_worker's handler: returns (complete), or raises RetryLater or PermanentFailure."""
        bound = log.bind(queue_id=job.queue_id, attempts=job.attempts)
        try:
            queued = decode_payload(job, QueuedLLMRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            bound.error("llm_failed", reason="bad_payload", error=str(exc))
            self.counts["failed"] += 1
            raise PermanentFailure("bad payload") from None
        try:
            await self._call(job, queued, bound)
        except (PermanentFailure, RetryLater):
            raise
        except Exception:
            # A bug in a provider must not stop the worker: the request goes back, delayed.
            bound.exception("llm_worker_error")
            delay = jittered(backoff_s(job.attempts, self.opts), self._rand)
            raise self._retry_later(bound, "worker_error", delay, counts=True) from None

    def backoff(self) -> float:
        """The delay for a request put back while the provider is unavailable, from the
        streak of unavailable outcomes (at least the first step), with jitter."""
        return jittered(backoff_s(max(1, self.unavailable_streak), self.opts), self._rand)

    async def _call(self, job: Job, queued: QueuedLLMRequest, bound: Any) -> None:
        pacer = self.pacer
        tokens = reserve_tokens(queued.request, pacer.opts.default_max_tokens)
        try:
            admission = await pacer.admit(tokens, fresh=False)
        except SidecarError as exc:
            # No limiter, no call: the daemon is away (its settle of this request will most
            # likely fail too, and the lease lapse).
            bound.warning("llm_limiter_call_failed", code=exc.code, error=exc.message)
            raise self._retry_later(bound, "limiter_unavailable", self.backoff()) from None
        if not admission.granted:
            # Spread the requests put back together over a fifth of the wait.
            delay = admission.wait_s * (1 + 0.2 * self._rand())
            raise self._retry_later(bound, f"limited: {admission.reason}", delay)
        try:
            reply = await self.provider.complete(queued.request)
        except ProviderUnavailable as exc:
            self.unavailable_streak += 1
            pause = pause_from_headers(exc.status, exc.headers)
            await self._after(admission, ok=False, used=0)
            if pause is not None:
                await pacer.pause(pause, exc.reason)
            # The provider's outage is not the request's fault: the delivery is not counted.
            delay = exc.retry_after_s or pause or self.backoff()
            raise self._retry_later(bound, exc.reason, delay) from None
        except ProviderRejected as exc:
            self.unavailable_streak = 0
            await self._after(admission, ok=True, used=0)
            reason = f"provider answered {exc.status}"
            body = result_body(job.queue_id, {"status": "failed", "http_status": exc.status,
                                              "error": exc.body})  # fmt: skip
            await self._keep(job, queued.callback_url, body, bound)
            self.counts["failed"] += 1
            bound.info("llm_failed", reason=reason, retry=False)
            raise PermanentFailure(reason) from None
        self.unavailable_streak = 0
        await self._after(admission, ok=True, used=used_tokens(reply.body))
        pause = pause_from_headers(reply.status, reply.headers)
        if pause is not None:
            await pacer.pause(pause, "rate limit headers at zero")
        # Kept before completing: a crash in between hands the request out again (at least
        # once), never completes one whose result went nowhere.
        body = result_body(job.queue_id, {"status": "completed", "response": reply.body})
        await self._keep(job, queued.callback_url, body, bound)
        self.counts["completed"] += 1
        bound.info("llm_completed", provider=self.provider.name)

    async def _after(self, admission: Admission, *, ok: bool, used: int | None) -> None:
        """Report the outcome to the shared breaker; settle the tokens with what was used."""
        await self.pacer.report(ok=ok, probe=admission.probe)
        await self.pacer.settle(admission.tokens, used)

    async def _keep(self, job: Job, url: str | None, body: bytes, bound: Any) -> None:
        try:
            queue = await keep_result(self.client, job.queue_id, url, body, self.opts.result_ttl_s)
        except (PayloadTooLarge, InvalidMessage) as exc:
            # Never keepable, so asking the provider again would pay for the same refusal
            # until the TTL: a small failed result tells the caller, and the request fails.
            await self._keep_too_large(job, url, len(body), exc, bound)
        except SidecarError as exc:
            # Not completed while its result is nowhere: back, uncounted (the sidecar's
            # trouble is not the request's fault); the provider will be asked again.
            bound.error("llm_result_not_kept", code=exc.code, error=exc.message)
            delay = outbox_retry_after(exc, self.backoff())
            raise self._retry_later(bound, "outbox_unavailable", delay) from None
        bound.info("llm_result_kept", queue=queue)

    async def _keep_too_large(
        self, job: Job, url: str | None, size: int, exc: SidecarError, bound: Any
    ) -> None:
        """Keep `{queue_id, status: failed, error: result_too_large}` instead; fail for good."""
        bound.error("llm_result_too_large", code=exc.code, error=exc.message, result_bytes=size)
        small = result_body(job.queue_id, {
            "status": "failed", "error": TOO_LARGE, "result_bytes": size,
            "message": "the provider's answer is larger than the sidecar keeps "
                       "(SIDECAR_MAX_PAYLOAD_BYTES)",
        })  # fmt: skip
        try:
            await keep_result(self.client, job.queue_id, url, small, self.opts.result_ttl_s)
        except (PayloadTooLarge, InvalidMessage) as again:
            # A limit below even this: the request still fails (its GET shows the reason).
            bound.error("llm_result_not_kept", code=again.code, error=again.message)
        except SidecarError as again:
            bound.error("llm_result_not_kept", code=again.code, error=again.message)
            delay = outbox_retry_after(again, self.backoff())
            raise self._retry_later(bound, "outbox_unavailable", delay) from None
        self.counts["failed"] += 1
        raise PermanentFailure(TOO_LARGE)

    def _retry_later(
        self, bound: Any, reason: str, delay_s: float, *, counts: bool = False
    ) -> RetryLater:
        self.counts["retried"] += 1
        bound.info("llm_retried", reason=reason, delay_s=round(delay_s, 3), counts=counts,
                   streak=self.unavailable_streak)  # fmt: skip
        return RetryLater(delay_s, counts=counts, reason=reason)

    async def aclose(self) -> None:
        """Close the connection (when the worker made it)."""
        if self._own_client:
            await self.client.close()


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


def worker_options(settings: Settings, concurrency: int | None = None) -> WorkerOptions:
    """The options `sidecar work` runs with: the LLM_* settings (and --concurrency if given)."""
    return WorkerOptions(
        concurrency=concurrency or settings.llm_worker_concurrency,
        lease_s=settings.queue_lease_s,
        wait_s=settings.llm_worker_poll_s,
        backoff_base_s=settings.llm_retry_backoff_base_s,
        backoff_max_s=settings.llm_retry_backoff_max_s,
        result_ttl_s=settings.llm_result_ttl_hours * 3600.0,
    )


def delivery_options(settings: Settings) -> DeliveryOptions:
    """The deliverer's options from the settings."""
    return DeliveryOptions(
        concurrency=settings.llm_delivery_concurrency,
        lease_s=settings.queue_lease_s,
        wait_s=settings.llm_worker_poll_s,
        timeout_s=settings.llm_callback_timeout_s,
        retry_max_s=settings.llm_webhook_retry_max_s,
        allowed_hosts=settings.llm_callback_allowed_hosts,
    )


def provider_scope(settings: Settings, provider: Provider) -> str:
    """The limiter scope of the configured provider (the API key hashed)."""
    key = None if provider.name == "mock" else load_api_key(settings)
    base_url = "" if provider.name == "mock" else settings.llm_base_url
    return scope_for(provider.name, base_url, provider.model, key)


async def serve_worker(
    settings: Settings, *, concurrency: int | None = None, stop: asyncio.Event | None = None
) -> dict[str, int]:
    """What `sidecar work` runs until SIGTERM/SIGINT: a worker on the configured provider and,
    unless LLM_DELIVERY_CONCURRENCY is 0, a deliverer of the `deliveries` outbox."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    provider = build_provider(settings, build_recorder(settings))
    options = worker_options(settings, concurrency)
    worker = LLMWorker(provider, path=settings.socket_path, options=options,
                       scope=provider_scope(settings, provider),
                       pacing=pacing_options(settings))  # fmt: skip
    delivering = delivery_options(settings)
    deliverer = Deliverer(path=settings.socket_path, options=delivering,
                          signer=WebhookSigner.from_settings(settings))  # fmt: skip
    log.info("llm_worker_started", provider=provider.name, concurrency=options.concurrency,
             delivery_concurrency=delivering.concurrency, scope=worker.scope,
             socket=settings.socket_path)  # fmt: skip
    runs = [worker.run(stop)]
    if delivering.concurrency > 0:
        runs.append(deliverer.run(stop))
    tasks = [asyncio.ensure_future(run) for run in runs]
    for task in tasks:
        # One that ends (the daemon unreachable at start) stops the other: one outcome.
        task.add_done_callback(lambda _: stop.set())
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
    finally:
        await deliverer.aclose()
        await worker.aclose()
        await provider.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    counts = {**worker.counts, **{f"callbacks_{k}": v for k, v in deliverer.counts.items()}}
    log.info("llm_worker_stopped", **counts)
    return counts
