"""The metrics-cost bench still runs: `bench.run --quick --mode metrics` prints its table.

It asserts nothing about speed; the ratio of a few-second run on a shared machine means little.
"""

from __future__ import annotations

import pytest

from bench.run import parse_args
from tests.deploy.test_bench_smoke import _bench, _number, _section, _sections

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

TIMEOUT_S = 150


def test_metrics_section_runs_only_when_named() -> None:
    assert "metrics" not in parse_args([]).sections
    assert parse_args(["--mode", "metrics"]).sections == ["metrics"]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_quick_metrics_bench_prints_both_modes() -> None:
    proc = _bench("bench.run", "--quick", "--mode", "metrics", timeout_s=TIMEOUT_S)
    rows = _section(_sections(proc.stdout), "metrics:")
    assert [r["mode"] for r in rows] == ["local", "redis", "local, in-process"]
    assert [r["workload"] for r in rows] == ["enqueue x64 (1 AsyncClient)"] * 2 + [
        "Ops.handle(enqueue), best of rounds"
    ]
    for row in rows:
        assert _number(row["metrics on ops/s"]) > 0 and _number(row["metrics off ops/s"]) > 0
        assert _number(row["ratio on/off"]) > 0, row
        assert row["target"] == ">= 0.95" and row["met"] in ("yes", "NO"), row
    assert all(_number(r["control off/off"]) > 0 for r in rows[:2]), rows
