"""The one settings table: Settings, docs/configuration.md's table and `serve --help` agree.

Each setting is declared once (sidecar/config/settings.py); these tests fail when an output derived
from it drifts, when a default breaks its own validation, or when a component's own default
differs from the setting that configures it.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from sidecar.client.connection import CONNECT_TIMEOUT_ENV, TIMEOUT_ENV
from sidecar.config import SPECS, ConfigError, Settings
from sidecar.config.docs import (
    BEGIN,
    END,
    REGENERATE,
    TABLE_DOC,
    doc_table,
    help_text,
    markdown_table,
    shown_default,
)
from sidecar.llm.outbox import DeliveryOptions
from sidecar.llm.pacing import PacingOptions
from sidecar.llm.worker import WorkerOptions, delivery_options, worker_options
from sidecar.queue.build import build_queue
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient import ResilientQueue
from tests.support.daemon import serve_expecting_refusal

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_table_is_the_generated_one() -> None:
    doc = (ROOT / TABLE_DOC).read_text()
    assert doc_table(doc) == markdown_table(), (
        f"{TABLE_DOC}'s settings table differs from sidecar/config/settings.py: run `{REGENERATE}`"
    )


def test_the_readme_has_no_copy_of_the_table() -> None:
    """One generated copy only: the README links to it."""
    readme = (ROOT / "README.md").read_text()
    assert BEGIN not in readme
    assert TABLE_DOC in readme


def test_regenerating_writes_the_docs_page_by_default(tmp_path: Path) -> None:
    page = tmp_path / TABLE_DOC
    page.parent.mkdir()
    page.write_text(f"# Configuration\n\n{BEGIN}\n| stale |\n{END}\n\nAfter.\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.config.docs", "--write"],
        capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert page.read_text() == f"# Configuration\n\n{BEGIN}\n{markdown_table()}{END}\n\nAfter.\n"


def test_regenerating_a_file_without_the_markers_says_what_is_missing(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.config.docs", "--write", str(readme)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{readme}: no settings table to replace: mark its place with the lines", BEGIN, END,
    ]  # fmt: skip
    assert readme.read_text() == "# no table here\n"


def test_every_field_is_a_setting_with_its_own_variable_and_a_one_line_doc() -> None:
    assert list(SPECS) == [f.name for f in fields(Settings)]
    names = [spec.env for spec in SPECS.values()]
    assert len(names) == len(set(names)), "two settings read one variable"
    for name, spec in SPECS.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", spec.env), name
        assert spec.doc and "\n" not in spec.doc and "|" not in spec.doc, name
        assert spec.accepted and "|" not in spec.accepted, name


def test_markdown_defaults_read_as_an_operator_writes_them() -> None:
    assert shown_default("queue_max_size") == "`1000`"
    assert shown_default("queue_max_memory_mb") == "`100`"
    assert shown_default("redis_probe_initial_s") == "`0.1`"
    assert shown_default("redis_cluster") == "`false`"
    assert shown_default("redis_url") == "unset: local store only (journaled)"
    assert shown_default("socket_group") == "unset"


# The settings whose default is a value (the others are unset, or computed at start).
VALUED = [f.name for f in fields(Settings) if getattr(Settings, f.name) not in (None, "", ())]


@pytest.mark.parametrize("name", VALUED)
def test_every_default_passes_its_own_validation(name: str) -> None:
    default = getattr(Settings, name)
    raw = str(default).lower() if isinstance(default, bool) else str(default)
    assert SPECS[name].parse(raw) == default
    assert getattr(Settings.from_env({SPECS[name].env: raw}), name) == default


def test_serve_help_lists_every_setting_with_its_default_and_doc() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--help"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert help_text() in proc.stdout
    flat = " ".join(proc.stdout.split())
    for name, spec in SPECS.items():
        default = shown_default(name).replace("`", "")
        assert f"{spec.env} (default: {default})" in flat, spec.env
        doc = " ".join(spec.doc.replace("`", "").replace("**", "").split())
        assert doc in flat, spec.env


# -- the settings that were module constants, and two whose parser was looser than its text ---

NEW_BAD_VALUES = {
    "REDIS_PROBE_INITIAL_SECONDS": ("0", "a number of seconds > 0"),
    "REDIS_PROBE_MAX_SECONDS": ("-1", "a number of seconds > 0, at least REDIS_PROBE_INITIAL"),
    "REDIS_PROBE_SUCCESSES": ("0", "a whole number from 1 to 100"),
    "REDIS_FLAP_WINDOW_SECONDS": ("soon", "a number of seconds >= 0"),
    "REDIS_WATCH_INTERVAL_SECONDS": ("0", "a number of seconds > 0"),
    "REDIS_HANDOVER_BATCH": ("100001", "a whole number from 1 to 100000"),
    "REDIS_SWEEP_INTERVAL_SECONDS": ("inf", "a number of seconds > 0"),
    "REDIS_SWEEP_BATCH": ("0", "a whole number from 1 to 100000"),
    "REDIS_POLL_INTERVAL_SECONDS": ("0", "a number of seconds > 0"),
    "REDIS_LOG_REPEAT_SECONDS": ("-5", "a number of seconds >= 0"),
    "SIDECAR_JOURNAL_COMPACT_MB": ("0", "a number of megabytes > 0"),
    "SIDECAR_JOURNAL_RECOVER_INTERVAL_SECONDS": ("nan", "a number of seconds >= 0"),
    "LLM_QUEUE_MAX_ATTEMPTS": ("1001", "a whole number >= 1 and <= 1000"),
    "LLM_BASE_URL": ("api.openai.com", "an http:// or https:// URL"),
    "LLM_RETRY_BACKOFF_BASE_SECONDS": ("0", "a number of seconds > 0"),
    "LLM_RETRY_BACKOFF_MAX_SECONDS": ("-1", "a number of seconds > 0, at least LLM_RETRY_BACKOFF"),
    "LLM_CALLBACK_TIMEOUT_SECONDS": ("never", "a number of seconds > 0"),
}


@pytest.mark.parametrize("env", sorted(NEW_BAD_VALUES))
def test_a_bad_new_setting_names_its_variable(env: str) -> None:
    raw, accepted = NEW_BAD_VALUES[env]
    with pytest.raises(ConfigError) as info:
        Settings.from_env({env: raw})
    assert str(info.value).startswith(f"{env}={raw!r} is invalid: expected {accepted}")


def test_sidecar_serve_refuses_each_bad_new_setting_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "SIDECAR_"))}
    env["SIDECAR_SOCKET"] = "/tmp/never-bound-settings.sock"
    env.update({name: raw for name, (raw, _) in NEW_BAD_VALUES.items()})
    proc = serve_expecting_refusal(env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("sidecar: configuration error: ")
    lines[0] = lines[0].removeprefix("sidecar: configuration error: ")
    assert len(lines) == len(NEW_BAD_VALUES), proc.stderr
    for line, (name, (raw, accepted)) in zip(lines, _in_table_order(), strict=True):
        assert line.startswith(f"{name}={raw!r} is invalid: expected {accepted}"), line
    assert not os.path.exists(env["SIDECAR_SOCKET"])


def _in_table_order() -> list[tuple[str, tuple[str, str]]]:
    order = [spec.env for spec in SPECS.values()]
    return sorted(NEW_BAD_VALUES.items(), key=lambda item: order.index(item[0]))


def test_the_probe_backoff_must_not_start_above_its_maximum() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_PROBE_INITIAL_SECONDS": "5", "REDIS_PROBE_MAX_SECONDS": "2"})
    assert str(info.value) == (
        "REDIS_PROBE_INITIAL_SECONDS=5.0 is invalid: expected at most REDIS_PROBE_MAX_SECONDS (2.0)"
    )
    ok = Settings.from_env({"REDIS_PROBE_INITIAL_SECONDS": "2", "REDIS_PROBE_MAX_SECONDS": "2"})
    assert ok.redis_probe_initial_s == ok.redis_probe_max_s == 2.0


def test_the_worker_backoff_must_not_start_above_its_maximum() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LLM_RETRY_BACKOFF_BASE_SECONDS": "90"})
    assert str(info.value) == (
        "LLM_RETRY_BACKOFF_BASE_SECONDS=90.0 is invalid: expected at most "
        "LLM_RETRY_BACKOFF_MAX_SECONDS (60.0)"
    )


# Each component's own default (tests build components directly) is the setting's default.
COMPONENT_DEFAULTS: list[tuple[Any, str, str]] = [
    (ResilientQueue, "probe_initial_s", "redis_probe_initial_s"),
    (ResilientQueue, "probe_max_s", "redis_probe_max_s"),
    (ResilientQueue, "probe_successes", "redis_probe_successes"),
    (ResilientQueue, "flap_window_s", "redis_flap_window_s"),
    (ResilientQueue, "watch_interval_s", "redis_watch_interval_s"),
    (ResilientQueue, "migrate_batch", "redis_handover_batch"),
    (ResilientQueue, "log_repeat_s", "redis_log_repeat_s"),
    (RedisQueue, "sweep_interval_s", "redis_sweep_interval_s"),
    (RedisQueue, "sweep_limit", "redis_sweep_batch"),
    (RedisQueue, "poll_interval_s", "redis_poll_interval_s"),
    (RedisQueue, "min_replicas_ack", "redis_min_replicas_ack"),
    (RedisQueue, "replicas_ack_timeout_ms", "redis_replicas_ack_timeout_ms"),
    (LocalQueue, "recover_every_s", "journal_recover_interval_s"),
    (LocalQueue, "retry_after_s", "queue_retry_after_s"),
    (LocalQueue, "max_retained", "queue_max_retained"),
    (Journal, "compact_max_bytes", "journal_compact_bytes"),
    (Journal, "max_bytes", "journal_max_bytes"),
    (WorkerOptions, "backoff_base_s", "llm_retry_backoff_base_s"),
    (WorkerOptions, "backoff_max_s", "llm_retry_backoff_max_s"),
    (WorkerOptions, "lease_s", "queue_lease_s"),
    (WorkerOptions, "concurrency", "llm_worker_concurrency"),
    (WorkerOptions, "wait_s", "llm_worker_poll_s"),
    (DeliveryOptions, "concurrency", "llm_delivery_concurrency"),
    (DeliveryOptions, "lease_s", "queue_lease_s"),
    (DeliveryOptions, "wait_s", "llm_worker_poll_s"),
    (DeliveryOptions, "timeout_s", "llm_callback_timeout_s"),
    (DeliveryOptions, "retry_max_s", "llm_webhook_retry_max_s"),
    (DeliveryOptions, "allowed_hosts", "llm_callback_allowed_hosts"),
    (PacingOptions, "rpm", "llm_provider_rpm"),
    (PacingOptions, "tpm", "llm_provider_tpm"),
    (PacingOptions, "default_max_tokens", "llm_default_max_tokens"),
    (PacingOptions, "drain_share", "llm_drain_share"),
    (PacingOptions, "ramp_s", "llm_ramp_s"),
    (PacingOptions, "breaker_failures", "llm_breaker_failures"),
    (PacingOptions, "breaker_reset_s", "llm_breaker_reset_s"),
]


@pytest.mark.parametrize(("component", "param", "name"), COMPONENT_DEFAULTS)
def test_a_component_default_is_its_setting_default(component: Any, param: str, name: str) -> None:
    default = inspect.signature(component).parameters[param].default
    assert default == getattr(Settings(), name)


async def test_app_wires_every_new_setting_into_its_component(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "unix:///nonexistent/redis.sock",
            "SIDECAR_STATE_DIR": str(tmp_path),
            "SIDECAR_JOURNAL_MAX_MB": "4096",
            "REDIS_PROBE_INITIAL_SECONDS": "0.3",
            "REDIS_PROBE_MAX_SECONDS": "7",
            "REDIS_PROBE_SUCCESSES": "4",
            "REDIS_FLAP_WINDOW_SECONDS": "90",
            "REDIS_WATCH_INTERVAL_SECONDS": "2.5",
            "REDIS_HANDOVER_BATCH": "17",
            "REDIS_SWEEP_INTERVAL_SECONDS": "3",
            "REDIS_SWEEP_BATCH": "50",
            "REDIS_POLL_INTERVAL_SECONDS": "0.7",
            "REDIS_LOG_REPEAT_SECONDS": "5",
            "SIDECAR_JOURNAL_COMPACT_MB": "8",
            "SIDECAR_JOURNAL_RECOVER_INTERVAL_SECONDS": "9",
        }
    )
    queue, local = build_queue(settings)
    assert isinstance(queue, ResilientQueue)
    failover = queue.failover
    try:
        got = (
            failover.probe_initial_s, failover.probe_max_s, failover.probe_successes,
            failover.flap_window_s, failover.watch_interval_s, queue.handover.migrate_batch,
            failover._repeats.interval_s,
        )  # fmt: skip
        assert got == (0.3, 7.0, 4, 90.0, 2.5, 17, 5.0)
        redis = queue.redis
        assert (redis._sweep_interval_s, redis._sweep_limit, redis._pending.poll_interval_s) == (
            3.0, 50, 0.7,
        )  # fmt: skip
        assert local.recover_every_s == 9.0
        assert local._journal is not None
        assert local._journal.compact_bytes == 8 * 1024 * 1024
    finally:
        await queue.redis.close()


def test_sidecar_work_takes_its_options_from_the_settings() -> None:
    settings = Settings.from_env(
        {
            "QUEUE_LEASE_SECONDS": "45",
            "LLM_RETRY_BACKOFF_BASE_SECONDS": "0.5",
            "LLM_RETRY_BACKOFF_MAX_SECONDS": "8",
            "LLM_CALLBACK_TIMEOUT_SECONDS": "1.5",
            "LLM_WORKER_CONCURRENCY": "7",
            "LLM_WORKER_POLL_SECONDS": "2",
            "LLM_RESULT_TTL_HOURS": "2",
            "LLM_DELIVERY_CONCURRENCY": "3",
            "LLM_WEBHOOK_RETRY_MAX_SECONDS": "90",
            "LLM_CALLBACK_ALLOWED_HOSTS": "10.0.0.0/8, hooks.internal",
        }
    )
    expected = WorkerOptions(
        concurrency=7, lease_s=45.0, wait_s=2.0, backoff_base_s=0.5, backoff_max_s=8.0,
        result_ttl_s=7200.0,
    )  # fmt: skip
    assert worker_options(settings) == expected
    assert worker_options(settings, 3) == dataclasses.replace(expected, concurrency=3)
    assert delivery_options(settings) == DeliveryOptions(
        concurrency=3, lease_s=45.0, wait_s=2.0, timeout_s=1.5, retry_max_s=90.0,
        allowed_hosts=("10.0.0.0/8", "hooks.internal"),
    )  # fmt: skip


def test_protocol_md_limits_agree_with_the_settings_table() -> None:
    """Section 10 names real variables, with their defaults and maxima."""
    text = (ROOT / "protocol.md").read_text()
    section = text[text.index("## 10. Limits and defaults") : text.index("## 11.")]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]  # no header
    by_env = {spec.env: name for name, spec in SPECS.items()}
    checked = 0
    for row in rows:
        _, default_cell, env_cell, _ = row.strip("| ").split(" | ")
        envs = re.findall(r"`([A-Z][A-Z0-9_]+)`", env_cell)
        assert envs and all(env in by_env for env in envs), row
        numbers = [float(n.replace(",", "")) for n in re.findall(r"\d[\d,.]*", default_cell)]
        values = [getattr(Settings(), by_env[env]) for env in envs]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            continue  # a path, a group or a list: no number to compare
        assert numbers[: len(values)] == values, row
        for bound in re.findall(r"at (?:most|least) ([\d,]+)", default_cell):
            assert bound.replace(",", "") in SPECS[by_env[envs[0]]].accepted, row
        checked += 1
    assert checked >= 18


# Variables the docs may name that are not the daemon's settings: the clients' own, and the
# API key the LLM side reads from the environment only (never kept in Settings).
NOT_SETTINGS = {CONNECT_TIMEOUT_ENV, TIMEOUT_ENV, "LLM_API_KEY"}


PAGES = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md"))
DOCS = ["README.md", "protocol.md", "systemd/README.md", *PAGES]


@pytest.mark.parametrize("doc", DOCS)
def test_every_variable_the_docs_name_exists(doc: str) -> None:
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"\b(?:SIDECAR|QUEUE|REDIS|LLM)_[A-Z0-9_]*[A-Z0-9]\b", text))
    known = {spec.env for spec in SPECS.values()} | NOT_SETTINGS
    assert named - known == set(), f"{doc} names variables no setting reads"
