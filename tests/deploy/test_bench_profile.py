"""The profile command still runs: `python -m bench.profile` on the local store prints its tables.

Skipped where py-spy is missing or may not attach to a process (ptrace refused).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile import pyspy_problem

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def test_profile_prints_a_table_for_the_local_store() -> None:
    problem = pyspy_problem()
    if problem is not None:
        pytest.skip(problem)
    argv = [sys.executable, "-m", "bench.profile", "--store", "local", "--op", "enqueue"]
    argv += ["--in-flight", "64", "--seconds", "2", "--window", "2", "--top", "5"]
    done = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "### local enqueue x64 (8 conn x 8)" in out
    assert "| bucket" in out and "| top by" in out
    assert "store logic" in out  # the local store's own code was sampled
