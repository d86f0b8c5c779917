"""Workers: take queued requests, call the provider, settle them, deliver results by callback.

`LLMWorker.handle` is a `sidecar.client.run_worker` handler: run_worker takes the requests
(`concurrency` at once), keeps every lease with one keeper, completes in batches
(`complete_many`), and stops taking new requests once `stop` is set (the running ones finish).
The handler's outcome is what the request becomes:

- the provider answered: the result is delivered, then the handler returns and the request
  completes (a crash in between hands it out again: delivery is at least once);
- the provider is unavailable (refused, reset, timeout, 5xx, 408, 429) or its breaker is open:
  `RetryLater(delay_s, counts=False)`, the daemon's `fail(retry, delay_s=..., counts=False)`,
  so the queue holds the request back instead of the worker sleeping on a lease, and the wait
  costs no attempt (its TTL bounds it). The delay is the provider's `Retry-After` when it sent
  one, else a backoff by this process's streak of unavailable outcomes in a row (reset by any
  answer), doubling from LLM_RETRY_BACKOFF_BASE_SECONDS to LLM_RETRY_BACKOFF_MAX_SECONDS, with
  jitter; while the breaker is open, at least until its probe may go;
- the provider rejected the request (a 4xx other than 408/429): the error is delivered, then
  `PermanentFailure`: failed for good. So is a payload that is not a queued request;
- a bug (any other exception): put back after a backoff by attempt, counted.

Deliveries: the result `{queue_id, status, response}` (or `{queue_id, status, http_status,
error}`) is serialised once and those exact bytes are POSTed to the request's `callback_url`
by a `CallbackSender` (the SSRF policy: only public addresses unless
LLM_CALLBACK_ALLOWED_HOSTS admits the receiver; no redirects; LLM_CALLBACK_TIMEOUT_SECONDS),
signed with Standard Webhooks headers when LLM_WEBHOOK_SECRET is set (`webhook-id` is
`msg_<queue_id>`, the same on every try). Up to LLM_CALLBACK_ATTEMPTS tries,
LLM_CALLBACK_BACKOFF_SECONDS apart and doubling; a 429/503 with `Retry-After` waits that
long instead (giving up at once when it would pass LLM_WEBHOOK_RETRY_MAX_SECONDS); a 410 or a
URL the policy refuses stops at once.
Each outcome is logged with the queue_id; a result not delivered after its tries is logged
`llm_callback_failed` and is then lost to the callback: the request still completes (or
fails), and no result is stored anywhere (there is no delivery outbox yet). Without a
callback_url a result is only logged as delivered.
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

from sidecar.client import PermanentFailure, RetryLater, decode_payload, run_worker
from sidecar.config import Settings
from sidecar.llm.breaker import Breaker
from sidecar.llm.callbacks import AllowList, CallbackSender, DeliveryOutcome
from sidecar.llm.errors import ProviderRejected, ProviderUnavailable
from sidecar.llm.providers import Body, Provider, build_provider, load_api_key
from sidecar.llm.recorder import DevelopmentResponseRecorder
from sidecar.llm.webhooks import WebhookSigner
from sidecar.protocol import Job

log = structlog.get_logger("sidecar.llm.worker")


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
    callback_attempts: int = 3  # LLM_CALLBACK_ATTEMPTS
    callback_timeout_s: float = 5.0  # LLM_CALLBACK_TIMEOUT_SECONDS
    callback_backoff_s: float = 0.2  # LLM_CALLBACK_BACKOFF_SECONDS
    callback_retry_max_s: float = 3600.0  # LLM_WEBHOOK_RETRY_MAX_SECONDS
    callback_allowed_hosts: tuple[str, ...] = ()  # LLM_CALLBACK_ALLOWED_HOSTS


def backoff_s(n: int, opts: WorkerOptions) -> float:
    """The n-th backoff in a row (n >= 1): base, 2*base, 4*base, ... up to backoff_max_s."""
    return float(min(opts.backoff_max_s, opts.backoff_base_s * 2 ** max(0, n - 1)))


def jittered(delay_s: float, rand: Callable[[], float] = random.random) -> float:
    """A delay between half of `delay_s` and all of it, so the requests put back together
    during an outage do not all come back at the same moment."""
    return delay_s * (0.5 + 0.5 * rand())


class LLMWorker:
    """Drains the queue through the provider with `run_worker`; run() until `stop` is set.

    `counts` tells the outcomes the handler decided (completed, retried, failed) and the
    results delivered by callback; run_worker settles them (a settle that fails is logged
    there, and its request handed out again when its lease lapses).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        path: str | None = None,
        breaker: Breaker | None = None,
        options: WorkerOptions | None = None,
        sender: CallbackSender | None = None,
        signer: WebhookSigner | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.path = path  # the daemon's socket (None: SIDECAR_SOCKET or the default)
        self.provider = provider
        self.breaker = breaker or Breaker()
        self.opts = options or WorkerOptions()
        self._own_sender = sender is None
        self.sender = sender or CallbackSender(
            AllowList.parse(self.opts.callback_allowed_hosts), self.opts.callback_timeout_s
        )
        self.signer = signer  # None: results are POSTed unsigned
        self.counts = {"completed": 0, "retried": 0, "failed": 0, "callbacks": 0}
        # Unavailable outcomes in a row in this process (any answer resets it): the backoff
        # grows with it, since a delivery put back with counts=False leaves `attempts` low.
        self.unavailable_streak = 0
        self._rand = rand

    async def run(self, stop: asyncio.Event) -> None:
        """Handle requests, `concurrency` at once, until stop is set and the running end."""
        async def calls_may_go() -> None:
            # While the breaker is open no call can go: the requests stay queued, untouched,
            # instead of being taken and put back one by one until the probe may go.
            while not stop.is_set() and self.breaker.retry_in() > 0:
                await self.breaker.wait(stop)

        await run_worker(self.handle, path=self.path, concurrency=self.opts.concurrency,
                         lease_s=self.opts.lease_s, wait_s=self.opts.wait_s,
                         stop=stop, ready=calls_may_go)  # fmt: skip

    async def handle(self, job: Job) -> None:
        """run_worker's handler: returns (complete), or raises RetryLater or PermanentFailure."""
        bound = log.bind(queue_id=job.queue_id, attempts=job.attempts)
        try:
            queued = decode_payload(job, QueuedLLMRequest)
        except msgspec.DecodeError as exc:
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
        if not self.breaker.allow():
            # Known down (or one probe is out): no call; back when a probe may go, at least.
            delay = max(self.breaker.retry_in(), self.backoff())
            raise self._retry_later(bound, "breaker_open", delay)
        try:
            reply = await self.provider.complete(queued.request)
        except ProviderUnavailable as exc:
            self.breaker.failure()
            self.unavailable_streak += 1
            # The provider's outage is not the request's fault: the delivery is not counted.
            delay = exc.retry_after_s or self.backoff()
            raise self._retry_later(bound, exc.reason, delay) from None
        except ProviderRejected as exc:
            self.breaker.success()
            self.unavailable_streak = 0
            reason = f"provider answered {exc.status}"
            await self._deliver(job, queued.callback_url, {"status": "failed",
                                "http_status": exc.status, "error": exc.body}, bound)  # fmt: skip
            self.counts["failed"] += 1
            bound.info("llm_failed", reason=reason, retry=False)
            raise PermanentFailure(reason) from None
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        self.unavailable_streak = 0
        # Deliver before completing: a crash in between hands the request out again
        # (at least once), never completes one whose result went nowhere.
        await self._deliver(job, queued.callback_url,
                            {"status": "completed", "response": reply.body}, bound)  # fmt: skip
        self.counts["completed"] += 1
        bound.info("llm_completed", provider=self.provider.name)

    def _retry_later(
        self, bound: Any, reason: str, delay_s: float, *, counts: bool = False
    ) -> RetryLater:
        self.counts["retried"] += 1
        bound.info("llm_retried", reason=reason, delay_s=round(delay_s, 3), counts=counts,
                   streak=self.unavailable_streak)  # fmt: skip
        return RetryLater(delay_s, counts=counts, reason=reason)

    async def _deliver(self, job: Job, url: str | None, result: Body, bound: Any) -> bool:
        """POST the result to the callback URL under the policy, signed, tried up to
        callback_attempts times; or log it as delivered when there is none."""
        if not url:
            bound.info("llm_delivered", via="log")
            return True
        body = msgspec.json.encode({"queue_id": job.queue_id, **result})  # the bytes signed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.callback_retry_max_s
        tries = self.opts.callback_attempts
        attempt, outcome, why = 0, None, ""
        for attempt in range(1, tries + 1):
            try:
                headers = self.signer.headers(job.queue_id, body) if self.signer else {}
            except ValueError as exc:  # a queue_id that cannot be a webhook-id
                why = f"cannot sign the delivery: {exc}"
                break
            outcome = await self.sender.deliver(url, body, headers)
            if outcome.delivered:
                self.counts["callbacks"] += 1
                bound.info("llm_callback_delivered", attempt=attempt,
                           http_status=outcome.http_status)  # fmt: skip
                return True
            if outcome.stop or attempt == tries:
                break
            wait = outcome.retry_after_s
            if wait is None:
                wait = self.opts.callback_backoff_s * 2 ** (attempt - 1)
            elif loop.time() + wait > deadline:
                why = f"Retry-After {wait:g} s is past LLM_WEBHOOK_RETRY_MAX_SECONDS"
                break
            self._log_outcome(bound, "llm_callback_retry", outcome, attempt, wait_s=round(wait, 3))
            await asyncio.sleep(wait)
        self._log_outcome(bound, "llm_callback_failed", outcome, attempt, error=why or None)
        return False

    @staticmethod
    def _log_outcome(
        bound: Any, event: str, outcome: DeliveryOutcome | None, attempt: int, **extra: Any
    ) -> None:
        fields: dict[str, Any] = {"attempts": attempt, **extra}
        if outcome is not None:
            fields.update(verdict=str(outcome.verdict), reason=outcome.reason,
                          http_status=outcome.http_status)  # fmt: skip
        method = bound.error if event == "llm_callback_failed" else bound.warning
        method(event, **{k: v for k, v in fields.items() if v is not None})

    async def aclose(self) -> None:
        """Close the callback sender (when the worker made it)."""
        if self._own_sender:
            await self.sender.aclose()


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
        callback_attempts=settings.llm_callback_attempts,
        callback_timeout_s=settings.llm_callback_timeout_s,
        callback_backoff_s=settings.llm_callback_backoff_s,
        callback_retry_max_s=settings.llm_webhook_retry_max_s,
        callback_allowed_hosts=settings.llm_callback_allowed_hosts,
    )


async def serve_worker(
    settings: Settings, *, concurrency: int | None = None, stop: asyncio.Event | None = None
) -> dict[str, int]:
    """What `sidecar work` runs: a worker on the configured provider until SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    provider = build_provider(settings, build_recorder(settings))
    breaker = Breaker(failures=settings.llm_breaker_failures, reset_s=settings.llm_breaker_reset_s)
    options = worker_options(settings, concurrency)
    worker = LLMWorker(provider, path=settings.socket_path, breaker=breaker, options=options,
                       signer=WebhookSigner.from_settings(settings))  # fmt: skip
    log.info("llm_worker_started", provider=provider.name, concurrency=options.concurrency,
             socket=settings.socket_path)  # fmt: skip
    try:
        await worker.run(stop)
    finally:
        await worker.aclose()
        await provider.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("llm_worker_stopped", **worker.counts)
    return worker.counts
