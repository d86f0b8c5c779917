"""Settings from the environment: defaults, parsing, and one clear line per bad value."""

from __future__ import annotations

import os

import pytest

from sidecar.config import (
    ConfigError,
    Settings,
    default_socket_path,
    default_state_dir,
    parse_sentinel_url,
)
from tests.support.daemon import serve_expecting_refusal


def test_defaults_match_the_documented_ones() -> None:
    s = Settings.from_env({})
    assert s.queue_max_size == 1000
    assert s.queue_max_memory_mb == 100
    assert (s.queue_high_watermark, s.queue_low_watermark) == (0.8, 0.6)
    assert s.queue_request_ttl_hours == 4
    assert s.record_llm_responses is False
    assert s.redis_url is None
    assert s.socket_path == default_socket_path({})


def test_default_socket_needs_no_root() -> None:
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}) == (
        "/run/user/1000/sidecar/sidecar.sock"
    )
    assert default_socket_path({}) == f"/tmp/sidecar-{os.getuid()}/sidecar.sock"


def test_the_journal_defaults_to_the_xdg_state_folder_and_fsync_always() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/home/u/.st"}) == "/home/u/.st/sidecar"
    assert default_state_dir({"HOME": "/home/u"}) == "/home/u/.local/state/sidecar"
    s = Settings.from_env({"HOME": "/home/u"})
    assert s.state_dir == "/home/u/.local/state/sidecar"
    assert (s.journal_fsync, s.journal_max_bytes) == ("always", 1024 * 1024 * 1024)
    unit = Settings.from_env({"SIDECAR_STATE_DIR": "/var/lib/sidecar", "HOME": "/root"})
    assert unit.state_dir == "/var/lib/sidecar"
    assert Settings.from_env({"SIDECAR_JOURNAL_FSYNC": "OFF"}).journal_fsync == "off"


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "QUEUE_MAX_SIZE": "50",
            "QUEUE_MAX_MEMORY_MB": "1.5",
            "QUEUE_HIGH_WATERMARK": "0.9",
            "QUEUE_LOW_WATERMARK": "0.5",
            "RECORD_LLM_RESPONSES": "yes",
            "ENVIRONMENT": "Production",
            "REDIS_URL": "redis://:secret@localhost:6379/0",
            "SIDECAR_SOCKET": "/tmp/x.sock",
        }
    )
    assert s.queue_max_size == 50
    assert s.queue_max_memory_bytes == int(1.5 * 1024 * 1024)
    assert s.record_llm_responses is True
    assert s.environment == "production"
    assert s.socket_path == "/tmp/x.sock"
    assert s.redacted_redis_url() == "redis://:***@localhost:6379/0"


def test_redis_passwords_are_redacted_in_every_url_form() -> None:
    for url, shown in [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("unix:///run/r.sock?password=pw&db=1", "unix:///run/r.sock?password=***&db=1"),
        ("rediss://host:6380", "rediss://host:6380"),
    ]:
        assert Settings(redis_url=url).redacted_redis_url() == shown


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUEUE_MAX_SIZE": "abc"}, "QUEUE_MAX_SIZE='abc' is invalid: expected a whole number"),
        ({"QUEUE_MAX_SIZE": "-5"}, "QUEUE_MAX_SIZE='-5' is invalid: expected a whole number >= 1"),
        ({"QUEUE_MAX_MEMORY_MB": "0"}, "QUEUE_MAX_MEMORY_MB='0' is invalid"),
        ({"QUEUE_MAX_MEMORY_MB": "nan"}, "QUEUE_MAX_MEMORY_MB='nan' is invalid"),
        ({"QUEUE_HIGH_WATERMARK": "1.5"}, "QUEUE_HIGH_WATERMARK='1.5' is invalid"),
        (
            {"QUEUE_HIGH_WATERMARK": "0.5", "QUEUE_LOW_WATERMARK": "0.7"},
            "QUEUE_LOW_WATERMARK=0.7 is invalid: expected a number below QUEUE_HIGH_WATERMARK",
        ),
        (
            {"QUEUE_HIGH_WATERMARK": "0.6", "QUEUE_LOW_WATERMARK": "0.6"},
            "QUEUE_LOW_WATERMARK=0.6 is invalid",
        ),
        ({"QUEUE_REQUEST_TTL_HOURS": "-1"}, "QUEUE_REQUEST_TTL_HOURS='-1' is invalid"),
        ({"RECORD_LLM_RESPONSES": "maybe"}, "expected true or false"),
        ({"ENVIRONMENT": "staging"}, "ENVIRONMENT='staging' is invalid"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' is invalid"),
        ({"REDIS_KEY_PREFIX": "a{b}"}, "REDIS_KEY_PREFIX='a{b}' is invalid"),
        ({"SIDECAR_MAX_FRAME_BYTES": "10"}, "SIDECAR_MAX_FRAME_BYTES='10' is invalid"),
        (
            {"SIDECAR_JOURNAL_FSYNC": "sometimes"},
            "SIDECAR_JOURNAL_FSYNC='sometimes' is invalid: expected always or off",
        ),
        ({"SIDECAR_JOURNAL_MAX_MB": "0.5"}, "SIDECAR_JOURNAL_MAX_MB='0.5' is invalid"),
        ({"SIDECAR_STATE_DIR": "  "}, "SIDECAR_STATE_DIR='  ' is invalid: expected a folder"),
        ({"REDIS_SENTINELS": "h1:1,h2"}, "REDIS_SENTINELS='h1:1,h2' is invalid: expected host"),
        ({"REDIS_SENTINELS": "h1:99999"}, "REDIS_SENTINELS='h1:99999' is invalid"),
        ({"REDIS_SENTINELS": "h1:26379"}, "set both or neither"),
        ({"REDIS_SENTINEL_MASTER": "q"}, "set both or neither"),
        (
            {"REDIS_SENTINELS": "h:1", "REDIS_SENTINEL_MASTER": "q", "REDIS_URL": "redis://h"},
            "REDIS_URL is invalid with REDIS_SENTINELS",
        ),
        ({"REDIS_URL": "redis+sentinel://h:1/"}, "REDIS_URL='redis+sentinel://h:1/' is invalid"),
        ({"REDIS_URL": "redis+sentinel://h/q"}, "REDIS_URL='redis+sentinel://h/q' is invalid"),
        ({"REDIS_URL": "redis+sentinel://h:1/q/x"}, "is invalid"),
        ({"REDIS_CLUSTER": "true"}, "REDIS_CLUSTER is invalid without a redis:// REDIS_URL"),
        (
            {"REDIS_CLUSTER": "true", "REDIS_URL": "unix:///r.sock"},
            "REDIS_CLUSTER is invalid without a redis:// REDIS_URL",
        ),
        (
            {"REDIS_CLUSTER": "1", "REDIS_URL": "redis+sentinel://h:1/q"},
            "REDIS_CLUSTER is invalid with Sentinel",
        ),
        ({"REDIS_MIN_REPLICAS_ACK": "-1"}, "REDIS_MIN_REPLICAS_ACK='-1' is invalid"),
        ({"REDIS_REPLICAS_ACK_TIMEOUT_MS": "0"}, "REDIS_REPLICAS_ACK_TIMEOUT_MS='0' is invalid"),
        ({"QUEUE_DEAD_RETENTION_HOURS": "-1"}, "QUEUE_DEAD_RETENTION_HOURS='-1' is invalid"),
        ({"QUEUE_DEAD_RETENTION_HOURS": "9999"}, "QUEUE_DEAD_RETENTION_HOURS='9999' is invalid"),
        ({"QUEUE_MAX_DEAD": "1.5"}, "QUEUE_MAX_DEAD='1.5' is invalid"),
        ({"SIDECAR_OPS_PAYLOADS": "maybe"}, "expected true or false"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert message in str(info.value)


def test_sentinel_and_cluster_layouts_are_parsed() -> None:
    env = {"REDIS_SENTINELS": "10.0.0.1:26379, s2:26380", "REDIS_SENTINEL_MASTER": "q"}
    s = Settings.from_env(env)
    # One form for the rest of the daemon: the sentinels become a redis+sentinel:// URL.
    assert s.redis_url == "redis+sentinel://10.0.0.1:26379,s2:26380/q"
    assert parse_sentinel_url(s.redis_url) == ([("10.0.0.1", 26379), ("s2", 26380)], "q", 0)
    assert parse_sentinel_url("redis+sentinel://a:1/m/3") == ([("a", 1)], "m", 3)
    assert s.redacted_redis_url() == s.redis_url
    c = Settings.from_env({"REDIS_URL": "redis://n1:7000", "REDIS_CLUSTER": "yes"})
    assert c.redis_cluster is True
    w = Settings.from_env({"REDIS_MIN_REPLICAS_ACK": "1", "REDIS_REPLICAS_ACK_TIMEOUT_MS": "250"})
    assert (w.redis_min_replicas_ack, w.redis_replicas_ack_timeout_ms) == (1, 250)
    assert (Settings().redis_min_replicas_ack, Settings().redis_cluster) == (0, False)


def test_every_bad_variable_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"QUEUE_MAX_SIZE": "x", "QUEUE_LEASE_SECONDS": "-1"})
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("QUEUE_MAX_SIZE=")
    assert lines[1].startswith("QUEUE_LEASE_SECONDS=")


def test_daemon_refuses_to_start_with_a_bad_value() -> None:
    env = dict(os.environ, QUEUE_LOW_WATERMARK="0.9", SIDECAR_SOCKET="/tmp/never-bound.sock")
    proc = serve_expecting_refusal(env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sidecar: configuration error: QUEUE_LOW_WATERMARK=0.9 is invalid: expected a number "
        "below QUEUE_HIGH_WATERMARK (0.8)"
    ]
    assert not os.path.exists("/tmp/never-bound.sock")


def test_daemon_refuses_a_sentinel_list_without_the_master_name() -> None:
    env = dict(os.environ, REDIS_SENTINELS="127.0.0.1:1", SIDECAR_SOCKET="/tmp/never-bound2.sock")
    env.pop("REDIS_SENTINEL_MASTER", None)
    env.pop("REDIS_URL", None)
    proc = serve_expecting_refusal(env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sidecar: configuration error: REDIS_SENTINELS and REDIS_SENTINEL_MASTER are invalid: "
        "set both or neither"
    ]
    assert not os.path.exists("/tmp/never-bound2.sock")


def test_an_invalid_secret_is_named_but_never_shown() -> None:
    leaked = "whsec_not-base64-at-all!"
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"LLM_WEBHOOK_SECRET": leaked})
    assert "LLM_WEBHOOK_SECRET=(the value is secret) is invalid" in str(err.value)
    assert leaked not in str(err.value)


def test_an_invalid_redis_url_is_shown_without_its_password() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"REDIS_URL": "http://app:hunter2@redis.internal:6379/0"})
    assert "REDIS_URL='http://app:***@redis.internal:6379/0' is invalid" in str(err.value)
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"REDIS_URL": "http://app:hunter2@redis:port/0"})  # no port to parse
    assert "hunter2" not in str(err.value) and "REDIS_URL=(the value is hidden" in str(err.value)
