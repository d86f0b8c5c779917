"""The Grafana dashboard and the Prometheus alert rules: valid, and naming only exported metrics."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.support.metrics_scrape import exported_names, promtool, scrape
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
MONITORING = ROOT / "docs/monitoring.md"
DATASOURCE = "${DS_PROMETHEUS}"
NAME = re.compile(r"\bsidecar_[a-z0-9_]+\b")


def promtool_run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def docs_promql() -> list[str]:
    """The PromQL lines of docs/monitoring.md (its ```promql blocks)."""
    blocks = re.findall(r"```promql\n(.*?)```", MONITORING.read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def exported() -> Iterator[set[str]]:
    """Every sample name a Redis-mode daemon exports (it has both stores' families)."""
    with RedisServer() as server, short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        env = daemon_env(sock, REDIS_URL=server.url, SIDECAR_METRICS_ADDR=":0")
        daemon = Daemon(sock, env).start()
        try:
            yield exported_names(scrape(daemon))
        finally:
            daemon.stop()


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool_run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = promtool_run("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_the_issue_asks_for_exist() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == {"SidecarBreakerOpen", "SidecarDegraded", "SidecarRedisDataLost",
                     "SidecarExpiriesRising", "SidecarOldestQueuedTooOld",
                     "SidecarDeadLettersGrowing", "SidecarDeadLettersDropped"}  # fmt: skip


def test_dashboard_is_importable_with_the_datasource_as_an_input() -> None:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    [source] = dash["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    assert f"${{{source['name']}}}" == DATASOURCE
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == DATASOURCE for t in panel["targets"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Mode", "Local breaker open", "Queue depth by status", "Oldest queued age",
                   "Request rate by op", "p99 latency by op", "Errors by code",
                   "Expiries, retries, failures", "Degraded seconds per hour",
                   "Hand-over backlog", "Journal fsync p99", "Dead letters"):  # fmt: skip
        assert needed in titles


def test_every_dashboard_and_readme_expression_parses(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (Grafana's variables filled in)."""
    exprs = dashboard_exprs() + docs_promql()
    assert len(docs_promql()) >= 3
    filled = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in exprs]
    rules = {"groups": [{"name": "exprs", "rules": [
        {"record": f"check:expr_{n}", "expr": e} for n, e in enumerate(filled)]}]}  # fmt: skip
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool_run("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_dashboard_alerts_and_readme_name_only_exported_metrics(exported: set[str]) -> None:
    assert "sidecar_queue_requests" in exported and "sidecar_failovers_total" in exported
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs()),
                          ("docs/monitoring.md", docs_promql())):  # fmt: skip
        named = {n for e in exprs for n in NAME.findall(e)}
        assert named, source
        assert named <= exported, f"{source} names metrics the daemon does not export: " + str(
            sorted(named - exported)
        )
