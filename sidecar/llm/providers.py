"""Providers: the `Provider` protocol, a deterministic mock, OpenAI-compatible chat over httpx."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog

from sidecar.config import Settings
from sidecar.llm.errors import (
    Outcome,
    ProviderRejected,
    ProviderUnavailable,
    classify_status,
    parse_retry_after,
)
from sidecar.llm.recorder import DevelopmentResponseRecorder

log = structlog.get_logger("sidecar.llm.provider")

Body = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ProviderReply:
    """A successful provider answer: the JSON body, with the status and headers it came with."""

    body: Body
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


class Provider(Protocol):
    """An LLM provider: complete a chat request or raise ProviderUnavailable/ProviderRejected."""

    name: str
    model: str

    async def complete(self, request: Body) -> ProviderReply:
        """The provider's answer to one chat-completions request body."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class MockProvider:
    """Instant, deterministic answers; switches make it slow, failing (5xx), down or rejecting."""

    name = "mock"

    def __init__(self, model: str = "mock-1", *, slow_s: float = 0.0) -> None:
        self.model = model
        self.slow_s = slow_s
        self.failing = False  # answers as a 503 (or a 429 with retry_after_s) would: unavailable
        self.retry_after_s: float | None = None
        self.down = False  # as if the connection were refused: unavailable
        self.reject_status: int | None = None  # answers this 4xx: the request's fault
        self.calls = 0

    async def complete(self, request: Body) -> ProviderReply:
        """A reply derived only from the request, so the same request gets the same answer."""
        self.calls += 1
        if self.slow_s:
            await asyncio.sleep(self.slow_s)  # the switch simulates a slow provider
        if self.down:
            raise ProviderUnavailable("mock provider down (connection refused)")
        if self.failing:
            wait = self.retry_after_s
            headers = {} if wait is None else {"retry-after": f"{wait:g}"}
            raise ProviderUnavailable("mock provider answered 503", retry_after_s=wait,
                                      status=503, headers=headers)  # fmt: skip
        if self.reject_status is not None:
            raise ProviderRejected(self.reject_status, {"error": {"message": "mock rejection"}})
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
        body: Body = {
            "id": f"mock-{digest}",
            "object": "chat.completion",
            "model": request.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"mock answer {digest}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        return ProviderReply(body=body)

    async def aclose(self) -> None:
        """Nothing to release."""


class OpenAIProvider:
    """An OpenAI-compatible `POST {base_url}/chat/completions` over httpx."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 60.0,
        recorder: DevelopmentResponseRecorder | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.recorder = recorder
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def complete(self, request: Body) -> ProviderReply:
        """Send one request; classify the answer (errors.py) and record it when asked to."""
        body = {**request, "model": request.get("model") or self.model}
        started = time.monotonic()
        try:
            resp = await self._http.post("/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            await self._record(body, None, None, started, error=f"timeout: {type(exc).__name__}")
            raise ProviderUnavailable(f"provider timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:  # refused, reset, DNS, protocol errors
            await self._record(body, None, None, started, error=type(exc).__name__)
            raise ProviderUnavailable(f"provider unreachable ({type(exc).__name__})") from exc
        data = _json_body(resp)
        await self._record(body, resp, data, started)
        outcome = classify_status(resp.status_code)
        if outcome is Outcome.OK:
            return ProviderReply(body=data, status=resp.status_code, headers=dict(resp.headers))
        if outcome is Outcome.UNAVAILABLE:
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            raise ProviderUnavailable(
                f"provider answered {resp.status_code}", retry_after_s=retry_after,
                status=resp.status_code, headers=dict(resp.headers),
            )  # fmt: skip
        raise ProviderRejected(resp.status_code, data, dict(resp.headers))

    async def _record(
        self,
        request: Body,
        resp: httpx.Response | None,
        data: Body | None,
        started: float,
        error: str | None = None,
    ) -> None:
        if self.recorder is None:
            return
        await self.recorder.record(
            provider=self.name,
            model=self.model,
            request=request,
            response=data,
            status=None if resp is None else resp.status_code,
            headers={} if resp is None else dict(resp.headers),
            latency_s=time.monotonic() - started,
            error=error,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


def _json_body(resp: httpx.Response) -> Body:
    try:
        data = resp.json()
    except ValueError:
        return {"error": {"message": "provider answered a body that is not JSON"}}
    return data if isinstance(data, dict) else {"data": data}


def load_api_key(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """LLM_API_KEY, else the contents of LLM_API_KEY_FILE (stripped), else None."""
    env = os.environ if env is None else env
    key = env.get("LLM_API_KEY")
    if key:
        return key
    if settings.llm_api_key_file:
        return Path(settings.llm_api_key_file).read_text(encoding="utf-8").strip() or None
    return None


def build_provider(
    settings: Settings,
    recorder: DevelopmentResponseRecorder | None = None,
    env: Mapping[str, str] | None = None,
) -> Provider:
    """The configured provider: the mock by default in development, else OpenAI-compatible."""
    kind = settings.llm_provider or ("mock" if settings.environment == "development" else "openai")
    if kind == "mock":
        log.info("llm_provider_selected", provider="mock")
        return MockProvider()
    log.info("llm_provider_selected", provider="openai", base_url=settings.llm_base_url,
             model=settings.llm_model, recording=recorder is not None)  # fmt: skip
    return OpenAIProvider(
        base_url=settings.llm_base_url,
        model=settings.llm_model,
        api_key=load_api_key(settings, env),
        connect_timeout_s=settings.llm_connect_timeout_s,
        read_timeout_s=settings.llm_read_timeout_s,
        recorder=recorder,
    )
