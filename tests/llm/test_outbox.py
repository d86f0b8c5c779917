"""The deliverer's handler alone: every outcome of a delivery, its backoff, its signature."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest
import standardwebhooks
import structlog

from sidecar.client import PermanentFailure, RetryLater
from sidecar.llm.callbacks import CallbackSender, DeliveryOutcome, Verdict
from sidecar.llm.outbox import (
    LAST_TRY_BEFORE_EXPIRY_S,
    Deliverer,
    Delivery,
    DeliveryOptions,
    Pickup,
    delivery_backoff_s,
    keep_result,
    result_body,
)
from sidecar.llm.webhooks import WebhookSigner
from tests.llm.stub_sidecar import StubSidecar, job

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
URL = "https://hooks.example.com/llm?token=abc"
BODY = result_body("q1", {"status": "completed", "response": {"id": "x", "n": "é"}})
NOW = 1_000_000.0


class FakeSender:
    """Answers each delivery with the next outcome; records what was sent."""

    def __init__(self, *outcomes: DeliveryOutcome) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    async def deliver(
        self, url: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> DeliveryOutcome:
        self.sent.append((url, body, dict(headers or {})))
        return self.outcomes.pop(0)

    async def aclose(self) -> None:
        pass


def ok() -> DeliveryOutcome:
    return DeliveryOutcome(verdict=Verdict.DELIVERED, reason="callback answered 200",
                           http_status=200)  # fmt: skip


def retry(status: int | None = 500, after: float | None = None) -> DeliveryOutcome:
    return DeliveryOutcome(verdict=Verdict.RETRY, reason=f"callback answered {status}",
                           http_status=status, retry_after_s=after)  # fmt: skip


def deliverer(
    sender: FakeSender, *, signer: bool = True, rand: float = 1.0, retry_max_s: float = 3600.0
) -> Deliverer:
    return Deliverer(
        options=DeliveryOptions(retry_max_s=retry_max_s),
        sender=sender,  # type: ignore[arg-type]
        signer=WebhookSigner(SECRET) if signer else None,
        rand=lambda: rand,
        now=lambda: NOW,
    )


def entry(
    queue_id: str = "q1", *, age_s: float = 0.0, body: bytes = BODY, url: str = URL,
    expires_in_s: float = 24 * 3600.0,
) -> Any:  # fmt: skip
    return job(queue_id, Delivery(url=url, body=body), created_at=NOW - age_s,
               expires_at=NOW + expires_in_s)  # fmt: skip


# -- the backoff ------------------------------------------------------------------------------


def test_the_backoff_starts_about_a_second_after_a_failure_and_grows_with_the_age() -> None:
    high, low = (lambda: 1.0), (lambda: 0.0)
    assert delivery_backoff_s(0.0, 3600, high) == 1.0
    assert delivery_backoff_s(0.0, 3600, low) == 0.5  # jitter: half to all of the step
    assert delivery_backoff_s(0.3, 3600, high) == 1.0
    assert delivery_backoff_s(10.0, 3600, high) == 10.0
    assert delivery_backoff_s(10.0, 3600, low) == 5.0
    assert delivery_backoff_s(7200.0, 3600, high) == 3600.0  # capped
    assert delivery_backoff_s(7200.0, 60, low) == 30.0


def test_the_tries_of_a_day_long_outage_space_out_to_the_cap() -> None:
    """Simulated: the age at each try, with middling jitter, until a day has passed."""
    age, tries, gaps = 0.0, 0, []
    while age < 24 * 3600:
        gap = delivery_backoff_s(age, 3600, lambda: 0.5)
        gaps.append(gap)
        age += gap
        tries += 1
    assert gaps[0] == 0.75 and gaps == sorted(gaps) and max(gaps) == 2700.0
    assert 30 <= tries <= 60  # not thousands of tries against a dead receiver


# -- the handler -----------------------------------------------------------------------------


async def test_a_delivered_result_returns_and_is_signed_with_a_stable_id() -> None:
    sender = FakeSender(retry(500), ok())
    d = deliverer(sender)
    with pytest.raises(RetryLater):
        await d.handle(entry(age_s=0.0))
    await d.handle(entry(age_s=1.0))
    (url1, body1, h1), (url2, body2, h2) = sender.sent
    assert url1 == url2 == URL and body1 == body2 == BODY  # the exact bytes, every try
    assert h1["webhook-id"] == h2["webhook-id"] == "msg_q1"
    hook = standardwebhooks.Webhook(SECRET)  # an independent implementation verifies it
    assert hook.verify(body2, h2)["queue_id"] == "q1"
    assert d.counts == {"delivered": 1, "retried": 1, "failed": 0}


async def test_each_try_has_a_fresh_timestamp() -> None:
    sender = FakeSender(retry(500), ok())
    d = deliverer(sender)
    signer = d.signer
    assert signer is not None
    stamps = iter([NOW, NOW + 90])
    original = signer.headers
    signer.headers = lambda qid, body, **kw: original(qid, body, now=next(stamps))  # type: ignore[method-assign]
    with pytest.raises(RetryLater):
        await d.handle(entry())
    await d.handle(entry())
    t1, t2 = (int(h["webhook-timestamp"]) for _, _, h in sender.sent)
    assert t2 - t1 == 90


async def test_a_failure_is_retried_uncounted_after_a_backoff_by_the_entrys_age() -> None:
    d = deliverer(FakeSender(retry(500), retry(None), retry(502)), rand=1.0)
    delays = []
    for age in (0.0, 30.0, 100_000.0):
        with pytest.raises(RetryLater) as caught:
            await d.handle(entry(age_s=age))
        assert caught.value.counts is False
        delays.append(caught.value.delay_s)
    assert delays == [1.0, 30.0, 3600.0]


async def test_retry_after_is_honoured_on_429_and_503_and_bounded() -> None:
    d = deliverer(FakeSender(retry(429, 30.0), retry(503, 99_999.0), retry(500, 30.0)),
                  retry_max_s=600)  # fmt: skip
    got = []
    for _ in range(3):
        with pytest.raises(RetryLater) as caught:
            await d.handle(entry(age_s=5.0))
        got.append(caught.value.delay_s)
    assert got == [30.0, 600.0, 5.0]  # a 500's Retry-After is not the receiver's to set


@pytest.mark.parametrize("after", [0.0, 0.2])
@pytest.mark.parametrize("rand", [0.0, 1.0])
async def test_a_short_retry_after_never_makes_the_wait_shorter_than_the_first_retry(
    after: float, rand: float
) -> None:
    # Retry-After: 0 (or a date in the past) must not turn into a hot loop of tries: it may
    # lengthen the wait, never shorten it below the first retry's backoff (jittered).
    d = deliverer(FakeSender(retry(429, after), retry(503, after)), rand=rand)
    for _ in range(2):
        with pytest.raises(RetryLater) as caught:
            await d.handle(entry(age_s=0.0))
        assert caught.value.delay_s == delivery_backoff_s(0.0, 3600, lambda: rand) > 0.4
        assert caught.value.counts is False


async def test_the_last_try_comes_shortly_before_the_entry_expires() -> None:
    # An hour's backoff would land after the TTL: the try is moved to shortly before expiry.
    d = deliverer(FakeSender(retry(500), retry(429, 7200.0), retry(500)), rand=1.0)
    delays = []
    for expires_in in (600.0, 600.0, LAST_TRY_BEFORE_EXPIRY_S / 2):
        with pytest.raises(RetryLater) as caught:
            await d.handle(entry(age_s=100_000.0, expires_in_s=expires_in))
        delays.append(caught.value.delay_s)
    last = 600.0 - LAST_TRY_BEFORE_EXPIRY_S
    # The third: already the last try (too close to expiry to move): its backoff stands.
    assert delays == [last, last, 3600.0]


async def test_410_gone_stops_for_good() -> None:
    gone = DeliveryOutcome(verdict=Verdict.STOP, http_status=410,
                           reason="callback answered 410 Gone: no more")  # fmt: skip
    d = deliverer(FakeSender(gone))
    with structlog.testing.capture_logs() as logs, pytest.raises(PermanentFailure) as caught:
        await d.handle(entry())
    assert "410" in str(caught.value)
    [failed] = [e for e in logs if e["event"] == "llm_callback_failed"]
    assert failed["queue_id"] == "q1" and failed["verdict"] == "stop"
    assert d.counts["failed"] == 1


async def test_a_url_the_policy_refuses_stops_for_good_without_a_connection() -> None:
    async with CallbackSender() as sender:  # the real one: no allow-list
        d = Deliverer(sender=sender)
        for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest", "file:///etc/x"):
            with pytest.raises(PermanentFailure) as caught:
                await d.handle(entry(url=url))
            assert "refused" in str(caught.value)


async def test_unsigned_without_a_secret() -> None:
    sender = FakeSender(ok())
    await deliverer(sender, signer=False).handle(entry())
    assert sender.sent[0][2] == {}


async def test_a_bad_entry_fails_for_good() -> None:
    d = deliverer(FakeSender())
    with pytest.raises(PermanentFailure, match="bad delivery payload"):
        await d.handle(job("q1", {"not": "a delivery"}))
    with pytest.raises(PermanentFailure, match="cannot sign"):
        await d.handle(entry("bad id with spaces"))


# -- keeping a result ----------------------------------------------------------------------------


async def test_a_result_goes_to_deliveries_with_a_url_else_to_pickups_once() -> None:
    stub = StubSidecar()
    assert await keep_result(stub.as_client(), "a", URL, BODY, 3600.0) == "deliveries"
    assert await keep_result(stub.as_client(), "b", None, BODY, 60.0) == "pickups"
    assert await keep_result(stub.as_client(), "b", None, b"{}", 60.0) == "pickups"  # again
    delivery = msgspec.msgpack.decode(stub.stored[("deliveries", "a")].payload, type=Delivery)
    pickup = msgspec.msgpack.decode(stub.stored[("pickups", "b")].payload, type=Pickup)
    assert (delivery.url, delivery.body, pickup.body) == (URL, BODY, BODY)  # the first kept
    assert [(kw["queue"], kw["queue_id"], kw["ttl_s"]) for kw in stub.named("enqueue")] == [
        ("deliveries", "a", 3600.0), ("pickups", "b", 60.0), ("pickups", "b", 60.0),
    ]  # fmt: skip


def test_the_result_body_keeps_todays_fields() -> None:
    ok_body = msgspec.json.decode(result_body("q", {"status": "completed", "response": {"a": 1}}))
    assert ok_body == {"queue_id": "q", "status": "completed", "response": {"a": 1}}
    err = result_body("q", {"status": "failed", "http_status": 400, "error": {"e": 1}})
    assert list(msgspec.json.decode(err)) == ["queue_id", "status", "http_status", "error"]
