"""The worker's and the gateway's branches with a stand-in client: pacing, results, pick-up.

The real daemon's side of the same flows is in test_llm_worker.py; here each branch is steered
on cue (the limiter says wait then go, the outbox is full, a probe is granted).
"""

from __future__ import annotations

import msgspec
import pytest
import structlog

from sidecar.client import PermanentFailure, RetryLater
from sidecar.errors import PayloadTooLarge, QueueFull, SidecarUnavailable
from sidecar.llm.gateway import PICKED_UP, Gateway, LLMRequest
from sidecar.llm.outbox import Delivery, Pickup, result_body
from sidecar.llm.pacing import PacingOptions, reserve_tokens
from sidecar.llm.providers import MockProvider, ProviderReply
from sidecar.llm.worker import LLMWorker, WorkerOptions, jittered
from sidecar.protocol import Job
from tests.llm.stub_sidecar import Grant, StubSidecar, job

BODY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
PACING = PacingOptions(rpm=600, tpm=60_000, max_wait_s=0.05)


def request_job(queue_id: str = "r1", callback_url: str | None = None, attempts: int = 1) -> Job:
    return job(queue_id, {"request": BODY, "callback_url": callback_url}, attempts=attempts)


class UsageProvider(MockProvider):
    """The mock, with usage and headers of a real provider's answer."""

    def __init__(self, total_tokens: int = 42, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.total_tokens = total_tokens
        self.headers = headers or {}

    async def complete(self, request: dict[str, object]) -> ProviderReply:
        reply = await super().complete(request)
        body = {**reply.body, "usage": {"total_tokens": self.total_tokens}}
        return ProviderReply(body=body, headers=self.headers)


def worker(stub: StubSidecar, provider: MockProvider | None = None, **opts: object) -> LLMWorker:
    options = WorkerOptions(**{"result_ttl_s": 7200.0, **opts})  # type: ignore[arg-type]
    return LLMWorker(provider or UsageProvider(), client=stub.as_client(), scope="s1",
                     options=options, pacing=PACING, rand=lambda: 1.0)  # fmt: skip


# -- the worker: results -------------------------------------------------------------------


async def test_an_answer_is_kept_for_pick_up_before_the_request_completes() -> None:
    stub = StubSidecar()
    w = worker(stub)
    await w.handle(request_job("r1"))  # returns: run_worker completes the request
    [kept] = stub.named("enqueue")
    assert (kept["queue"], kept["queue_id"], kept["ttl_s"]) == ("pickups", "r1", 7200.0)
    body = msgspec.json.decode(msgspec.msgpack.decode(stub.stored[("pickups", "r1")].payload,
                                                      type=Pickup).body)  # fmt: skip
    assert body["queue_id"] == "r1" and body["status"] == "completed"
    assert body["response"]["usage"] == {"total_tokens": 42}
    assert w.counts == {"completed": 1, "retried": 0, "failed": 0}


async def test_an_answer_with_a_callback_goes_to_deliveries_as_the_exact_bytes() -> None:
    stub = StubSidecar()
    await worker(stub).handle(request_job("r2", "https://hooks.example.com/x"))
    delivery = msgspec.msgpack.decode(stub.stored[("deliveries", "r2")].payload, type=Delivery)
    assert delivery.url == "https://hooks.example.com/x"
    decoded = msgspec.json.decode(delivery.body)
    assert delivery.body == result_body("r2", {"status": "completed",
                                               "response": decoded["response"]})  # fmt: skip


async def test_a_rejection_is_kept_as_the_result_then_fails_for_good() -> None:
    stub = StubSidecar()
    provider = UsageProvider()
    provider.reject_status = 400
    w = worker(stub, provider)
    with pytest.raises(PermanentFailure, match="provider answered 400"):
        await w.handle(request_job("r3"))
    body = msgspec.json.decode(msgspec.msgpack.decode(stub.stored[("pickups", "r3")].payload,
                                                      type=Pickup).body)  # fmt: skip
    assert body == {"queue_id": "r3", "status": "failed", "http_status": 400,
                    "error": {"error": {"message": "mock rejection"}}}  # fmt: skip
    assert stub.named("limit_report")[0]["ok"] is True  # it answered: the provider is up


async def test_an_outbox_that_cannot_take_the_result_puts_the_request_back_uncounted() -> None:
    stub = StubSidecar(enqueue_error=QueueFull("full", {"retry_after_s": 7}))
    w = worker(stub)
    with structlog.testing.capture_logs() as logs, pytest.raises(RetryLater) as caught:
        await w.handle(request_job("r4"))
    assert (caught.value.delay_s, caught.value.counts) == (7.0, False)
    assert caught.value.reason == "outbox_unavailable" and w.counts["completed"] == 0
    assert [e["event"] for e in logs].count("llm_result_not_kept") == 1
    gone = StubSidecar(enqueue_error=SidecarUnavailable("gone", {"sent": False}))
    with pytest.raises(RetryLater):
        await worker(gone).handle(request_job("r5"))
    assert len(gone.named("enqueue")) == 2  # a lost connection is retried once, same queue_id


# -- the worker: pacing --------------------------------------------------------------------


async def test_the_call_reserves_the_estimate_and_settles_with_the_usage() -> None:
    stub = StubSidecar()
    await worker(stub, UsageProvider(total_tokens=42)).handle(request_job())
    reserved = reserve_tokens(BODY, PACING.default_max_tokens)
    [asked] = stub.named("limit_acquire")
    assert (asked["tokens"], asked["requests"], asked["fresh"]) == (reserved, 1, False)
    assert reserved == -(-len(msgspec.json.encode(BODY)) // 4) + 100  # its own max_tokens
    [settled] = stub.named("limit_settle")
    assert settled["tokens_delta"] == 42 - reserved
    assert stub.named("limit_report") == [{"scope": "s1", "ok": True, "probe": False,
                                           "failures": 5, "reset_s": 10.0}]  # fmt: skip


async def test_a_long_limiter_wait_puts_the_request_back_uncounted_without_a_call() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=20.0, reason="paused")])
    provider = UsageProvider()
    w = worker(stub, provider)
    with pytest.raises(RetryLater) as caught:
        await w.handle(request_job())
    assert caught.value.counts is False and caught.value.delay_s == pytest.approx(24.0)
    assert caught.value.reason == "limited: paused"
    assert provider.calls == 0 and stub.named("enqueue") == []
    assert w.pacer.blocked_for() > 19  # the ready gate takes nothing meanwhile


async def test_a_short_limiter_wait_is_waited_out_then_the_call_goes() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=0.01, reason="requests"), Grant()])
    provider = UsageProvider()
    await worker(stub, provider).handle(request_job())
    assert len(stub.named("limit_acquire")) == 2 and provider.calls == 1


async def test_the_granted_probe_is_reported_as_the_probe() -> None:
    stub = StubSidecar(grants=[Grant(probe=True)])
    provider = UsageProvider()
    provider.down = True
    with pytest.raises(RetryLater):
        await worker(stub, provider).handle(request_job())
    [report] = stub.named("limit_report")
    assert (report["ok"], report["probe"]) == (False, True)
    assert stub.named("limit_settle")[0]["tokens_delta"] < 0  # nothing was used: given back


async def test_a_429_with_retry_after_pauses_the_scope_for_the_fleet() -> None:
    stub = StubSidecar()
    provider = UsageProvider()
    provider.failing, provider.retry_after_s = True, 30.0
    w = worker(stub, provider)
    with pytest.raises(RetryLater) as caught:
        await w.handle(request_job())
    assert (caught.value.delay_s, caught.value.counts) == (30.0, False)
    assert stub.named("limit_pause") == [{"scope": "s1", "pause_s": 30.0,
                                          "reason": "mock provider answered 503"}]  # fmt: skip
    assert w.pacer.blocked_for() > 29


async def test_rate_limit_headers_at_zero_on_an_answer_pause_the_scope() -> None:
    stub = StubSidecar()
    headers = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
    await worker(stub, UsageProvider(headers=headers)).handle(request_job())
    [pause] = stub.named("limit_pause")
    assert pause["pause_s"] == 360.0
    assert stub.named("enqueue")  # the answer itself is kept as usual


async def test_an_unreachable_limiter_puts_the_request_back_uncounted() -> None:
    stub = StubSidecar(grants=[SidecarUnavailable("gone", {"sent": False})])
    provider = UsageProvider()
    with pytest.raises(RetryLater) as caught:
        await worker(stub, provider).handle(request_job())
    assert caught.value.counts is False and caught.value.reason == "limiter_unavailable"
    assert provider.calls == 0


async def test_the_backoff_grows_with_the_streak_of_unavailable_outcomes_not_attempts() -> None:
    """With counts=False a request's attempts stay at 1 through an outage: the delay doubles
    with this process's streak of unavailable outcomes (jittered), up to the maximum, and an
    answer from the provider starts it again from the base. A Retry-After wins."""
    provider = UsageProvider()
    provider.down = True
    options = {"backoff_base_s": 1.0, "backoff_max_s": 8.0}
    highs = worker(StubSidecar(), provider, **options)
    lows = worker(StubSidecar(), provider, **options)
    lows._rand = lambda: 0.0

    async def delays(w: LLMWorker, n: int) -> list[float]:
        got = []
        for _ in range(n):
            with pytest.raises(RetryLater) as caught:
                await w.handle(request_job(attempts=1))
            assert caught.value.counts is False
            got.append(caught.value.delay_s)
        return got

    assert await delays(highs, 6) == [1, 2, 4, 8, 8, 8]
    assert await delays(lows, 5) == [0.5, 1, 2, 4, 4]  # jitter: half to all of each step
    assert jittered(10.0, lambda: 0.5) == 7.5
    provider.down = False
    await highs.handle(request_job())  # the provider answers: the streak ends
    assert highs.unavailable_streak == 0
    provider.failing = True
    assert await delays(highs, 2) == [1, 2]  # from the base again
    provider.retry_after_s = 30.0
    assert await delays(highs, 1) == [30.0]  # the provider's Retry-After, as sent


async def test_a_bad_payload_fails_for_good() -> None:
    with pytest.raises(PermanentFailure, match="bad payload"):
        await worker(StubSidecar()).handle(job("junk", ["not", "a", "map"]))


# -- the gateway: pacing -------------------------------------------------------------------


def gateway(stub: StubSidecar, provider: MockProvider | None = None) -> Gateway:
    return Gateway(provider or UsageProvider(), stub.as_client(), scope="s1", pacing=PACING)


async def test_a_fresh_call_asks_as_fresh_and_settles() -> None:
    stub = StubSidecar()
    result = await gateway(stub).handle(LLMRequest(body=BODY))
    assert result.status == 200
    [asked] = stub.named("limit_acquire")
    assert asked["fresh"] is True
    assert stub.named("limit_settle")[0]["tokens_delta"] == 42 - asked["tokens"]


async def test_a_fresh_call_the_limiter_holds_long_is_queued_without_a_call() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=30.0, reason="breaker_open")])
    provider = UsageProvider()
    with structlog.testing.capture_logs() as logs:
        result = await gateway(stub, provider).handle(LLMRequest(body=BODY, queue_id="g1"))
    assert provider.calls == 0 and stub.named("enqueue")[0]["queue_id"] == "g1"
    [queued] = [e for e in logs if e["event"] == "llm_queued"]
    assert queued["reason"] == "limited: breaker_open"
    assert result.decision == "queued"


async def test_a_fresh_call_waits_out_a_short_hold() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=0.01, reason="drain_share"), Grant()])
    result = await gateway(stub).handle(LLMRequest(body=BODY))
    assert result.status == 200 and len(stub.named("limit_acquire")) == 2


async def test_the_gateway_works_without_its_limiter() -> None:
    stub = StubSidecar(grants=[SidecarUnavailable("gone", {"sent": False})])
    result = await gateway(stub).handle(LLMRequest(body=BODY))
    assert result.status == 200  # fail open: the live service does not stop with its sidecar


async def test_queueing_off_answers_503_with_the_limiters_wait() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=12.4, reason="paused")])
    g = Gateway(UsageProvider(), stub.as_client(), pacing=PACING, queue_enabled=False)
    result = await g.handle(LLMRequest(body=BODY))
    assert (result.status, result.headers["Retry-After"]) == (503, "12")


# -- the gateway: pick-up ------------------------------------------------------------------


async def test_pick_up_returns_the_result_once_then_not_found() -> None:
    stub = StubSidecar(statuses={"p1": "completed"})
    g = gateway(stub)
    body = result_body("p1", {"status": "completed", "response": {"id": "x"}})
    await stub.enqueue(Pickup(body=body), queue_id="p1", queue="pickups", ttl_s=60)
    first = await g.status("p1")
    assert first.status == 200 and first.body == msgspec.json.decode(body)
    [done] = stub.named("complete")
    assert (done["queue_id"], done["queue"]) == ("p1", "pickups")
    again = await g.status("p1")
    assert again.status == 404 and again.body["message"] == PICKED_UP


async def test_pick_up_shows_progress_until_the_result_waits() -> None:
    stub = StubSidecar(statuses={"p2": "processing", "p3": "failed"})
    g = gateway(stub)
    progress = await g.status("p2")
    assert progress.status == 200 and progress.body["status"] == "processing"
    assert (await g.status("p3")).body["status"] == "failed"
    missing = await g.status("nope")
    assert missing.status == 404 and missing.body == {"error": "not_found"}


async def test_pick_up_with_the_sidecar_away_is_503() -> None:
    class Away(StubSidecar):
        async def take(self, queue_id: str, **kw: object) -> None:
            raise SidecarUnavailable("gone", {"sent": False})

    result = await gateway(Away()).status("x")
    assert result.status == 503 and result.headers["Retry-After"] == "5"


# -- Idempotency-Key: scoped to the request and the caller --------------------------------------


async def test_an_idempotency_key_never_leads_to_another_callers_or_requests_entry() -> None:
    """A key alone used to be the queue_id: caller B sending A's key got A's queue_id, and
    later picked up A's result. Now the queue_id hashes the caller, the key and the request."""
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=30.0, reason="breaker_open")] * 6)
    gw = gateway(stub)
    other = {"messages": [{"role": "user", "content": "someone else's question"}]}
    a = await gw.handle(LLMRequest(body=BODY, idempotency_key="k1", caller="alice"))
    retried = await gw.handle(LLMRequest(body=BODY, idempotency_key="k1", caller="alice"))
    b = await gw.handle(LLMRequest(body=BODY, idempotency_key="k1", caller="bob"))
    changed = await gw.handle(LLMRequest(body=other, idempotency_key="k1", caller="alice"))
    hooked = await gw.handle(LLMRequest(body=BODY, idempotency_key="k1", caller="alice",
                                        callback_url="https://hooks.example.com/x"))  # fmt: skip
    anonymous = await gw.handle(LLMRequest(body=BODY, idempotency_key="k1"))
    ids = [r.queue_id for r in (a, retried, b, changed, hooked, anonymous)]
    assert all(r.status == 202 for r in (a, retried, b, changed, hooked, anonymous))
    assert ids[0] == ids[1]  # the retry is the same request: queued once
    assert len(set(ids)) == 5 and "k1" not in ids
    assert all(qid is not None and qid.startswith("idem-") and len(qid) <= 128 for qid in ids)
    assert len(stub.stored) == 5


async def test_the_idempotent_queue_id_ignores_key_order_in_the_body() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=30.0, reason="paused")] * 2)
    gw = gateway(stub)
    one = await gw.handle(LLMRequest(body={"model": "m", "n": 1}, idempotency_key="k"))
    two = await gw.handle(LLMRequest(body={"n": 1, "model": "m"}, idempotency_key="k"))
    assert one.queue_id == two.queue_id and len(stub.stored) == 1


async def test_a_limit_below_even_the_small_failed_result_still_fails_the_request_once() -> None:
    stub = StubSidecar(enqueue_error=PayloadTooLarge("payload of 900 bytes is over 64"))
    w = worker(stub)
    with pytest.raises(PermanentFailure) as caught:
        await w.handle(request_job("tiny"))
    assert str(caught.value) == "result_too_large"
    assert len(stub.named("enqueue")) == 2  # the result, then the small one: no loop
    assert w.counts == {"completed": 0, "retried": 0, "failed": 1}
