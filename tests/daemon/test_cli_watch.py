"""`sidecar stats --watch` through the real CLI against the real daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from sidecar.cli import WATCH_HEADER_EVERY
from sidecar.client import Client
from tests.support.daemon import running_daemon, short_tmpdir

HEADER = ["time", "mode", "queued", "proc", "enq/s", "done/s", "exp/s", "fail/s", "usage",
          "breaker"]  # fmt: skip


@contextmanager
def watch(socket_path: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """The watch running; killed (if still running) and its pipes closed at the end."""
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--socket", socket_path, "stats", "--watch", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def next_line(out: IO[str]) -> list[str]:
    line = out.readline()
    assert line, "the watch ended early"
    return line.split()


def test_watch_prints_a_line_per_interval_with_rates_and_stops_cleanly_on_ctrl_c() -> None:
    with running_daemon() as daemon, Client(daemon.socket_path) as c, watch(
        daemon.socket_path, "--interval", "0.1"
    ) as proc:
        assert proc.stdout is not None
        assert next_line(proc.stdout) == HEADER
        first = dict(zip(HEADER, next_line(proc.stdout), strict=True))
        assert first["mode"] == "local_only" and first["queued"] == "0"
        assert first["enq/s"] == "-"  # no earlier reply to take a rate from
        for n in range(5):
            c.enqueue({"n": n})
        # A line taken after the enqueues shows them queued, at a rate above zero.
        rows = []
        for _ in range(WATCH_HEADER_EVERY + 2):
            cells = next_line(proc.stdout)
            rows.append(cells)
            if cells != HEADER and cells[2] == "5":
                break
        row = dict(zip(HEADER, rows[-1], strict=True))
        assert row["queued"] == "5" and row["breaker"] == "closed"
        assert any(float(dict(zip(HEADER, r, strict=True))["enq/s"]) > 0
                   for r in rows if r != HEADER)  # fmt: skip
        assert row["usage"].endswith("%")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()


def test_watch_repeats_the_header_like_vmstat() -> None:
    with running_daemon() as daemon, watch(daemon.socket_path, "--interval", "0.01") as proc:
        assert proc.stdout is not None
        lines = [next_line(proc.stdout) for _ in range(2 * (WATCH_HEADER_EVERY + 1))]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    headers = [i for i, cells in enumerate(lines) if cells == HEADER]
    assert headers == [0, WATCH_HEADER_EVERY + 1]


def test_watch_of_an_unreachable_daemon_exits_2_with_a_clear_message() -> None:
    with short_tmpdir() as tmp, watch(str(tmp / "none.sock")) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.startswith("unreachable: ")
    assert out == ""


def test_watch_refuses_an_interval_that_is_not_positive() -> None:
    with running_daemon() as daemon, watch(daemon.socket_path, "--interval", "0") as proc:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "--interval must be a number of seconds > 0" in err
