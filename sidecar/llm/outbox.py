"""Results that reach their caller: the outbox queues and the deliverer that empties one.

A worker never completes a request whose result went nowhere. Once the provider has answered
(a result, or a rejection of the request itself), `keep_result` enqueues the result in the
daemon, under the request's own `queue_id` (a redelivered request finds the entry already there
instead of making a second one) and with the TTL LLM_RESULT_TTL_HOURS:

- to the `deliveries` queue when the request named a callback URL: a `Delivery` (the URL and
  the exact JSON bytes to POST);
- else to the `pickups` queue: a `Pickup` (the same JSON bytes), which the gateway's
  `GET /v1/requests/{queue_id}` hands out once.

These are the daemon's named queues: journaled (or in Redis) like requests, so a daemon killed
during a receiver's outage loses no result; a completed entry is deleted at once; a failed or
expired one is kept as a dead letter that an operator sees and replays (`sidecar requeue`).
The outbox holds a result only until it reaches its caller, and a result answers only the
request it belongs to: it is not a response cache.

The `Deliverer` is a `run_worker` over `deliveries` (what `sidecar work` runs beside the LLM
worker): each entry is signed (Standard Webhooks, `webhook-id` `msg_<queue_id>` on every try,
a fresh `webhook-timestamp` per try) and POSTed through the guarded `CallbackSender`:

- delivered (2xx): the handler returns, the entry completes and is deleted;
- 410 Gone, or a URL the SSRF policy refuses: `PermanentFailure`, a failed delivery, kept;
- anything else: `RetryLater(delay, counts=False)`: the receiver's `Retry-After` on a 429 or
  503 (never less than the first retry's backoff), else `delivery_backoff_s` of the entry's
  age (about a second after the first failure, growing with jitter up to
  LLM_WEBHOOK_RETRY_MAX_SECONDS). A retry that would land after the entry's expiry comes
  LAST_TRY_BEFORE_EXPIRY_S before it instead (one last try). A wait costs no attempt; the
  entry's TTL ends the retries, and it reads `expired`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from sidecar.client import AsyncClient, PermanentFailure, RetryLater, decode_payload, run_worker
from sidecar.errors import QueueFull, SidecarError, SidecarUnavailable
from sidecar.llm.callbacks import AllowList, CallbackSender, DeliveryOutcome
from sidecar.llm.webhooks import WebhookSigner
from sidecar.protocol import Job

log = structlog.get_logger("sidecar.llm.outbox")

DELIVERIES = "deliveries"
PICKUPS = "pickups"
# The first retry of a delivery comes about this long after its first failure; no retry comes
# sooner, whatever a receiver's Retry-After says (0, or a date past, would be a hot loop).
FIRST_RETRY_S = 1.0
# A retry that would come after the entry expires is moved to this long before its expiry:
# time for a deliverer to take it (a long poll) and for one delivery (its timeout), so a
# receiver back in the last hour of the TTL still gets its result.
LAST_TRY_BEFORE_EXPIRY_S = 60.0
# Waits cost no attempt (counts=False); what counts is a deliverer that died holding the entry
# (its lease lapsed). A hundred of those is an entry that kills its deliverer, not bad luck.
OUTBOX_MAX_ATTEMPTS = 100


class Delivery(msgspec.Struct, kw_only=True):
    """An entry of `deliveries`: where to POST, and the exact bytes to POST (and sign)."""

    url: str
    body: bytes


class Pickup(msgspec.Struct, kw_only=True):
    """An entry of `pickups`: the result's JSON bytes, as a callback would have received them."""

    body: bytes


def result_body(queue_id: str, result: dict[str, Any]) -> bytes:
    """The result's JSON, serialised once: `{queue_id, status, response}` or
    `{queue_id, status, http_status, error}`."""
    return msgspec.json.encode({"queue_id": queue_id, **result})


async def keep_result(
    client: AsyncClient, queue_id: str, callback_url: str | None, body: bytes, ttl_s: float
) -> str:
    """Enqueue a result in the outbox (idempotent by queue_id); the queue it went to.

    A lost connection is retried once with the same queue_id (it finds the first write if it
    landed); any other SidecarError is the caller's to handle: the request must not complete.
    """
    payload: Delivery | Pickup
    if callback_url:
        queue, payload = DELIVERIES, Delivery(url=callback_url, body=body)
    else:
        queue, payload = PICKUPS, Pickup(body=body)
    options: dict[str, Any] = {"queue_id": queue_id, "ttl_s": ttl_s, "queue": queue,
                               "max_attempts": OUTBOX_MAX_ATTEMPTS}  # fmt: skip
    try:
        await client.enqueue(payload, **options)
    except SidecarUnavailable:
        await client.enqueue(payload, **options)
    return queue


def outbox_retry_after(exc: SidecarError, default_s: float) -> float:
    """How long to hold a request whose result the outbox could not take now."""
    if isinstance(exc, QueueFull):
        return float(exc.details.get("retry_after_s", default_s))
    return default_s


def delivery_backoff_s(
    age_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """The wait before the next try of a delivery `age_s` old: about a second at first, then
    as long again as the entry's age (so the tries space out geometrically, since attempts do
    not grow with counts=False), between half of that and all of it, at most `max_s`."""
    step = min(max_s, max(FIRST_RETRY_S, age_s))
    return step * (0.5 + 0.5 * rand())


@dataclass(frozen=True, kw_only=True)
class DeliveryOptions:
    """Tunables of the deliverer; each default is its setting's (delivery_options)."""

    concurrency: int = 4  # LLM_DELIVERY_CONCURRENCY (0: this process delivers nothing)
    lease_s: float = 60.0  # QUEUE_LEASE_SECONDS
    wait_s: float = 5.0  # LLM_WORKER_POLL_SECONDS: one long poll
    timeout_s: float = 5.0  # LLM_CALLBACK_TIMEOUT_SECONDS
    retry_max_s: float = 3600.0  # LLM_WEBHOOK_RETRY_MAX_SECONDS
    allowed_hosts: tuple[str, ...] = ()  # LLM_CALLBACK_ALLOWED_HOSTS


class Deliverer:
    """Empties `deliveries`: one signed POST per entry taken, its outcome the entry's fate."""

    def __init__(
        self,
        *,
        path: str | None = None,
        options: DeliveryOptions | None = None,
        sender: CallbackSender | None = None,
        signer: WebhookSigner | None = None,
        rand: Callable[[], float] = random.random,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.opts = options or DeliveryOptions()
        self._own_sender = sender is None
        self.sender = sender or CallbackSender(
            AllowList.parse(self.opts.allowed_hosts), self.opts.timeout_s
        )
        self.signer = signer  # None: POSTed unsigned
        self.counts = {"delivered": 0, "retried": 0, "failed": 0}
        self._rand = rand
        self._now = now  # wall clock, as the daemon's created_at

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until stop is set and the deliveries in hand end."""
        await run_worker(self.handle, path=self.path, concurrency=self.opts.concurrency,
                         lease_s=self.opts.lease_s, wait_s=self.opts.wait_s, stop=stop,
                         queue=DELIVERIES)  # fmt: skip

    async def handle(self, job: Job) -> None:
        """run_worker's handler: returns (delivered), or RetryLater, or PermanentFailure."""
        age_s = max(0.0, self._now() - job.created_at)
        bound = log.bind(queue_id=job.queue_id, age_s=round(age_s, 3))
        try:
            delivery = decode_payload(job, Delivery)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            bound.error("llm_callback_failed", reason="bad_payload", error=str(exc))
            self.counts["failed"] += 1
            raise PermanentFailure("bad delivery payload") from None
        try:
            headers = self.signer.headers(job.queue_id, delivery.body) if self.signer else {}
        except ValueError as exc:  # a queue_id that cannot be a webhook-id
            bound.error("llm_callback_failed", reason="unsignable", error=str(exc))
            self.counts["failed"] += 1
            raise PermanentFailure(f"cannot sign the delivery: {exc}") from None
        outcome = await self.sender.deliver(delivery.url, delivery.body, headers)
        fields = {"verdict": str(outcome.verdict), "reason": outcome.reason,
                  "http_status": outcome.http_status}  # fmt: skip
        fields = {k: v for k, v in fields.items() if v is not None}
        if outcome.delivered:
            self.counts["delivered"] += 1
            bound.info("llm_callback_delivered", **fields)
            return
        if outcome.stop:
            self.counts["failed"] += 1
            bound.error("llm_callback_failed", **fields)
            raise PermanentFailure(outcome.reason)
        delay = self._retry_delay(job, age_s, outcome)
        self.counts["retried"] += 1
        bound.warning("llm_callback_retry", delay_s=round(delay, 3), **fields)
        raise RetryLater(delay, counts=False, reason=outcome.reason)

    def _retry_delay(self, job: Job, age_s: float, outcome: DeliveryOutcome) -> float:
        """The backoff, or the receiver's Retry-After on a 429/503 (never shorter than the
        first retry's backoff), moved before the entry's expiry when it would land after."""
        if outcome.retry_after_s is not None and outcome.http_status in (429, 503):
            floor = delivery_backoff_s(0.0, self.opts.retry_max_s, self._rand)
            delay = min(max(outcome.retry_after_s, floor), self.opts.retry_max_s)
        else:
            delay = delivery_backoff_s(age_s, self.opts.retry_max_s, self._rand)
        last_try = job.expires_at - self._now() - LAST_TRY_BEFORE_EXPIRY_S
        if delay > last_try >= FIRST_RETRY_S:
            delay = last_try  # else this was the last try: the entry expires meanwhile
        return delay

    async def aclose(self) -> None:
        """Close the callback sender (when the deliverer made it)."""
        if self._own_sender:
            await self.sender.aclose()
