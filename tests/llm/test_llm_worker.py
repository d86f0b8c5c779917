"""The gateway, the worker and the deliverer against the real daemon, with the mock provider's
switches: the limiter ops, the outbox queues (`deliveries`, `pickups`) and pick-up for real."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import standardwebhooks
import structlog

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import NotFound
from sidecar.llm.gateway import PICKED_UP, Gateway, LLMRequest
from sidecar.llm.outbox import Deliverer, DeliveryOptions
from sidecar.llm.pacing import PacingOptions
from sidecar.llm.providers import MockProvider
from sidecar.llm.webhooks import WebhookSigner
from sidecar.llm.worker import LLMWorker, WorkerOptions
from sidecar.protocol import RequestInfo
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


# A breaker that never opens in these tests unless one asks it to.
PACING = PacingOptions(breaker_failures=1000, breaker_reset_s=1.0)


def _worker(provider: MockProvider, daemon: Daemon, **opts: Any) -> LLMWorker:
    options = WorkerOptions(**{"concurrency": 1, "lease_s": 30, "wait_s": 0.2, **opts})
    return LLMWorker(provider, path=daemon.socket_path, options=options, pacing=PACING)


def _deliverer(daemon: Daemon, *, signer: WebhookSigner | None = None, **opts: Any) -> Deliverer:
    options = DeliveryOptions(**{"concurrency": 2, "lease_s": 30, "wait_s": 0.2,
                                 "allowed_hosts": ("127.0.0.1",), **opts})  # fmt: skip
    return Deliverer(path=daemon.socket_path, options=options, signer=signer)


@asynccontextmanager
async def running(*runners: LLMWorker | Deliverer) -> AsyncIterator[None]:
    """Each one's run() in a task for the block's length; stopped (and closed) after."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        for r in runners:
            await r.aclose()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting until {what}")


async def settled(
    client: AsyncClient,
    queue_id: str,
    status: str,
    reason: str | None = None,
    *,
    queue: str = "requests",
) -> RequestInfo:
    """Waits until the entry reads `status` (with `reason`, when given); its info."""

    async def check() -> bool:
        try:
            info = await client.status(queue_id, queue=queue)
        except NotFound:
            return False  # not there yet (an outbox entry is made once the provider answers)
        return info.status == status and (reason is None or info.reason == reason)

    await until(check, f"{queue_id} reads {status} ({reason}) in {queue}")
    return await client.status(queue_id, queue=queue)


async def failed_deliveries(client: AsyncClient, count: int) -> None:
    """Waits until `count` deliveries failed for good (kept as dead letters for a replay)."""

    async def check() -> bool:
        return (await client.stats(queue="deliveries")).failed >= count

    await until(check, f"{count} failed deliveries")


async def gone(client: AsyncClient, queue_id: str, queue: str) -> None:
    """Waits until the outbox entry is deleted (delivered or picked up)."""

    async def check() -> bool:
        try:
            await client.status(queue_id, queue=queue)
        except NotFound:
            return True
        return False

    await until(check, f"{queue_id} is deleted from {queue}")


@pytest.mark.slow
async def test_an_open_shared_breaker_queues_without_calling_the_provider(
    client: AsyncClient,
) -> None:
    provider = MockProvider()
    provider.down = True
    pacing = PacingOptions(breaker_failures=2, breaker_reset_s=3600)
    gateway = Gateway(provider, client, pacing=pacing)
    with structlog.testing.capture_logs() as logs:
        results = [await gateway.handle(LLMRequest(body=BODY)) for _ in range(4)]
    assert [r.status for r in results] == [202] * 4
    assert provider.calls == 2  # the breaker opened after two: the rest went straight to queue
    reasons = [e["reason"] for e in logs if e["event"] == "llm_queued"]
    assert reasons[2:] == ["limited: breaker_open", "limited: breaker_open"]
    decisions = [e for e in logs if e["event"] in ("llm_fresh", "llm_queued", "llm_refused")]
    assert len(decisions) == 4 and all(e["queue_id"] for e in decisions)
    # Another process on this daemon (a second gateway) knows it at once: no call of its own.
    other = Gateway(provider, client, pacing=pacing)
    await other.handle(LLMRequest(body=BODY))  # 503 queue_full: the daemon holds only four
    assert provider.calls == 2


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
async def test_worker_honours_retry_after_and_pauses_the_scope(
    client: AsyncClient, daemon: Daemon
) -> None:
    provider = MockProvider()
    provider.failing, provider.retry_after_s = True, 3600.0
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="r1")
    worker = _worker(provider, daemon)
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            info = await settled(client, "r1", "queued", "mock provider answered 503")
    assert info.attempts == 0  # the provider's outage cost no attempt
    # Held back for the provider's Retry-After: not handed out now.
    assert await client.dequeue(1, lease_s=30) == []
    assert worker.counts["retried"] == 1 and provider.calls == 1
    [retried] = [e for e in logs if e["event"] == "llm_retried"]
    assert retried["delay_s"] == 3600.0 and retried["queue_id"] == "r1"
    # The fleet holds off the scope: a gateway on the same daemon queues without a call.
    gateway = Gateway(provider, client, pacing=PACING)
    queued = await gateway.handle(LLMRequest(body=BODY))
    assert queued.status == 202 and provider.calls == 1


async def test_an_outage_longer_than_the_attempts_costs_none_and_the_request_completes(
    client: AsyncClient, daemon: Daemon
) -> None:
    """Issue 22: each retry while the provider was down used an attempt, so an outage of
    LLM_QUEUE_MAX_ATTEMPTS retries failed the request for good, long before its TTL."""
    max_attempts = Settings().llm_queue_max_attempts
    provider = MockProvider()
    provider.down = True
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="out1",
                         max_attempts=max_attempts)  # fmt: skip
    worker = _worker(provider, daemon, backoff_base_s=0.001, backoff_max_s=0.001)
    async with running(worker):

        async def outlasted() -> bool:
            info = await client.status("out1")
            assert info.status in ("queued", "processing") and info.attempts <= 1, info
            return provider.calls >= max_attempts + 3

        await until(outlasted, "the outage outlasts the attempts")
        assert worker.unavailable_streak >= max_attempts + 3
        provider.down = False  # the provider is back
        info = await settled(client, "out1", "completed")
    assert info.attempts <= 2, info
    assert worker.unavailable_streak == 0  # an answer ends the streak
    assert worker.counts["completed"] == 1


@pytest.mark.slow
async def test_a_result_without_a_callback_is_picked_up_once_then_not_found(
    client: AsyncClient, daemon: Daemon
) -> None:
    provider = MockProvider()
    provider.down = True
    gateway = Gateway(provider, client, pacing=PACING)
    queued = await gateway.handle(LLMRequest(body=BODY, queue_id="pk1"))
    assert queued.status == 202
    progress = await gateway.status("pk1")
    assert progress.status == 200 and progress.body["status"] == "queued"
    provider.down = False
    worker = _worker(provider, daemon)
    async with running(worker):
        await settled(client, "pk1", "completed")
    waiting = await client.status("pk1", queue="pickups")
    assert waiting.status == "queued"  # kept, apart from the request queue
    result = await gateway.status("pk1")
    assert result.status == 200 and result.body["queue_id"] == "pk1"
    assert result.body["status"] == "completed"
    assert result.body["response"]["choices"][0]["message"]["content"].startswith("mock answer")
    again = await gateway.status("pk1")
    assert again.status == 404 and again.body["message"] == PICKED_UP
    with pytest.raises(NotFound):
        await client.status("pk1", queue="pickups")  # deleted once picked up


@pytest.mark.slow
async def test_a_redelivered_request_keeps_one_result(client: AsyncClient, daemon: Daemon) -> None:
    """The result is kept under the request's queue_id: a second run of the same request
    (its complete lost) finds the first result, and makes no second one."""
    worker = _worker(MockProvider(), daemon)
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="twice")
    for _ in range(2):
        [job] = await client.dequeue(1, lease_s=30)
        await worker.handle(job)  # the result is kept; the request is not completed here
        await client.fail(job.queue_id, job.lease_id, "lost complete", retry=True)
    await worker.aclose()
    stats = await client.stats(queue="pickups")
    assert stats.accepted == 1


@pytest.mark.slow
async def test_worker_keeps_the_result_and_the_deliverer_calls_back(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    provider = MockProvider()
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ok1")
    worker, deliverer = _worker(provider, daemon), _deliverer(daemon)
    async with running(worker, deliverer):
        await settled(client, "ok1", "completed")
        assert await asyncio.to_thread(sink.wait_for, 1, 10)
        await gone(client, "ok1", "deliveries")  # deleted once delivered
    [body] = sink.bodies
    assert body["queue_id"] == "ok1" and body["status"] == "completed"
    assert body["response"]["choices"][0]["message"]["content"].startswith("mock answer")
    assert "webhook-signature" not in sink.received[0].headers  # no secret set: unsigned
    assert worker.counts == {"completed": 1, "retried": 0, "failed": 0}
    assert deliverer.counts == {"delivered": 1, "retried": 0, "failed": 0}
    assert (await client.stats(queue="pickups")).accepted == 0  # a callback: nothing to pick up


@pytest.mark.slow
async def test_many_requests_complete_in_batches_with_one_worker(
    client: AsyncClient, daemon: Daemon
) -> None:
    """run_worker underneath: concurrency from the options, every request completed once."""
    provider = MockProvider()
    ids = [f"m{n}" for n in range(4)]
    for qid in ids:
        await client.enqueue({"request": BODY, "callback_url": None}, queue_id=qid)
    worker = _worker(provider, daemon, concurrency=3)
    async with running(worker):
        for qid in ids:
            await settled(client, qid, "completed")
    assert provider.calls == len(ids) and worker.counts["completed"] == len(ids)


@pytest.mark.slow
async def test_a_permanent_error_fails_for_good_and_tells_the_callback(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    provider = MockProvider()
    provider.reject_status = 400
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="bad1",
                         max_attempts=5)  # fmt: skip
    async with running(_worker(provider, daemon), _deliverer(daemon)):
        info = await settled(client, "bad1", "failed")
        assert await asyncio.to_thread(sink.wait_for, 1, 10)
    assert info.reason == "provider answered 400" and info.attempts == 1
    assert sink.bodies[0]["status"] == "failed" and sink.bodies[0]["http_status"] == 400
    assert "error" in sink.bodies[0]


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.slow
async def test_a_delivery_is_signed_verifies_independently_and_keeps_its_id_across_retries(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    """Standard Webhooks: checked with the `standardwebhooks` package, not our own verify;
    the first tries are answered 500, the retry is the same message (same webhook-id), held
    back by the queue (no attempt counted) rather than slept on."""
    sink.answers = [(500, {}), (500, {})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="sig1")
    deliverer = _deliverer(daemon, signer=WebhookSigner(SECRET))
    async with running(_worker(MockProvider(), daemon), deliverer):
        await settled(client, "sig1", "completed")
        assert await asyncio.to_thread(sink.wait_received, 3, 20)
        await gone(client, "sig1", "deliveries")
    first, second, third = sink.received
    assert first.headers["webhook-id"] == third.headers["webhook-id"] == "msg_sig1"
    assert first.body == second.body == third.body  # one serialisation, sent as it is
    hook = standardwebhooks.Webhook(SECRET)
    for delivery in (first, third):
        verified = hook.verify(delivery.body, delivery.headers)
        assert verified["queue_id"] == "sig1" and verified["status"] == "completed"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        hook.verify(first.body.replace(b"sig1", b"sig2"), first.headers)
    assert deliverer.counts == {"delivered": 1, "retried": 2, "failed": 0}


@pytest.mark.slow
async def test_410_gone_stops_the_delivery_and_keeps_it_as_failed(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    sink.answers = [(410, {}), (200, {})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="gone1")
    with structlog.testing.capture_logs() as logs:
        async with running(_worker(MockProvider(), daemon), _deliverer(daemon)):
            await settled(client, "gone1", "completed")
            await failed_deliveries(client, 1)
    assert len(sink.received) == 1  # never tried again
    [failed] = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert (failed["queue_id"], failed["verdict"], failed["http_status"]) == ("gone1", "stop", 410)


@pytest.mark.slow
async def test_a_refused_private_url_is_never_contacted(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    """Without LLM_CALLBACK_ALLOWED_HOSTS, a loopback receiver is refused before any
    connection, and the refusal is final: a failed delivery."""
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ssrf1")
    deliverer = _deliverer(daemon, allowed_hosts=())
    async with running(_worker(MockProvider(), daemon), deliverer):
        await failed_deliveries(client, 1)
    assert sink.received == [] and deliverer.counts["failed"] == 1


@pytest.mark.slow
async def test_retry_after_from_the_receiver_is_honoured(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    """A 503 with Retry-After: 2 is tried again about two seconds later (the entry is held
    back by the queue), not after the first backoff of about a second."""
    sink.answers = [(503, {"Retry-After": "2"})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ra1")
    with structlog.testing.capture_logs() as logs:
        async with running(_worker(MockProvider(), daemon), _deliverer(daemon)):
            assert await asyncio.to_thread(sink.wait_for, 1, 15)
    first, second = sink.received
    assert second.at - first.at >= 1.9
    [retry] = [e for e in logs if e["event"] == "llm_callback_retry"]
    assert retry["delay_s"] == 2.0 and retry["http_status"] == 503


@pytest.mark.slow
async def test_a_payload_that_is_not_a_queued_request_fails_without_retry(
    client: AsyncClient, daemon: Daemon
) -> None:
    await client.enqueue(["not", "a", "map"], queue_id="junk")
    worker = _worker(MockProvider(), daemon)
    async with running(worker):
        info = await settled(client, "junk", "failed")
    assert info.reason == "bad payload"


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
    client: AsyncClient, daemon: Daemon
) -> None:
    await client.enqueue({"request": BODY, "callback_url": None}, queue_id="bug1")
    worker = _worker(BrokenProvider(), daemon)
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            info = await settled(client, "bug1", "queued", "worker_error")
    assert [e["event"] for e in logs].count("llm_worker_error") == 1
    assert info.attempts == 1  # a bug is counted: it may be the request's own


def _requests_of(text: str, op: str) -> float:
    """How many `op` requests the daemon answered, from its metrics exposition."""
    prefix = f'sidecar_request_duration_seconds_count{{op="{op}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def test_while_the_scope_is_paused_the_worker_takes_one_then_nothing(
    daemon: Daemon, client: AsyncClient
) -> None:
    """A refusal with a long wait closes the worker's ready gate: the requests wait, untouched,
    instead of being taken and put back one by one until the pause ends."""
    provider = MockProvider()
    worker = _worker(provider, daemon, concurrency=1)
    await client.limit_pause(worker.scope, pause_s=3.0, reason="test")
    for n in range(3):
        await client.enqueue({"request": BODY}, queue_id=f"b{n}")
    async with running(worker):
        for n in range(3):
            await settled(client, f"b{n}", "completed")
    assert provider.calls == 3
    text = (await client.metrics()).text
    assert _requests_of(text, "fail") == 1  # the one taken before the pause was known
    assert [(await client.status(f"b{n}")).attempts for n in range(3)].count(1) >= 2


@pytest.mark.slow
async def test_a_daemon_killed_during_a_receivers_outage_loses_no_result(daemon: Daemon) -> None:
    """The outbox is journaled: results kept while the receiver is down, the daemon SIGKILLed,
    restarted on the same state, and every result is delivered once the receiver is up."""
    sink = CallbackSink()  # not started yet: its port refuses connections
    ids = ["k0", "k1"]
    async with AsyncClient(daemon.socket_path) as client:
        for qid in ids:
            await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id=qid)
        deliverer = _deliverer(daemon)
        async with running(_worker(MockProvider(), daemon), deliverer):
            for qid in ids:
                await settled(client, qid, "completed")

            async def tried() -> bool:
                return deliverer.counts["retried"] >= len(ids)

            await until(tried, "each delivery was tried and refused")
    daemon.kill()
    daemon.start()
    sink.start()
    try:
        async with AsyncClient(daemon.socket_path) as client, running(_deliverer(daemon)):
            assert await asyncio.to_thread(sink.wait_for, len(ids), 20)
            for qid in ids:
                await gone(client, qid, "deliveries")
    finally:
        sink.stop()
    assert sorted(b["queue_id"] for b in sink.bodies) == ids  # acknowledged 2, lost 0
