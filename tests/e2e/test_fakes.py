"""The fakes the scenarios stand on: a provider and a webhook receiver, each over real HTTP.

The provider is reached through the sidecar's own OpenAIProvider (what `sidecar work` and the
gateway send), so a fake that drifted from what the sidecar speaks fails here first. Limits
are checked on a short window with the fake's own clock (monotonic), never by sleeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from sidecar.llm.errors import ProviderUnavailable
from sidecar.llm.providers import OpenAIProvider
from sidecar.llm.webhooks import WebhookSigner, generate_secret
from tests.support.fake_provider import (
    Call,
    FakeProvider,
    Mode,
    estimate_prompt_tokens,
    go_duration,
    overlapping,
    per_second,
    share,
    token_weight,
    window_max,
)
from tests.support.fake_receiver import FakeReceiver

KEY = "sk-fake-0123"


def chat(text: str, max_tokens: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {"model": "fake-gpt", "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def openai(provider: FakeProvider, key: str = KEY) -> OpenAIProvider:
    return OpenAIProvider(base_url=provider.base_url, model="fake-gpt", api_key=key,
                          connect_timeout_s=1, read_timeout_s=5)  # fmt: skip


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider(api_key=KEY, completion_tokens=30) as p:
        yield p


# -- the provider --------------------------------------------------------------------------------


async def test_the_sidecars_provider_gets_a_completion_with_usage(provider: FakeProvider) -> None:
    client = openai(provider)
    try:
        reply = await client.complete(chat("x" * 40, max_tokens=12))
    finally:
        await client.aclose()
    assert reply.status == 200
    assert reply.body["usage"] == {"prompt_tokens": 10, "completion_tokens": 12,
                                   "total_tokens": 22}  # fmt: skip
    assert reply.body["choices"][0]["message"]["content"] == " ".join(["tok"] * 12)
    [call] = provider.calls
    assert (call.status, call.prompt_tokens, call.completion_tokens) == (200, 10, 12)
    assert call.tokens == 22
    assert call.tag == "x" * 40 and call.model == "fake-gpt" and call.authorised
    assert call.at <= call.done


async def test_a_wrong_key_is_recorded_as_unauthorised(provider: FakeProvider) -> None:
    client = openai(provider, key="sk-other")
    try:
        await client.complete(chat("hi"))
    finally:
        await client.aclose()
    assert [c.authorised for c in provider.calls] == [False]


async def test_down_refuses_connections_and_up_answers_on_the_same_port(
    provider: FakeProvider,
) -> None:
    client = openai(provider)
    try:
        provider.go_down()
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            await client.complete(chat("a"))
        assert provider.calls == []  # nothing reached the fake
        provider.come_up()
        assert (await client.complete(chat("b"))).status == 200
    finally:
        await client.aclose()
    assert [c.tag for c in provider.calls] == ["b"]


async def test_503_with_retry_after_is_unavailable_and_recorded(provider: FakeProvider) -> None:
    client = openai(provider)
    provider.fail_with(503, retry_after_s=2.5)
    provider.mark("outage")
    try:
        with pytest.raises(ProviderUnavailable) as err:
            await client.complete(chat("a"))
        assert err.value.retry_after_s == 3  # whole seconds, rounded up
        provider.fail_with(500)
        with pytest.raises(ProviderUnavailable):
            await client.complete(chat("b"))
        provider.reset_connections()
        with pytest.raises(ProviderUnavailable):
            await client.complete(chat("c"))
    finally:
        await client.aclose()
    assert [(c.status, c.phase, c.tokens) for c in provider.calls] == [
        (503, "outage", 0), (500, "outage", 0), (0, "outage", 0)
    ]  # fmt: skip
    assert provider.mode is Mode.RESET


def test_requests_past_the_limit_get_429_with_retry_after() -> None:
    with (
        FakeProvider(rpm=3, window_s=2.0, ratelimit_headers=True) as provider,
        httpx.Client(base_url=provider.base_url, timeout=5) as http,
    ):
        answers = [http.post("/chat/completions", json=chat(f"r{n}")) for n in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    late = answers[3]
    assert 1 <= int(late.headers["retry-after"]) <= 2
    assert late.json()["error"]["code"] == "rate_limit_exceeded"
    assert late.headers["x-ratelimit-remaining-requests"] == "0"
    assert late.headers["x-ratelimit-limit-requests"] == "3"
    assert late.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert share(provider.calls, 429) == 0.25


def test_tokens_past_the_limit_get_429_and_a_429_costs_nothing() -> None:
    # 30 + 10 prompt tokens per call (40 characters = 10 tokens): two fit in 100, a third not.
    with (
        FakeProvider(tpm=100, window_s=2.0, completion_tokens=30) as provider,
        httpx.Client(base_url=provider.base_url, timeout=5) as http,
    ):
        codes = [http.post("/chat/completions", json=chat("y" * 40)).status_code for _ in range(4)]
        small = http.post("/chat/completions", json=chat("z", max_tokens=5))
    assert codes == [200, 200, 429, 429]
    assert small.status_code == 200  # 1 + 5 tokens still fit: the 429s were not charged
    assert [c.tokens for c in provider.calls] == [40, 40, 0, 0, 6]


def test_the_window_slides() -> None:
    with (
        FakeProvider(rpm=1, window_s=0.3) as provider,
        httpx.Client(base_url=provider.base_url, timeout=5) as http,
    ):
        first = http.post("/chat/completions", json=chat("a"))
        second = http.post("/chat/completions", json=chat("b"))
        deadline = time.monotonic() + 5
        while http.post("/chat/completions", json=chat("c")).status_code != 200:
            assert time.monotonic() < deadline, "the window never slid"
    assert (first.status_code, second.status_code) == (200, 429)
    ok = [c for c in provider.calls if c.ok]
    assert ok[1].at - ok[0].at >= 0.3


def test_the_fakes_token_count_and_durations() -> None:
    assert estimate_prompt_tokens({"messages": [{"content": "abcd"}, {"content": "e"}]}) == 2
    assert estimate_prompt_tokens({"messages": []}) == 1
    assert [go_duration(s) for s in (0.12, 1.5, 360)] == ["120ms", "1.5s", "6m0s"]


# -- reading the record --------------------------------------------------------------------------


def _call(at: float, status: int = 200, tokens: int = 10, done: float | None = None) -> Call:
    return Call(at=at, done=at + 0.1 if done is None else done, status=status, prompt_tokens=tokens,
                completion_tokens=0, phase="", tag="", model="", authorised=True)  # fmt: skip


def test_series_and_window_maxima() -> None:
    calls = [_call(t) for t in (0.1, 0.2, 1.5, 2.0, 2.05, 9.9)] + [_call(2.1, status=429)]
    assert per_second(calls, 0.0, 4.0) == [2, 1, 2, 0]
    assert per_second(calls, 0.0, 4.0, ok_only=False) == [2, 1, 3, 0]
    assert window_max(calls, 1.0) == (3, 1.5)  # 1.5, 2.0, 2.05 (the 429 does not count)
    assert window_max(calls, 10.0) == (6, 0.1)
    assert window_max(calls, 1.0, token_weight) == (30, 1.5)
    assert window_max([], 10.0) == (0, 0.0)
    assert overlapping([_call(0, done=2), _call(1, done=3), _call(3, done=4)]) == 2


# -- the receiver --------------------------------------------------------------------------------


@pytest.fixture
def secret() -> str:
    return generate_secret()


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    try:
        return httpx.post(url, content=body, headers=headers, timeout=5).status_code
    except httpx.ConnectError:
        return 0


def test_the_receiver_verifies_the_sidecars_signatures(secret: str) -> None:
    other = generate_secret()
    signer = WebhookSigner(f"{other} {secret}")  # a rotation: the receiver knows the second
    body = json.dumps({"queue_id": "q1", "status": "completed"}).encode()
    with FakeReceiver(secret) as receiver:
        assert post(receiver.url(), body, signer.headers("q1", body)) == 200
        tampered = body.replace(b"completed", b"failed")
        assert post(receiver.url(), tampered, signer.headers("q1", body)) == 200
        assert post(receiver.url(), body, {}) == 200
    good, bad, unsigned = receiver.deliveries
    assert good.verified and good.webhook_id == "msg_q1" and good.queue_id == "q1"
    assert not bad.verified and bad.verify_error == "No matching signature found"
    assert not unsigned.verified and unsigned.verify_error == "Missing required headers"
    assert receiver.check() == [
        "/results q1: not verified (No matching signature found)",
        "/results q1: not verified (Missing required headers)",
        "result q1 came with webhook-ids ['None', 'msg_q1']",
    ]


def test_the_receiver_goes_down_fails_and_answers_by_path(secret: str) -> None:
    signer = WebhookSigner(secret)
    body = json.dumps({"queue_id": "q2", "status": "completed"}).encode()
    with FakeReceiver(secret) as receiver:
        receiver.go_down()
        assert post(receiver.url(), body, signer.headers("q2", body)) == 0
        receiver.answer(500)
        assert post(receiver.url(), body, signer.headers("q2", body)) == 500
        receiver.come_up()
        receiver.answer(410, path="/gone")
        receiver.answer(429, path="/busy", Retry_After="3")
        assert post(receiver.url("/gone"), body, signer.headers("q2", body)) == 410
        assert httpx.post(receiver.url("/busy"), content=body).headers["retry-after"] == "3"
        assert post(receiver.url(), body, signer.headers("q2", body)) == 200
    assert [d.status for d in receiver.deliveries] == [500, 410, 429, 200]
    assert receiver.accepted_ids() == {"q2"}
    assert receiver.wait_accepted(["q2"], 0) == set()
    assert receiver.wait_accepted(["q2", "q3"], 0.01) == {"q3"}


def test_the_receiver_flags_ids_that_do_not_match_results(secret: str) -> None:
    signer = WebhookSigner(secret)
    a = json.dumps({"queue_id": "a"}).encode()
    b = json.dumps({"queue_id": "b"}).encode()
    with FakeReceiver(secret) as receiver:
        post(receiver.url(), a, signer.headers("a", a))
        post(receiver.url(), a, signer.headers("a", a))  # a duplicate, same id: fine
        assert receiver.check() == []
        post(receiver.url(), b, {**signer.headers("b", b), "webhook-id": "msg_a"})
    # Signed for msg_b, sent as msg_a: it fails the check, and so does the shared id.
    assert receiver.check() == [
        "/results b: not verified (No matching signature found)",
        "webhook-id msg_a carried results ['a', 'b']",
    ]
