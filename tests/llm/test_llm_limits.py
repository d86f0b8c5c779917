"""The LLM side at the daemon's limits: a result too large to keep, a daemon that stops
answering the gateway's limiter calls. Real daemons as subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog

from sidecar.client import AsyncClient
from sidecar.errors import NotFound
from sidecar.llm.gateway import Gateway, LLMRequest
from sidecar.llm.pacing import PacingOptions
from sidecar.llm.providers import Body, MockProvider, ProviderReply
from sidecar.llm.worker import LLMWorker, WorkerOptions
from tests.support.daemon import Daemon, running_daemon

BODY = {"messages": [{"role": "user", "content": "hello"}]}
PACING = PacingOptions(breaker_failures=1000, breaker_reset_s=1.0)
MAX_PAYLOAD = 4096


class HugeProvider(MockProvider):
    """Answers with a completion far larger than the daemon's payload limit."""

    async def complete(self, request: Body) -> ProviderReply:
        reply = await super().complete(request)
        reply.body["choices"][0]["message"]["content"] = "x" * (MAX_PAYLOAD * 4)
        return reply


@pytest.fixture
def small_daemon() -> Iterator[Daemon]:
    with running_daemon(SIDECAR_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD)) as d:
        yield d


@pytest.fixture
async def client(small_daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(small_daemon.socket_path) as c:
        yield c


async def _status(client: AsyncClient, queue_id: str, queue: str = "requests") -> Any:
    try:
        return await client.status(queue_id, queue=queue)
    except NotFound:
        return None


@pytest.mark.slow
async def test_a_result_too_large_to_keep_fails_the_request_once_and_tells_the_caller(
    client: AsyncClient, small_daemon: Daemon
) -> None:
    """Without this the request went back uncounted and the paid call repeated until the TTL."""
    provider = HugeProvider()
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="big1")
    worker = LLMWorker(provider, path=small_daemon.socket_path, pacing=PACING,
                       options=WorkerOptions(concurrency=1, lease_s=30, wait_s=0.2,
                                             backoff_base_s=0.01, backoff_max_s=0.01))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while (info := await _status(client, "big1")) is None or info.status != "failed":
            assert asyncio.get_running_loop().time() < deadline, f"big1 still {info}"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await worker.aclose()
    assert info.reason == "result_too_large" and provider.calls == 1
    assert worker.counts == {"completed": 0, "retried": 0, "failed": 1}
    gateway = Gateway(MockProvider(), client, pacing=PACING)
    told = await gateway.status("big1")  # the caller hears, from the small result kept
    assert told.status == 200 and told.body["queue_id"] == "big1"
    assert told.body["status"] == "failed" and told.body["error"] == "result_too_large"
    assert told.body["result_bytes"] > MAX_PAYLOAD


@pytest.mark.slow
async def test_a_stopped_daemon_costs_the_gateway_one_short_deadline_then_nothing() -> None:
    """SIGSTOP: the socket accepts, nothing answers. Fresh calls fail open after the limiter
    call's short deadline (not the client's 10 s), skip report/settle, then skip the limiter
    while bypassed; after SIGCONT the limiter is asked and answers again."""
    with running_daemon() as daemon:
        assert daemon.proc is not None
        async with AsyncClient(daemon.socket_path) as sidecar:
            gateway = Gateway(MockProvider(), sidecar,
                              pacing=PacingOptions(rpm=6000, tpm=10_000_000))  # fmt: skip
            gateway.pacer.bypass_s = 1.0
            assert (await gateway.handle(LLMRequest(body=BODY))).status == 200  # connected
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                with structlog.testing.capture_logs() as logs:
                    # Each would wait the client's timeout (10 s) for every limiter call
                    # without the deadline: the outer bound fails the test then.
                    answers = await asyncio.wait_for(asyncio.gather(
                        *(gateway.handle(LLMRequest(body=BODY)) for _ in range(3))), 5)  # fmt: skip
                    again = await asyncio.wait_for(gateway.handle(LLMRequest(body=BODY)), 5)
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            assert [a.status for a in [*answers, again]] == [200] * 4
            events = [e["event"] for e in logs]
            assert events.count("llm_limiter_unavailable") == 1
            assert gateway.pacer.bypassing()
            assert "llm_limiter_call_failed" not in events  # report/settle were not tried
            # Back: once the bypass ends the limiter is asked again and answers.
            deadline = asyncio.get_running_loop().time() + 15
            with structlog.testing.capture_logs() as back:
                while "llm_limiter_available" not in [e["event"] for e in back]:
                    assert asyncio.get_running_loop().time() < deadline, back[-3:]
                    assert (await gateway.handle(LLMRequest(body=BODY))).status == 200
                    await asyncio.sleep(0.05)
