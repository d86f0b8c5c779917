"""An example receiver of the sidecar's result callbacks: verifies, dedupes, answers 2xx.

    POST /webhooks/llm      a result delivery (Standard Webhooks headers, JSON body):
                            200 once verified (also for a repeat of a delivery already
                            received), 401 when the signature or its timestamp does not verify
    GET  /webhooks/llm      what was received: each queue_id's result and how many repeats

The secret is `LLM_WEBHOOK_SECRET` (the same `whsec_...` the workers sign with; during a
rotation list both, separated by a space). Run it with

    export LLM_WEBHOOK_SECRET=whsec_...
    .venv/bin/python -m uvicorn examples.webhook_receiver:app --port 9000

and give the service `X-Callback-URL: http://<host>:9000/webhooks/llm` (a receiver on an
internal address must be admitted by `LLM_CALLBACK_ALLOWED_HOSTS` on the workers' side).

A delivery is retried with the same `webhook-id` until it is acknowledged (a 2xx; a 410 stops
it for good), so a receiver sees some results more than once (at least once): it verifies
first, then dedupes by `webhook-id`, and answers 2xx to a repeat without acting on it again.
It verifies the raw body bytes, before parsing them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sidecar.llm.webhooks import WebhookSecrets, WebhookVerificationError, verify

# A repeat can come as long as the result waits in the outbox (LLM_RESULT_TTL_HOURS, a day by
# default, each try freshly timestamped): ids are remembered for a day, at most this many.
DEDUPE_S = 24 * 3600
DEDUPE_MAX = 100_000


class Deduper:
    """The webhook-ids handled recently, oldest first; bounded in time and in count."""

    def __init__(self, keep_s: float = DEDUPE_S, max_ids: int = DEDUPE_MAX) -> None:
        self.keep_s = keep_s
        self.max_ids = max_ids
        self._seen: dict[str, float] = {}

    def seen(self, msg_id: str, now: float | None = None) -> bool:
        """Whether msg_id was remembered within the window (forgetting what fell out of it)."""
        now = time.monotonic() if now is None else now
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self.keep_s and len(self._seen) <= self.max_ids:
                break
            del self._seen[oldest]
        return msg_id in self._seen

    def remember(self, msg_id: str, now: float | None = None) -> None:
        """Remember msg_id as handled: call it once the delivery was acted on."""
        self._seen[msg_id] = time.monotonic() if now is None else now
        if len(self._seen) > self.max_ids:
            del self._seen[next(iter(self._seen))]


def create_app(secrets: str | None = None) -> FastAPI:
    """The receiver; `secrets` (space-separated whsec_ secrets) else LLM_WEBHOOK_SECRET."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raw = secrets if secrets is not None else os.environ.get("LLM_WEBHOOK_SECRET", "")
        # A bad or missing secret stops the start with a message naming the setting.
        app.state.secrets = WebhookSecrets.parse(raw)
        yield

    app = FastAPI(title="sidecar example webhook receiver", lifespan=lifespan)
    deduper = Deduper()
    results: dict[str, dict[str, Any]] = {}
    repeats: dict[str, int] = {}

    @app.post("/webhooks/llm")
    async def receive(request: Request) -> JSONResponse:
        body = await request.body()  # the raw bytes: they are what was signed
        try:
            verify(request.headers, body, request.app.state.secrets)
        except WebhookVerificationError as exc:
            return JSONResponse({"error": "unverified", "message": str(exc)}, status_code=401)
        msg_id = request.headers["webhook-id"]
        if deduper.seen(msg_id):
            repeats[msg_id] = repeats.get(msg_id, 0) + 1
            return JSONResponse({"ok": True, "duplicate": True})
        result = json.loads(body)
        # Act on the result here (store it, wake the waiting user...), then remember the id:
        # a delivery whose handling failed (an error, so no 2xx) must be acted on when retried.
        results[str(result.get("queue_id"))] = result
        deduper.remember(msg_id)
        return JSONResponse({"ok": True, "duplicate": False})

    @app.get("/webhooks/llm")
    async def received() -> JSONResponse:
        return JSONResponse({"results": results, "repeats": repeats})

    return app


app = create_app()
