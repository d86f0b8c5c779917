"""The gateway and the worker against the real daemon, with the mock provider's switches."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import standardwebhooks
import structlog

from sidecar.client import AsyncClient, RetryLater
from sidecar.config import Settings
from sidecar.llm.breaker import Breaker
from sidecar.llm.gateway import Gateway, LLMRequest
from sidecar.llm.providers import MockProvider
from sidecar.llm.webhooks import WebhookSigner
from sidecar.llm.worker import LLMWorker, WorkerOptions, jittered
from sidecar.protocol import Job, RequestInfo
from tests.support.daemon import Daemon, running_daemon
from tests.support.llm_fakes import CallbackSink, free_port

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


def _worker(
    provider: MockProvider, daemon: Daemon, *, signer: WebhookSigner | None = None, **opts: Any
) -> LLMWorker:
    options = WorkerOptions(
        **{"concurrency": 1, "lease_s": 30, "wait_s": 0.2, "callback_backoff_s": 0.01,
           "callback_allowed_hosts": ("127.0.0.1",), **opts}
    )  # fmt: skip
    return LLMWorker(provider, path=daemon.socket_path, breaker=Breaker(failures=100),
                     options=options, signer=signer)  # fmt: skip


@asynccontextmanager
async def running(worker: LLMWorker) -> AsyncIterator[None]:
    """The worker's run() in a task for the block's length; stopped (and closed) after."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await worker.aclose()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting until {what}")


async def settled(
    client: AsyncClient, queue_id: str, status: str, reason: str | None = None
) -> RequestInfo:
    """Waits until the request reads `status` (with `reason`, when given); its info."""

    async def check() -> bool:
        info = await client.status(queue_id)
        return info.status == status and (reason is None or info.reason == reason)

    await until(check, f"{queue_id} reads {status} ({reason})")
    return await client.status(queue_id)


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
async def test_worker_honours_retry_after_with_a_delayed_fail(
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


def _job(queue_id: str = "j1", attempts: int = 1) -> Job:
    payload = msgspec.msgpack.encode({"request": BODY, "callback_url": None})
    return Job(queue_id=queue_id, lease_id="l", lease_expires_at=0.0,
               payload=msgspec.Raw(payload), priority=5, attempts=attempts, max_attempts=10,
               created_at=0.0, expires_at=0.0)  # fmt: skip


async def test_the_backoff_grows_with_the_streak_of_unavailable_outcomes_not_attempts() -> None:
    """With counts=False a request's attempts stay at 1 through an outage: the delay doubles
    with this process's streak of unavailable outcomes (jittered), up to the maximum, and an
    answer from the provider starts it again from the base. A Retry-After wins."""
    provider = MockProvider()
    provider.down = True
    options = WorkerOptions(backoff_base_s=1.0, backoff_max_s=8.0)
    highs = LLMWorker(provider, breaker=Breaker(failures=100), options=options, rand=lambda: 1.0)
    lows = LLMWorker(provider, breaker=Breaker(failures=100), options=options, rand=lambda: 0.0)

    async def delays(worker: LLMWorker, n: int) -> list[float]:
        got = []
        for _ in range(n):
            with pytest.raises(RetryLater) as caught:
                await worker.handle(_job(attempts=1))
            assert caught.value.counts is False
            got.append(caught.value.delay_s)
        return got

    assert await delays(highs, 6) == [1, 2, 4, 8, 8, 8]
    assert await delays(lows, 5) == [0.5, 1, 2, 4, 4]  # jitter: half to all of each step
    assert jittered(10.0, lambda: 0.5) == 7.5
    provider.down = False
    await highs.handle(_job())  # the provider answers: the streak ends
    assert highs.unavailable_streak == 0
    provider.failing = True
    assert await delays(highs, 2) == [1, 2]  # from the base again
    provider.retry_after_s = 30.0
    assert await delays(highs, 1) == [30.0]  # the provider's Retry-After, as sent
    await highs.aclose()
    await lows.aclose()


async def test_an_open_breaker_puts_the_request_back_until_its_probe_may_go() -> None:
    provider = MockProvider()
    provider.down = True
    now = [1000.0]
    breaker = Breaker(failures=1, reset_s=30.0, clock=lambda: now[0])
    worker = LLMWorker(provider, breaker=breaker, options=WorkerOptions(backoff_base_s=1.0),
                       rand=lambda: 1.0)  # fmt: skip
    with pytest.raises(RetryLater) as first:
        await worker.handle(_job())
    assert provider.calls == 1 and first.value.reason.startswith("mock provider down")
    with pytest.raises(RetryLater) as held:
        await worker.handle(_job())
    assert provider.calls == 1  # no call while the breaker is open
    assert (held.value.reason, held.value.delay_s, held.value.counts) == (
        "breaker_open",
        30.0,
        False,
    )
    now[0] += 29.5
    with pytest.raises(RetryLater) as later:
        await worker.handle(_job())
    assert later.value.delay_s == 1.0  # the probe is half a second off: the backoff is longer
    await worker.aclose()


@pytest.mark.slow
async def test_worker_completes_and_calls_back(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    provider = MockProvider()
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ok1")
    worker = _worker(provider, daemon)
    async with running(worker):
        await settled(client, "ok1", "completed")
    assert await asyncio.to_thread(sink.wait_for, 1, 10)
    [body] = sink.bodies
    assert body["queue_id"] == "ok1" and body["status"] == "completed"
    assert body["response"]["choices"][0]["message"]["content"].startswith("mock answer")
    assert "webhook-signature" not in sink.received[0].headers  # no secret set: unsigned
    assert worker.counts == {"completed": 1, "retried": 0, "failed": 0, "callbacks": 1}


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
    worker = _worker(provider, daemon)
    async with running(worker):
        info = await settled(client, "bad1", "failed")
    assert info.reason == "provider answered 400" and info.attempts == 1
    assert await asyncio.to_thread(sink.wait_for, 1, 10)
    assert sink.bodies[0]["status"] == "failed" and sink.bodies[0]["http_status"] == 400
    assert "error" in sink.bodies[0]


@pytest.mark.slow
async def test_a_callback_that_keeps_failing_is_retried_then_logged(
    client: AsyncClient, daemon: Daemon
) -> None:
    provider = MockProvider()
    dead = f"http://127.0.0.1:{free_port()}/results"  # nothing listens there
    await client.enqueue({"request": BODY, "callback_url": dead}, queue_id="cb1")
    worker = _worker(provider, daemon, callback_attempts=3)
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            await settled(client, "cb1", "completed")
    failed = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 3 and failed[0]["queue_id"] == "cb1"
    assert failed[0]["verdict"] == "retry" and "could not connect" in failed[0]["reason"]
    retries = [e for e in logs if e["event"] == "llm_callback_retry"]
    assert [e["attempts"] for e in retries] == [1, 2] and all(
        e["queue_id"] == "cb1" for e in retries
    )
    # The result is not stored anywhere: the request completes, its status holds metadata only.


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.slow
async def test_a_delivery_is_signed_verifies_independently_and_keeps_its_id_across_retries(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    """Standard Webhooks: checked with the `standardwebhooks` package, not our own verify;
    the first try is answered 500, the retry is the same message (same webhook-id)."""
    sink.answers = [(500, {})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="sig1")
    signer = WebhookSigner(SECRET)
    worker = _worker(MockProvider(), daemon, signer=signer)
    async with running(worker):
        await settled(client, "sig1", "completed")
    assert await asyncio.to_thread(sink.wait_received, 2, 10)
    first, second = sink.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "msg_sig1"
    assert first.body == second.body  # one serialisation, sent (and signed) as it is
    hook = standardwebhooks.Webhook(SECRET)
    for delivery in (first, second):
        verified = hook.verify(delivery.body, delivery.headers)
        assert verified["queue_id"] == "sig1" and verified["status"] == "completed"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        hook.verify(first.body.replace(b"sig1", b"sig2"), first.headers)
    assert worker.counts["callbacks"] == 1


@pytest.mark.slow
async def test_410_gone_stops_the_delivery_at_once(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    sink.answers = [(410, {}), (200, {})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="gone1")
    worker = _worker(MockProvider(), daemon, callback_attempts=5)
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            await settled(client, "gone1", "completed")
    assert len(sink.received) == 1  # never tried again
    [failed] = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert (failed["queue_id"], failed["attempts"], failed["verdict"], failed["http_status"]) == (
        "gone1", 1, "stop", 410,
    )  # fmt: skip


@pytest.mark.slow
async def test_a_refused_private_url_is_never_contacted(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    """Without LLM_CALLBACK_ALLOWED_HOSTS, a loopback receiver is refused before any
    connection, and the refusal is final (no further tries)."""
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ssrf1")
    worker = _worker(MockProvider(), daemon, callback_allowed_hosts=(), callback_attempts=3)
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            await settled(client, "ssrf1", "completed")
    await asyncio.sleep(0.2)
    assert sink.received == []
    [failed] = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert failed["verdict"] == "stop" and failed["attempts"] == 1
    assert "loopback" in failed["reason"] and failed["queue_id"] == "ssrf1"


@pytest.mark.slow
async def test_retry_after_from_the_receiver_is_waited_then_bounded(
    client: AsyncClient, daemon: Daemon, sink: CallbackSink
) -> None:
    """A 503 with Retry-After: 1 is tried again a second later, not after the short backoff;
    a Retry-After past LLM_WEBHOOK_RETRY_MAX_SECONDS gives up at once."""
    sink.answers = [(503, {"Retry-After": "1"})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ra1")
    worker = _worker(MockProvider(), daemon)
    async with running(worker):
        await settled(client, "ra1", "completed")
    first, second = sink.received
    assert second.at - first.at >= 0.9
    sink.received.clear()
    sink.answers = [(429, {"Retry-After": "120"})]
    await client.enqueue({"request": BODY, "callback_url": sink.url}, queue_id="ra2")
    worker = _worker(MockProvider(), daemon, callback_retry_max_s=60)
    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            await settled(client, "ra2", "completed")
    assert len(sink.received) == 1
    [failed] = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert failed["attempts"] == 1 and "LLM_WEBHOOK_RETRY_MAX_SECONDS" in failed["error"]


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


async def test_while_the_breaker_is_open_the_worker_takes_nothing(
    daemon: Daemon, client: AsyncClient
) -> None:
    """No job is taken and put back while no call can go: the requests wait, untouched."""
    provider = MockProvider()
    breaker = Breaker(failures=1, reset_s=1.0)
    breaker.failure()  # open: the first call may go in a second
    options = WorkerOptions(concurrency=2, lease_s=30, wait_s=0.2, callback_allowed_hosts=())
    worker = LLMWorker(provider, path=daemon.socket_path, breaker=breaker, options=options)
    for n in range(2):
        await client.enqueue({"request": BODY}, queue_id=f"b{n}")
    async with running(worker):
        for n in range(2):
            await settled(client, f"b{n}", "completed")
    assert provider.calls == 2
    text = (await client.metrics()).text
    assert _requests_of(text, "fail") == 0 and _requests_of(text, "dequeue") >= 1
    assert [(await client.status(f"b{n}")).attempts for n in range(2)] == [1, 1]
