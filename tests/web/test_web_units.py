"""The dashboard's parts without a daemon: settings, the sampler's rates, views, small rules."""

from __future__ import annotations

import msgspec
import pytest

from sidecar.config import ConfigError, Settings
from sidecar.errors import SidecarUnavailable
from sidecar.protocol import StatsResult
from sidecar.web.context import in_queue
from sidecar.web.sampler import Sampler
from sidecar.web.security import BindRefused, HostRule, check_payloads, is_loopback, safe_next
from sidecar.web.views import duration, payload_text, size

TOKEN = "a-token-of-enough-length"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"SIDECAR_WEB_PORT": "70000"}, "SIDECAR_WEB_PORT='70000' is invalid: expected a whole"),
        ({"SIDECAR_WEB_PORT": "http"}, "SIDECAR_WEB_PORT='http' is invalid"),
        ({"SIDECAR_WEB_SHOW_PAYLOADS": "maybe"}, "SIDECAR_WEB_SHOW_PAYLOADS='maybe' is invalid"),
        ({"SIDECAR_WEB_SAMPLE_SECONDS": "0"}, "SIDECAR_WEB_SAMPLE_SECONDS='0' is invalid"),
        ({"SIDECAR_WEB_HOST": "  "}, "SIDECAR_WEB_HOST='  ' is invalid"),
        (
            {"SIDECAR_WEB_ALLOWED_HOSTS": "dash.example.com, bad_host!"},
            "SIDECAR_WEB_ALLOWED_HOSTS=.* is invalid: expected host names, IP addresses or CIDRs",
        ),
        ({"SIDECAR_WEB_ALLOWED_HOSTS": " , "}, "SIDECAR_WEB_ALLOWED_HOSTS=' , ' is invalid"),
    ],
)
def test_a_bad_web_setting_is_named_with_what_is_accepted(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Settings.from_env(env)


def test_a_short_token_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"SIDECAR_WEB_TOKEN": "short-secret"})
    assert "SIDECAR_WEB_TOKEN=(the value is secret) is invalid" in str(caught.value)
    assert "at least 16" in str(caught.value)
    assert "short-secret" not in str(caught.value)


def test_the_token_never_shows_in_the_settings_repr() -> None:
    settings = Settings.from_env({"SIDECAR_WEB_TOKEN": TOKEN})
    assert settings.web_token == TOKEN
    assert TOKEN not in repr(settings)


def test_the_defaults_are_loopback_read_only_and_payloads_hidden() -> None:
    settings = Settings.from_env({})
    assert settings.web_host == "127.0.0.1" and settings.web_token is None
    assert settings.web_show_payloads is False
    assert settings.web_allowed_hosts == ()
    named = Settings.from_env({"SIDECAR_WEB_ALLOWED_HOSTS": "Dash.Example.COM. 10.1.0.0/16"})
    assert named.web_allowed_hosts == ("dash.example.com", "10.1.0.0/16")


def test_payloads_without_a_token_are_refused_at_start() -> None:
    with pytest.raises(BindRefused, match="SIDECAR_WEB_SHOW_PAYLOADS=true needs SIDECAR_WEB_TOKEN"):
        check_payloads(True, None)
    check_payloads(True, TOKEN)
    check_payloads(False, None)


@pytest.mark.parametrize(
    ("bind", "allowed", "host", "answers"),
    [
        ("127.0.0.1", (), "127.0.0.1:8089", True),
        ("127.0.0.1", (), "localhost:8089", True),
        ("127.0.0.1", (), "[::1]:8089", True),
        ("127.0.0.1", (), "attacker.example:8089", False),
        ("0.0.0.0", (), "localhost", True),
        ("0.0.0.0", (), "attacker.example", False),
        ("0.0.0.0", (), "0.0.0.0:8089", False),
        ("0.0.0.0", (), "192.0.2.10:8089", False),
        ("192.0.2.10", (), "192.0.2.10:8089", True),
        ("192.0.2.10", (), "192.0.2.11:8089", False),
        ("::", (), "[2001:db8::1]:8089", False),
        ("0.0.0.0", ("dash.example.com",), "DASH.example.com.:443", True),
        ("0.0.0.0", ("dash.example.com",), "dash.example.com.evil.example", False),
        ("0.0.0.0", ("dash.example.com",), "evil.dash.example.com", False),
        ("192.0.2.10", ("dash.example.com",), "192.0.2.10", False),  # the list replaces it
        ("0.0.0.0", ("10.1.0.0/16",), "10.1.2.3:8089", True),
        ("0.0.0.0", ("10.1.0.0/16",), "10.2.0.1:8089", False),
        ("0.0.0.0", ("dash.example.com",), "", False),
        ("0.0.0.0", ("dash.example.com",), "[::1", False),
    ],
)
def test_the_host_rule(bind: str, allowed: tuple[str, ...], host: str, answers: bool) -> None:
    assert HostRule(bind, allowed).allows(host) is answers


def test_a_path_keeps_its_queue_and_the_default_queue_adds_nothing() -> None:
    assert in_queue("/list/failed", "requests") == "/list/failed"
    assert in_queue("/list/failed", "deliveries") == "/list/failed?queue=deliveries"
    assert (
        in_queue("/list/failed?order=newest", "pickups")
        == "/list/failed?order=newest&queue=pickups"
    )


def _stats(accepted: int, completed: int = 0, failed: int = 0) -> StatsResult:
    return StatsResult(store="local", queued=0, processing=0, accepted=accepted,
                       completed=completed, failed=failed, expired=0, items=0, bytes=0)  # fmt: skip


async def _unreachable() -> StatsResult:
    raise SidecarUnavailable("sidecar unavailable at /x: refused")


def test_the_sampler_turns_counters_into_rates_per_second() -> None:
    sampler = Sampler(_unreachable, 1.0, keep=10)
    for at, count in ((0.0, 0), (1.0, 10), (2.0, 40), (4.0, 60)):
        sampler.observe(_stats(count, completed=count // 2), at)
    [accepted, completed, failed, _] = sampler.series()
    assert accepted.rates == [10.0, 30.0, 10.0]
    assert completed.rates == [5.0, 15.0, 5.0]
    assert failed.rates == [0.0, 0.0, 0.0]
    assert accepted.last_minute == 15.0  # 60 over 4 s
    assert len(accepted.points.split()) == 3


def test_the_sampler_keeps_only_the_last_samples_and_the_last_minute() -> None:
    sampler = Sampler(_unreachable, 30.0, keep=4)
    for i in range(6):
        sampler.observe(_stats(i * 300), i * 30.0)  # 10/s throughout
    [accepted, *_] = sampler.series()
    assert accepted.rates == [10.0, 10.0, 10.0]
    assert accepted.last_minute == 10.0
    assert sampler.window_s == 90.0


def test_a_restarted_daemon_starts_the_rates_again() -> None:
    sampler = Sampler(_unreachable, 1.0, keep=10)
    sampler.observe(_stats(500), 0.0)
    sampler.observe(_stats(600), 1.0)
    sampler.observe(_stats(3), 2.0)  # counters began again: no negative rate, no spike
    [accepted, *_] = sampler.series()
    assert accepted.rates == []
    assert accepted.last_minute is None


async def test_a_failed_sample_is_noted_not_fatal() -> None:
    sampler = Sampler(_unreachable, 1.0, keep=10)
    await sampler.sample()
    assert sampler.error is not None and "unavailable" in sampler.error
    assert sampler.latest is None


def test_a_payload_that_is_not_messagepack_is_described_not_shown() -> None:
    assert "not readable MessagePack" in payload_text(b"\xc1\xc1")
    shown = payload_text(msgspec.msgpack.encode({"a": [1, "é"]}))
    assert shown == '{\n  "a": [\n    1,\n    "é"\n  ]\n}'
    long = payload_text(msgspec.msgpack.encode("x" * 100_000))
    assert long.endswith("more chars)") and len(long) < 70_000


def test_sizes_and_durations_read_as_people_write_them() -> None:
    assert size(512) == "512 B" and size(2048) == "2.0 KiB" and size(5 * 1024**3) == "5.0 GiB"
    assert duration(0.25) == "250ms" and duration(42) == "42s" and duration(3725) == "1h 2m"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
     ("localhost.evil.example", False), ("", False)],
)  # fmt: skip
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("target", "goes"),
    [("/list/failed?order=newest", "/list/failed?order=newest"), ("//evil.example", "/"),
     ("https://evil.example/", "/"), ("/\\evil.example", "/"), ("", "/"), (None, "/")],
)  # fmt: skip
def test_login_returns_only_to_the_dashboards_own_paths(target: str | None, goes: str) -> None:
    assert safe_next(target) == goes
