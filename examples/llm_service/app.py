"""An example LLM service: FastAPI on uvicorn, answering 200 fresh or 202 queued.

    POST /v1/chat/completions   an OpenAI-style body -> 200 with the completion, the provider's
                                4xx, 202 {"queue_id": ...}, or 503 with Retry-After
    GET  /v1/requests/{id}      a queued request's result once it waits to be picked up
                                (then it is deleted), else its progress; 404 once picked up

Headers: `X-Callback-URL` (where a worker POSTs the result of a queued request; 400 when it is
not http(s) or names an internal address that LLM_CALLBACK_ALLOWED_HOSTS does not admit) and
`Idempotency-Key` (the queue_id is derived from it and the request, so a retried POST never
queues twice, and another request with the same key gets its own queue_id). Configured by
the same environment variables as the daemon (SIDECAR_SOCKET, ENVIRONMENT, LLM_*); the mock
provider answers by default in development. Run it with `examples/llm_service/run.sh`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.llm.callbacks import AllowList
from sidecar.llm.gateway import Gateway, GatewayResult, LLMRequest
from sidecar.llm.pacing import pacing_options
from sidecar.llm.providers import build_provider
from sidecar.llm.worker import build_recorder, provider_scope
from sidecar.logs import configure_logging


def _response(result: GatewayResult) -> JSONResponse:
    return JSONResponse(result.body, status_code=result.status, headers=result.headers)


def create_app(settings: Settings | None = None, *, configure_logs: bool = True) -> FastAPI:
    """The app, with its gateway built from the settings when it starts.

    configure_logs=False leaves structlog as the embedding process set it (a test in-process).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or Settings.from_env()
        if configure_logs:
            configure_logging(s.environment, s.log_level)
        provider = build_provider(s, build_recorder(s))
        sidecar = AsyncClient(s.socket_path)
        # Connect before the first requests arrive: concurrent first calls on a fresh client
        # would each open a connection. A daemon not up yet is fine: calls connect lazily.
        with contextlib.suppress(SidecarError):
            await sidecar.connect()
        app.state.gateway = Gateway(provider, sidecar, scope=provider_scope(s, provider),
                                    pacing=pacing_options(s),
                                    queue_enabled=s.llm_queue_enabled,
                                    max_attempts=s.llm_queue_max_attempts,
                                    callback_allowed=AllowList.parse(
                                        s.llm_callback_allowed_hosts))  # fmt: skip
        try:
            yield
        finally:
            await sidecar.close()
            await provider.aclose()

    app = FastAPI(title="sidecar example LLM service", lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat(
        request: Request,
        x_callback_url: str | None = Header(default=None),
        idempotency_key: str | None = Header(default=None),
    ) -> JSONResponse:
        try:
            body: Any = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        gateway: Gateway = request.app.state.gateway
        # No authentication in this example: a service that has it passes the caller's
        # identity as `caller`, so two callers' keys never meet.
        req = LLMRequest(body=body, callback_url=x_callback_url, idempotency_key=idempotency_key)
        return _response(await gateway.handle(req))

    @app.get("/v1/requests/{queue_id}")
    async def progress(queue_id: str, request: Request) -> JSONResponse:
        gateway: Gateway = request.app.state.gateway
        return _response(await gateway.status(queue_id))

    return app


app = create_app()
