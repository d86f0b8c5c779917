"""The benchmark still runs: `python -m bench.run --quick` exits 0 and prints every row.

It asserts nothing about speed; the numbers of a one-second run on a shared machine mean little.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import modes, parse_args

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_S = 120


def _table(stdout: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in stdout, as dicts keyed by the header's cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 2, f"no table in the output:\n{stdout}"
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(head, row, strict=True)) for row in rows]


@pytest.mark.slow
@pytest.mark.timeout(BENCH_TIMEOUT_S + 30)
def test_quick_bench_prints_a_ratio_for_every_workload() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = _table(proc.stdout)
    expected = [
        (mode.name, mode.client, workload.label)
        for mode in modes(parse_args(["--quick"]))
        for workload in mode.workloads
    ]
    assert [(r["mode"], r["client"], r["workload"]) for r in rows] == expected
    for row in rows:
        assert float(row["ratio"]) > 0, row
        assert float(row["sidecar ops/s"].replace(",", "")) > 0, row
        assert float(row["ceiling ops/s"].replace(",", "")) > 0, row
