"""The limiter client alone: header parsing, token estimates, scopes, and the Pacer's branches."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
import pytest
import structlog

from sidecar.config import ConfigError, Settings
from sidecar.errors import SidecarUnavailable, UnknownOp
from sidecar.llm.pacing import (
    FAIL_OPEN_BYPASS_S,
    MAX_WAIT_S,
    Pacer,
    PacingOptions,
    completion_tokens,
    estimate_prompt_tokens,
    pacing_options,
    parse_duration,
    pause_from_headers,
    reserve_tokens,
    scope_for,
    used_tokens,
)
from tests.llm.stub_sidecar import Grant, StubSidecar
from tests.support.helpers import FakeClock

# -- OpenAI's duration format and the pause headers ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0), ("1s", 1.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2m", 120.0),
        ("0.5s", 0.5), ("1m30s", 90.0), ("30", 30.0), ("1.5", 1.5), (" 7s ", 7.0),
        ("", None), (None, None), ("soon", None), ("-1", None), ("5x", None), ("m", None),
        ("nan", None), ("inf", None),
    ],
)  # fmt: skip
def test_durations_in_openai_format_and_plain_seconds(text: str | None, seconds: float) -> None:
    got = parse_duration(text)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("status", "headers", "pause"),
    [
        (429, {"Retry-After": "7"}, 7.0),
        (503, {"retry-after": "2"}, 2.0),
        (429, {"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the finer one wins
        (500, {"Retry-After": "7"}, None),  # only 429 and 503 pause by Retry-After
        (200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}, 360),
        (200, {"X-RateLimit-Remaining-Tokens": "0", "X-RateLimit-Reset-Tokens": "20ms"}, 0.02),
        (200, {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}, None),
        (200, {"x-ratelimit-remaining-tokens": "0"}, None),  # no reset: nothing to go by
        (429, {"retry-after": "1", "x-ratelimit-remaining-tokens": "0",
               "x-ratelimit-reset-tokens": "1m"}, 60.0),  # the longest of those that apply
        (None, {}, None),
    ],
)  # fmt: skip
def test_pause_from_headers(status: int | None, headers: dict[str, str], pause: float) -> None:
    got = pause_from_headers(status, headers)
    assert got == (pytest.approx(pause) if pause is not None else None)


# -- tokens ----------------------------------------------------------------------------------


def test_the_prompt_estimate_is_the_json_size_over_four_rounded_up() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}]}
    size = len(msgspec.json.encode(body))
    assert estimate_prompt_tokens(body) == -(-size // 4)
    assert estimate_prompt_tokens({}) == 1  # never zero: a call is never free
    # Multibyte text counts its UTF-8 bytes: about a token per character for CJK text.
    assert estimate_prompt_tokens({"c": "语" * 100}) >= 75


def test_the_reservation_adds_the_answers_most() -> None:
    base: dict[str, object] = {"messages": []}
    prompt = estimate_prompt_tokens(base)
    assert reserve_tokens(base, 1024) == prompt + 1024
    with_max = {**base, "max_tokens": 50}
    assert reserve_tokens(with_max, 1024) == estimate_prompt_tokens(with_max) + 50
    assert completion_tokens({"max_completion_tokens": 70, "max_tokens": 50}, 1024) == 70
    assert completion_tokens({"max_tokens": 50, "n": 3}, 1024) == 150
    assert completion_tokens({"max_tokens": True}, 1024) == 1024  # not a number of tokens
    assert completion_tokens({"max_tokens": -5, "n": "2"}, 256) == 256


def test_used_tokens_reads_the_usage_the_provider_reports() -> None:
    assert used_tokens({"usage": {"total_tokens": 123}}) == 123
    assert used_tokens({"usage": {"prompt_tokens": 3}}) is None
    assert used_tokens({"usage": "lots"}) is None
    assert used_tokens({}) is None


def test_a_scope_names_provider_url_model_and_key_without_the_key() -> None:
    key = "sk-very-secret-0123456789"
    scope = scope_for("openai", "https://api.openai.com/v1", "gpt-4o-mini", key)
    assert key not in scope and hashlib.sha256(key.encode()).hexdigest() not in scope
    assert scope.startswith("llm.openai.gpt-4o-mini.")
    assert scope == scope_for("openai", "https://api.openai.com/v1", "gpt-4o-mini", key)
    others = {
        scope_for("openai", "https://api.openai.com/v1", "gpt-4o-mini", "sk-other"),
        scope_for("openai", "https://eu.example/v1", "gpt-4o-mini", key),
        scope_for("openai", "https://api.openai.com/v1", "gpt-4o", key),
    }
    assert scope not in others and len(others) == 3
    odd = scope_for("openai", "u", "org/model name:v1", None)
    assert set(odd) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


# -- the Pacer ---------------------------------------------------------------------------------


def _pacer(stub: StubSidecar, **opts: object) -> tuple[Pacer, list[float], FakeClock]:
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock.advance(s)

    options = PacingOptions(**{"rpm": 600, "tpm": 60_000, **opts})  # type: ignore[arg-type]
    return Pacer(stub.as_client(), "scope-1", options, clock=clock, sleep=sleep), slept, clock


async def test_a_grant_admits_the_call_with_what_it_asked() -> None:
    stub = StubSidecar(grants=[Grant(granted=True, probe=True)])
    pacer, slept, _ = _pacer(stub, drain_share=0.25, ramp_s=12.0)
    admission = await pacer.admit(1500, fresh=False)
    assert admission.granted and admission.probe and admission.tokens == 1500 and admission.paced
    [asked] = stub.named("limit_acquire")
    assert asked == {
        "scope": "scope-1", "rpm": 600, "tpm": 60_000, "requests": 1, "tokens": 1500,
        "fresh": False, "drain_share": 0.25, "ramp_s": 12.0,
    }  # fmt: skip
    assert slept == []


async def test_a_reservation_above_a_minutes_budget_asks_for_the_whole_minute() -> None:
    stub = StubSidecar()
    pacer, _, _ = _pacer(stub, tpm=1000)
    admission = await pacer.admit(5000, fresh=False)
    assert admission.tokens == 1000 and stub.named("limit_acquire")[0]["tokens"] == 1000


async def test_a_short_wait_is_waited_out_and_asked_again() -> None:
    waits = [Grant(granted=False, wait_s=0.4, reason="requests"),
             Grant(granted=False, wait_s=1.5, reason="tokens")]  # fmt: skip
    stub = StubSidecar(grants=[*waits, Grant()])
    pacer, slept, _ = _pacer(stub)
    admission = await pacer.admit(10, fresh=True)
    assert admission.granted and slept == [0.4, 1.5]
    assert [kw["fresh"] for kw in stub.named("limit_acquire")] == [True, True, True]
    assert pacer.blocked_for() == 0


async def test_a_long_wait_is_handed_back_and_blocks_this_process() -> None:
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=9.0, reason="breaker_open")])
    pacer, slept, clock = _pacer(stub)
    admission = await pacer.admit(10, fresh=False)
    assert (admission.granted, admission.wait_s, admission.reason) == (False, 9.0, "breaker_open")
    assert slept == [] and pacer.blocked_for() == pytest.approx(9.0)
    clock.advance(9.0)
    assert pacer.blocked_for() == 0


async def test_the_ready_gate_waits_while_blocked_and_ends_on_stop() -> None:
    stub = StubSidecar()
    pacer = Pacer(stub.as_client(), "s")
    stop = asyncio.Event()
    await asyncio.wait_for(pacer.wait_ready(stop), 1)  # not blocked: at once
    pacer.block(3600)
    waiting = asyncio.ensure_future(pacer.wait_ready(stop))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    stop.set()
    await asyncio.wait_for(waiting, 1)


async def test_the_gateway_fails_open_when_the_daemon_is_away_and_says_so_once() -> None:
    down = SidecarUnavailable("sidecar unavailable at /x", {"sent": False})
    stub = StubSidecar(grants=[down, down, Grant(), Grant()])
    clock = FakeClock()
    pacer = Pacer(stub.as_client(), "s", fail_open=True, clock=clock)
    with structlog.testing.capture_logs() as logs:
        first = await pacer.admit(5, fresh=True)
        bypassed = await pacer.admit(5, fresh=True)  # within the bypass: the limiter not asked
        assert len(stub.named("limit_acquire")) == 1
        await pacer.report(ok=True)  # bookkeeping skipped too while bypassed
        await pacer.pause(3.0, "429")
        assert stub.named("limit_report") == [] and stub.named("limit_pause") == []
        clock.advance(FAIL_OPEN_BYPASS_S)
        second = await pacer.admit(5, fresh=True)  # asked again: still away, bypassed again
        clock.advance(FAIL_OPEN_BYPASS_S)
        third = await pacer.admit(5, fresh=True)
    assert (first.granted, first.paced, bypassed.paced) == (True, False, False)
    assert (second.paced, third.paced) == (False, True)
    assert len(stub.named("limit_acquire")) == 3
    events = [e["event"] for e in logs]
    assert events.count("llm_limiter_unavailable") == 1
    assert events.count("llm_limiter_available") == 1


async def test_the_gateways_limiter_calls_have_a_short_deadline() -> None:
    """A daemon that accepts but never answers (hung, SIGSTOP) costs a fresh call at most
    the deadline (FAIL_OPEN_DEADLINE_S by default), not the client's whole timeout."""
    stub = StubSidecar()
    hung = asyncio.Event()

    async def never(scope: str, **kw: Any) -> Grant:
        await hung.wait()
        return Grant()

    stub.limit_acquire = never  # type: ignore[method-assign]
    pacer = Pacer(stub.as_client(), "s", fail_open=True, deadline_s=0.05)
    with structlog.testing.capture_logs() as logs:
        admission = await asyncio.wait_for(pacer.admit(5, fresh=True), 10)
    assert admission.granted and not admission.paced
    [lapse] = [e for e in logs if e["event"] == "llm_limiter_unavailable"]
    assert "no answer within 0.05 s" in lapse["error"]
    hung.set()


async def test_short_waits_are_capped_in_total_then_handed_back() -> None:
    """Refusals of under MAX_WAIT_S each, again and again, must not hold a call forever."""
    stub = StubSidecar(grants=[Grant(granted=False, wait_s=1.5, reason="requests")] * 50)
    pacer, slept, _ = _pacer(stub)
    admission = await pacer.admit(10, fresh=True)
    assert (admission.granted, admission.wait_s, admission.reason) == (False, 1.5, "requests")
    assert sum(slept) <= MAX_WAIT_S and slept == [1.5]
    assert len(stub.named("limit_acquire")) == 2


async def test_a_worker_does_not_fail_open_but_an_older_daemon_is_unpaced() -> None:
    down = SidecarUnavailable("sidecar unavailable", {"sent": False})
    pacer = Pacer(StubSidecar(grants=[down]).as_client(), "s")
    with pytest.raises(SidecarUnavailable):
        await pacer.admit(5, fresh=False)
    old = Pacer(StubSidecar(grants=[UnknownOp("unknown op limit_acquire")]).as_client(), "s")
    admission = await old.admit(5, fresh=False)
    assert admission.granted and not admission.paced


async def test_settle_sends_the_difference_only_when_it_matters() -> None:
    stub = StubSidecar()
    pacer, _, _ = _pacer(stub)
    await pacer.settle(1000, 420)
    await pacer.settle(1000, None)  # no usage reported: the reservation stands
    await pacer.settle(1000, 1000)
    assert stub.named("limit_settle") == [{"scope": "scope-1", "tpm": 60_000,
                                           "tokens_delta": -580}]  # fmt: skip
    unlimited = StubSidecar()
    pacer, _, _ = _pacer(unlimited, tpm=0)
    await pacer.settle(1000, 3)
    assert unlimited.named("limit_settle") == []


async def test_report_passes_the_breaker_parameters_and_an_open_state_blocks() -> None:
    stub = StubSidecar(state="open")
    pacer, _, _ = _pacer(stub, breaker_failures=3, breaker_reset_s=7.0)
    with structlog.testing.capture_logs() as logs:
        await pacer.report(ok=False, probe=True)
    assert stub.named("limit_report") == [{"scope": "scope-1", "ok": False, "probe": True,
                                           "failures": 3, "reset_s": 7.0}]  # fmt: skip
    assert pacer.breaker == "open" and pacer.blocked_for() == pytest.approx(7.0)
    [changed] = [e for e in logs if e["event"] == "llm_breaker_changed"]
    assert (changed["state"], changed["was"]) == ("open", "closed")


async def test_pause_tells_the_fleet_and_blocks_here() -> None:
    stub = StubSidecar()
    pacer, _, _ = _pacer(stub)
    await pacer.pause(12.5, "provider answered 429")
    assert stub.named("limit_pause") == [{"scope": "scope-1", "pause_s": 12.5,
                                          "reason": "provider answered 429"}]  # fmt: skip
    assert pacer.blocked_for() == pytest.approx(12.5)


async def test_a_failed_bookkeeping_call_is_logged_not_raised() -> None:
    class Failing(StubSidecar):
        async def limit_report(self, scope: str, **kw: object) -> str:
            raise SidecarUnavailable("gone", {"sent": True})

    pacer = Pacer(Failing().as_client(), "s")
    with structlog.testing.capture_logs() as logs:
        await pacer.report(ok=True)
    assert [e["event"] for e in logs] == ["llm_limiter_call_failed"]


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "raw", "accepted"),
    [
        ("LLM_PROVIDER_RPM", "-1", "a whole number from 0 to 1000000"),
        ("LLM_PROVIDER_TPM", "lots", "a whole number from 0 to 1000000000"),
        ("LLM_DEFAULT_MAX_TOKENS", "0", "a whole number from 1 to 10000000"),
        ("LLM_DRAIN_SHARE", "0", "a number > 0 and at most 1"),
        ("LLM_DRAIN_SHARE", "1.5", "a number > 0 and at most 1"),
        ("LLM_RAMP_SECONDS", "-3", "a number of seconds from 0 to 3600"),
        ("LLM_DELIVERY_CONCURRENCY", "1001", "a whole number from 0 to 1000"),
        ("LLM_RESULT_TTL_HOURS", "0", "a number of hours > 0 and <= 720"),
        # Above the protocol's MAX_TTL_S every kept result would be refused (and the provider
        # asked again until the request's own TTL): refused at start instead.
        ("LLM_RESULT_TTL_HOURS", "1000", "a number of hours > 0 and <= 720"),
        ("LLM_WEBHOOK_RETRY_MAX_SECONDS", "never", "a number of seconds > 0"),
    ],
)
def test_a_bad_pacing_or_delivery_setting_names_its_variable(
    env: str, raw: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({env: raw})
    assert str(info.value).startswith(f"{env}={raw!r} is invalid: expected {accepted}")


def test_the_pacing_options_come_from_the_settings() -> None:
    settings = Settings.from_env({"LLM_PROVIDER_RPM": "600", "LLM_PROVIDER_TPM": "60000",
                                  "LLM_DEFAULT_MAX_TOKENS": "256", "LLM_DRAIN_SHARE": "0.3",
                                  "LLM_RAMP_SECONDS": "0", "LLM_BREAKER_FAILURES": "2",
                                  "LLM_BREAKER_RESET_SECONDS": "4"})  # fmt: skip
    assert pacing_options(settings) == PacingOptions(
        rpm=600, tpm=60_000, default_max_tokens=256, drain_share=0.3, ramp_s=0.0,
        breaker_failures=2, breaker_reset_s=4.0,
    )  # fmt: skip
    assert pacing_options(Settings()) == PacingOptions()  # the defaults agree


def test_the_result_ttl_may_be_the_protocols_longest() -> None:
    assert Settings.from_env({"LLM_RESULT_TTL_HOURS": "720"}).llm_result_ttl_hours == 720.0
