"""The gateway and the worker against the real daemon, with the mock provider's switches."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.llm.breaker import Breaker
from sidecar.llm.gateway import Gateway, LLMRequest
from sidecar.llm.providers import MockProvider
from sidecar.llm.worker import LLMWorker, WorkerOptions
from tests.support.daemon import Daemon, running_daemon
from tests.support.llm_fakes import CallbackSink

BODY = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with running_daemon(QUEUE_MAX_SIZE="4") as d:
        yield d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.socket_path) as c:
        yield c


@pytest.fixture
def sink() -> Iterator[CallbackSink]:
    s = CallbackSink()
    s.start()
    yield s
    s.stop()


def _worker(client: AsyncClient, provider: MockProvider, **opts: float) -> LLMWorker:
    options = WorkerOptions(
        concurrency=1, lease_s=30, wait_s=0, callback_backoff_s=0.01, **opts  # type: ignore[arg-type]
    )
    return LLMWorker(client, provider, breaker=Breaker(failures=100), options=options)


async def _take_one(client: AsyncClient, worker: LLMWorker) -> None:
    [job] = await client.dequeue(1, lease_s=30)
    await worker.process(job)


@pytest.mark.slow
async def test_an_open_breaker_queues_without_calling_the_provider(client: AsyncClient) -> None:
    provider = MockProvider()
    provider.down = True
    gateway = Gateway(provider, client, breaker=Breaker(failures=2, reset_s=3600))
    with structlog.testing.capture_logs() as logs:
        results = [await gateway.handle(LLMRequest(body=BODY)) for _ in range(4)]
    assert [r.status for r in results] == [202] * 4
    assert provider.calls == 2  # the breaker opened after two: the rest went straight to queue
    reasons = [e["reason"] for e in logs if e["event"] == "llm_queued"]
    assert reasons[2:] == ["breaker_open", "breaker_open"]
    decisions = [e for e in logs if e["event"] in ("llm_fresh", "llm_queued", "llm_refused")]
    assert len(decisions) == 4 and all(e["queue_id"] for e in decisions)
    assert [e["event"] for e in logs].count("llm_breaker_opened") == 1


@pytest.mark.slow
async def test_full_sidecar_is_503_with_retry_after_and_a_retry_is_idempotent(
    client: AsyncClient,
) -> None:
    provider = MockProvider()
    provider.down = True
    gateway = Gateway(provider, client)
    first = await gateway.handle(LLMRequest(body=BODY, queue_id="same"))
    again = await gateway.handle(LLMRequest(body=BODY, queue_id="same"))
    assert (first.status, again.status, again.body["queue_id"]) == (202, 202, "same")
    assert (await client.stats()).accepted == 1
    statuses = [(await gateway.handle(LLMRequest(body=BODY))).status for _ in range(5)]
    assert 503 in statuses and statuses.index(503) > 0
    full = await gateway.handle(LLMRequest(body=BODY))
    assert full.status == 503 and full.body == {"error": "queue_full"}
    assert int(full.headers["Retry-After"]) >= 1
    assert full.decision == "refused"


@pytest.mark.slow
async def test_an_unreachable_sidecar_is_503(daemon: Daemon) -> None:
    provider = MockProvider()
    provider.failing = True
    daemon.stop()
    gone = AsyncClient(daemon.socket_path)  # connects on first use, as the example app does
    result = await Gateway(provider, gone).handle(LLMRequest(body=BODY))
    await gone.close()
    assert result.status == 503 and result.body == {"error": "sidecar_unavailable"}


@pytest.mark.slow
async def test_worker_honours_retry_after_with_a_delayed_fail(client: AsyncClient) -> None:
    provider = MockProvider()
    provider.failing, provider.retry_after_s = True, 3600.0
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="r1")
    worker = _worker(client, provider)
    await _take_one(client, worker)
    info = await client.status("r1")
    assert info.status == "queued" and info.reason == "mock provider answered 503"
    # Held back for the provider's Retry-After: not handed out now.
    assert await client.dequeue(1, lease_s=30) == []
    assert worker.counts["retried"] == 1
    await worker.aclose()


async def test_an_outage_longer_than_the_attempts_costs_none_and_the_request_completes(
    client: AsyncClient,
) -> None:
    """Issue 22: each retry while the provider was down used an attempt, so an outage of
    LLM_QUEUE_MAX_ATTEMPTS retries failed the request for good, long before its TTL."""
    max_attempts = Settings().llm_queue_max_attempts
    provider = MockProvider()
    provider.down = True
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="out1",
                         max_attempts=max_attempts)  # fmt: skip
    worker = _worker(client, provider, backoff_base_s=0.001, backoff_max_s=0.001)
    for _ in range(max_attempts + 3):
        [job] = await client.dequeue(1, lease_s=30, wait_s=5)
        assert job.attempts == 1  # every earlier delivery was given back
        await worker.process(job)
        info = await client.status("out1")
        assert (info.status, info.attempts) == ("queued", 0), info
    assert provider.calls == max_attempts + 3 and worker.counts["retried"] == max_attempts + 3
    provider.down = False  # the provider is back
    [job] = await client.dequeue(1, lease_s=30, wait_s=5)
    await worker.process(job)
    info = await client.status("out1")
    assert info.status == "completed" and info.attempts <= 2, info
    await worker.aclose()


@pytest.mark.slow
async def test_worker_completes_and_calls_back(client: AsyncClient, sink: CallbackSink) -> None:
    provider = MockProvider()
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ok1")
    worker = _worker(client, provider)
    await _take_one(client, worker)
    assert (await client.status("ok1")).status == "completed"
    assert await asyncio.to_thread(sink.wait_for, 1, 10)
    [body] = sink.bodies
    assert body["queue_id"] == "ok1" and body["status"] == "completed"
    assert body["response"]["choices"][0]["message"]["content"].startswith("mock answer")
    await worker.aclose()


@pytest.mark.slow
async def test_a_permanent_error_fails_for_good_and_tells_the_callback(
    client: AsyncClient, sink: CallbackSink
) -> None:
    provider = MockProvider()
    provider.reject_status = 400
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="bad1",
                         max_attempts=5)  # fmt: skip
    worker = _worker(client, provider)
    await _take_one(client, worker)
    info = await client.status("bad1")
    assert info.status == "failed" and info.reason == "provider answered 400"
    assert await asyncio.to_thread(sink.wait_for, 1, 10)
    assert sink.bodies[0]["status"] == "failed" and sink.bodies[0]["http_status"] == 400
    await worker.aclose()


@pytest.mark.slow
async def test_a_callback_that_keeps_failing_is_retried_then_logged(client: AsyncClient) -> None:
    provider = MockProvider()
    dead = "http://127.0.0.1:9/results"  # nothing listens on the discard port
    await client.enqueue({"request": BODY, "callback_url": dead}, queue_id="cb1")
    worker = _worker(client, provider, callback_attempts=3)
    with structlog.testing.capture_logs() as logs:
        await _take_one(client, worker)
    failed = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 3 and failed[0]["queue_id"] == "cb1"
    # The result is not stored anywhere: the request completes, its status holds metadata only.
    assert (await client.status("cb1")).status == "completed"
    await worker.aclose()


@pytest.mark.slow
async def test_a_payload_that_is_not_a_queued_request_fails_without_retry(
    client: AsyncClient,
) -> None:
    await client.enqueue(["not", "a", "map"], queue_id="junk")
    worker = _worker(client, MockProvider())
    await _take_one(client, worker)
    info = await client.status("junk")
    assert info.status == "failed" and info.reason == "bad payload"
    await worker.aclose()


@pytest.mark.slow
def test_the_daemon_never_imports_the_llm_side() -> None:
    """The extra stays optional: serving (and the CLI) load neither sidecar.llm nor httpx."""
    code = (
        "import sys, sidecar.app, sidecar.cli, sidecar.server\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('sidecar.llm', 'httpx')))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == ""


class BrokenProvider(MockProvider):
    async def complete(self, request: dict[str, object]) -> object:  # type: ignore[override]
        raise RuntimeError("a bug in the provider")


@pytest.mark.slow
async def test_a_provider_bug_puts_the_request_back_and_the_worker_carries_on(
    client: AsyncClient,
) -> None:
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="bug1")
    worker = _worker(client, BrokenProvider())
    with structlog.testing.capture_logs() as logs:
        await _take_one(client, worker)
    assert [e["event"] for e in logs].count("llm_worker_error") == 1
    info = await client.status("bug1")
    assert info.status == "queued" and info.reason == "worker_error"
    await worker.aclose()
