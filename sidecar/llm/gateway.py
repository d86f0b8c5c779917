"""The production flow: a fresh call answers 200; an unavailable provider queues the request (202).

`await gateway.handle(request)` never drops a request silently: the caller gets the result
(200), the provider's own 4xx, a `queue_id` to poll (202), or a 503 that says so (the sidecar
full, with Retry-After, or unreachable; or queueing switched off with LLM_QUEUE_ENABLED=false).
The queue holds requests only: the payload is the request body and its callback_url. A
callback URL that fails the static check (`sidecar.llm.callbacks.check_callback_url`: not
http(s), userinfo, or an IP literal that is not public unless LLM_CALLBACK_ALLOWED_HOSTS
admits it) is answered 400 before the provider is called or anything is queued.

A fresh call goes through the fleet's limiter first (`sidecar.llm.pacing.Pacer`, `fresh=True`:
the drain of the backlog gets at most LLM_DRAIN_SHARE of the budget while fresh calls wait):
granted, it is called; a short wait is waited out; a longer one (the scope paused or its shared
breaker open) queues the request at once, as an unavailable provider does. When the daemon
cannot be reached for the limiter, or does not answer within FAIL_OPEN_DEADLINE_S (0.3 s),
fresh calls go unpaced (fail open, logged once) and the limiter is not asked for the next
FAIL_OPEN_BYPASS_S: the live service must not stop, or slow down, because its sidecar did.

`await gateway.status(queue_id)` is `GET /v1/requests/{queue_id}`: the result once, when it
waits in the `pickups` outbox (taken, answered 200, then completed, which deletes it); else
the request's progress; a completed request whose result is no longer there is a 404 (it was
picked up, or went to the callback URL).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from sidecar.client import AsyncClient, decode_payload
from sidecar.errors import NotFound, QueueFull, SidecarError, SidecarUnavailable
from sidecar.llm.callbacks import AllowList, CallbackRefused, check_callback_url
from sidecar.llm.errors import ProviderRejected, ProviderUnavailable
from sidecar.llm.outbox import PICKUPS, Pickup
from sidecar.llm.pacing import (
    Admission,
    Pacer,
    PacingOptions,
    pause_from_headers,
    reserve_tokens,
    scope_for,
    used_tokens,
)
from sidecar.llm.providers import Body, Provider
from sidecar.protocol import Job

log = structlog.get_logger("sidecar.llm.gateway")

# A caller told to come back later without a hint from the sidecar waits this long.
DEFAULT_RETRY_AFTER_S = 5
PICKED_UP = "not found: the result was already picked up or sent to the callback"


@dataclass(frozen=True, kw_only=True)
class LLMRequest:
    """One chat request as a service receives it.

    `idempotency_key` (a caller's `Idempotency-Key`) makes a retried call idempotent: the
    queue_id is derived from it, the request (`idempotent_queue_id`) and `caller`, the
    authenticated principal when the service has one. `queue_id` is the service's own id,
    used as given (it must never come from a caller unchecked).
    """

    body: Body
    callback_url: str | None = None
    queue_id: str | None = None
    priority: int | None = None
    idempotency_key: str | None = None
    caller: str | None = None


def request_digest(body: Body, callback_url: str | None) -> str:
    """SHA-256 of the request as queued: its body (canonical JSON) and its callback URL."""
    canonical = json.dumps({"request": body, "callback_url": callback_url}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotent_queue_id(key: str, body: Body, callback_url: str | None, caller: str | None) -> str:
    """The queue_id of a request sent with an Idempotency-Key: a hash of the caller, the key
    and the request's digest. Another caller, or another request, with the same key gets
    another queue_id: a key never leads to someone else's request or result."""
    parts = [caller or "", key, request_digest(body, callback_url)]
    framed = "".join(f"{len(part)}:{part}" for part in parts)  # no ambiguity between parts
    return "idem-" + hashlib.sha256(framed.encode()).hexdigest()[:48]


@dataclass(frozen=True, kw_only=True)
class GatewayResult:
    """What the service answers its caller: HTTP status, JSON body and extra headers."""

    status: int
    body: Body
    headers: dict[str, str] = field(default_factory=dict)
    queue_id: str | None = None
    # fresh | queued | refused: what the books count (sent = fresh + queued + refused).
    decision: str = "fresh"


def queued_payload(req: LLMRequest) -> Body:
    """What the queue stores for a request: the body and where to deliver the result."""
    return {"request": req.body, "callback_url": req.callback_url}


class Gateway:
    """Fresh call at the fleet's pace, else the sidecar's queue; see the module docstring."""

    def __init__(
        self,
        provider: Provider,
        sidecar: AsyncClient,
        *,
        scope: str | None = None,
        pacing: PacingOptions | None = None,
        queue_enabled: bool = True,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        callback_allowed: AllowList | None = None,
    ) -> None:
        self.provider = provider
        self.sidecar = sidecar
        scope = scope or scope_for(provider.name, "", provider.model, None)
        self.pacer = Pacer(sidecar, scope, pacing, fail_open=True)
        self.queue_enabled = queue_enabled
        self.ttl_s = ttl_s
        self.max_attempts = max_attempts
        # Receivers admitted although internal (LLM_CALLBACK_ALLOWED_HOSTS); none by default.
        self.callback_allowed = callback_allowed or AllowList()

    async def handle(self, req: LLMRequest) -> GatewayResult:
        """200 with the result, the provider's 4xx, 202 with a queue_id, 503, or 400 for a
        refused callback URL."""
        if req.queue_id:
            queue_id = req.queue_id
        elif req.idempotency_key:
            queue_id = idempotent_queue_id(req.idempotency_key, req.body, req.callback_url,
                                           req.caller)  # fmt: skip
        else:
            queue_id = uuid.uuid4().hex
        bound = log.bind(queue_id=queue_id)
        if req.callback_url:
            try:
                check_callback_url(req.callback_url, self.callback_allowed)
            except CallbackRefused as exc:
                # Before the provider and the queue: nothing is spent on a result that could
                # not be delivered. The reason, not the URL (it may carry a token), is logged.
                bound.warning("llm_refused", status=400, reason="callback_url_refused",
                              detail=exc.reason)  # fmt: skip
                return GatewayResult(status=400, body={"error": "callback_url_refused",
                                                       "message": str(exc)},
                                     queue_id=queue_id, decision="refused")  # fmt: skip
        pacer = self.pacer
        tokens = reserve_tokens(req.body, pacer.opts.default_max_tokens)
        admission = await pacer.admit(tokens, fresh=True)  # fail open: never raises
        retry_after: float | None = None
        if not admission.granted:
            reason, retry_after = f"limited: {admission.reason}", admission.wait_s
        else:
            try:
                reply = await self.provider.complete(req.body)
            except ProviderRejected as exc:
                await self._after(admission, ok=True, used=0)
                bound.info("llm_refused", status=exc.status, reason="provider_rejected")
                return GatewayResult(status=exc.status, body=exc.body, queue_id=queue_id,
                                     decision="refused")  # fmt: skip
            except ProviderUnavailable as exc:
                await self._after(admission, ok=False, used=0)
                pause = pause_from_headers(exc.status, exc.headers)
                if pause is not None:
                    await pacer.pause(pause, exc.reason)
                reason, retry_after = exc.reason, exc.retry_after_s or pause
            else:
                used = used_tokens(reply.body)
                await self._after(admission, ok=True, used=used)
                pause = pause_from_headers(reply.status, reply.headers)
                if pause is not None:
                    await pacer.pause(pause, "rate limit headers at zero")
                bound.info("llm_fresh", provider=self.provider.name)
                return GatewayResult(status=200, body=reply.body, queue_id=queue_id)
        if not self.queue_enabled:
            bound.warning("llm_refused", status=503, reason=reason, queue_enabled=False)
            wait = str(max(1, round(retry_after or DEFAULT_RETRY_AFTER_S)))
            return GatewayResult(status=503, body={"error": "provider_unavailable"},
                                 headers={"Retry-After": wait}, queue_id=queue_id,
                                 decision="refused")  # fmt: skip
        return await self._enqueue(req, queue_id, reason)

    async def _after(self, admission: Admission, *, ok: bool, used: int | None) -> None:
        """Report the outcome to the shared breaker; settle the tokens with what was used
        (neither when the call went unpaced: the limiter was away, nothing to settle)."""
        if not admission.paced:
            return
        await self.pacer.report(ok=ok, probe=admission.probe)
        await self.pacer.settle(admission.tokens, used)

    async def _enqueue(self, req: LLMRequest, queue_id: str, reason: str) -> GatewayResult:
        bound = log.bind(queue_id=queue_id)
        options: dict[str, Any] = {"queue_id": queue_id}
        if req.priority is not None:
            options["priority"] = req.priority
        if self.ttl_s is not None:
            options["ttl_s"] = self.ttl_s
        if self.max_attempts is not None:
            options["max_attempts"] = self.max_attempts
        try:
            try:
                item = await self.sidecar.enqueue(queued_payload(req), **options)
            except SidecarUnavailable:
                # Once more with the same queue_id: if the first write landed, this one
                # returns it instead of storing a second copy.
                item = await self.sidecar.enqueue(queued_payload(req), **options)
        except QueueFull as exc:
            wait = exc.details.get("retry_after_s", DEFAULT_RETRY_AFTER_S)
            bound.warning("llm_refused", status=503, reason="queue_full", retry_after_s=wait)
            return GatewayResult(status=503, body={"error": "queue_full"},
                                 headers={"Retry-After": str(max(1, round(float(wait))))},
                                 queue_id=queue_id, decision="refused")  # fmt: skip
        except SidecarError as exc:
            bound.error("llm_refused", status=503, reason="sidecar_unavailable", code=exc.code)
            return GatewayResult(status=503, body={"error": "sidecar_unavailable"},
                                 headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)},
                                 queue_id=queue_id, decision="refused")  # fmt: skip
        bound.info("llm_queued", reason=reason, created=item.created)
        return GatewayResult(status=202, body={"queue_id": item.queue_id, "status": item.status},
                             queue_id=item.queue_id, decision="queued")  # fmt: skip

    async def status(self, queue_id: str) -> GatewayResult:
        """The result once (from `pickups`), else the request's progress: 200, 404, or 503."""
        try:
            job = await self.sidecar.take(queue_id, queue=PICKUPS)
            if job is not None:
                return await self._picked_up(job)
            info = await self.sidecar.status(queue_id)
        except NotFound:
            return GatewayResult(status=404, body={"error": "not_found"}, queue_id=queue_id)
        except SidecarError as exc:
            log.error("llm_status_failed", queue_id=queue_id, code=exc.code)
            return GatewayResult(status=503, body={"error": "sidecar_unavailable"},
                                 headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)},
                                 queue_id=queue_id)  # fmt: skip
        if info.status == "completed":
            # Completed only once its result was kept: that result has left the outbox.
            return GatewayResult(status=404, body={"error": "not_found", "message": PICKED_UP},
                                 queue_id=queue_id)  # fmt: skip
        body = {"queue_id": info.queue_id, "status": info.status, "attempts": info.attempts,
                "reason": info.reason, "updated_at": info.updated_at}  # fmt: skip
        return GatewayResult(status=200, body=body, queue_id=queue_id)

    async def _picked_up(self, job: Job) -> GatewayResult:
        """Answer a result taken from `pickups`, then complete it (which deletes it)."""
        bound = log.bind(queue_id=job.queue_id)
        try:
            body = json.loads(decode_payload(job, Pickup).body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            bound.error("llm_pickup_failed", reason="bad_payload", error=str(exc))
            await self.sidecar.fail(job.queue_id, job.lease_id, "bad result payload",
                                    retry=False, queue=PICKUPS)  # fmt: skip
            return GatewayResult(status=500, body={"error": "bad_result"}, queue_id=job.queue_id)
        try:
            await self.sidecar.complete(job.queue_id, job.lease_id, queue=PICKUPS)
        except SidecarError as exc:
            # Answered anyway: its lease lapses and it can be picked up again (at least once).
            bound.warning("llm_pickup_not_settled", code=exc.code, error=exc.message)
        bound.info("llm_picked_up")
        return GatewayResult(status=200, body=body, queue_id=job.queue_id)
