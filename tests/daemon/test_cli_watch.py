"""`sidecar stats --watch` through the real CLI against the real daemon."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sidecar.cli import WATCH_HEADER_EVERY
from sidecar.client import Client
from tests.support.daemon import running_daemon, short_tmpdir
from tests.support.procs import default_signals

HEADER = ["time", "mode", "queued", "proc", "enq/s", "done/s", "exp/s", "fail/s", "usage",
          "breaker"]  # fmt: skip
# The longest wait for the watch's next line, or for it to exit once signalled.
WAIT_S = 15.0


@contextmanager
def watch(
    socket_path: str, *extra: str, preexec: Callable[[], None] = default_signals
) -> Iterator[subprocess.Popen[str]]:
    """The watch running; killed (if still running) and its pipes closed at the end.

    It starts with SIGINT and SIGTERM at their defaults (`preexec`), not with what the suite
    inherited: the suite run as a background job of a script has SIGINT ignored, and the
    child would keep that across exec.
    """
    with subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--socket", socket_path, "stats", "--watch", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,  # noqa: PLW1509 (signal dispositions only: tests/support/procs.py)
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class Lines:
    """The watch's stdout a line at a time, every wait bounded: a thread feeds a queue."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, out: Iterator[str]) -> None:
        for line in out:
            self._queue.put(line)
        self._queue.put("")  # the end of the output: the watch exited

    def next(self) -> list[str]:
        try:
            line = self._queue.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no line from the watch within {WAIT_S} s") from None
        assert line, "the watch ended early"
        return line.split()

    def until_queued(self, count: int) -> list[list[str]]:
        """The lines up to the first row showing `count` queued (one header's worth at most)."""
        rows = []
        for _ in range(WATCH_HEADER_EVERY + 2):
            rows.append(self.next())
            if rows[-1] != HEADER and rows[-1][2] == str(count):
                return rows
        raise AssertionError(f"no row with {count} queued: {rows}")


def ignoring_sigint() -> None:
    """preexec_fn: start the way a background job of a non-interactive shell does."""
    default_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ignored(pid: int) -> set[signal.Signals]:
    """Which of SIGINT and SIGTERM a process ignores (SigIgn in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    return {sig for sig in (signal.SIGINT, signal.SIGTERM) if mask >> (sig - 1) & 1}


def assert_stopped_cleanly(proc: subprocess.Popen[str]) -> None:
    """The signalled watch exits 0 within the bound, without a traceback."""
    assert proc.wait(timeout=WAIT_S) == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_watch_prints_a_line_per_interval_with_rates_and_stops_cleanly_on_ctrl_c() -> None:
    with running_daemon() as daemon, Client(daemon.socket_path) as c, watch(
        daemon.socket_path, "--interval", "0.1"
    ) as proc:
        lines = Lines(proc)
        assert lines.next() == HEADER
        first = dict(zip(HEADER, lines.next(), strict=True))
        assert first["mode"] == "local_only" and first["queued"] == "0"
        assert first["enq/s"] == "-"  # no earlier reply to take a rate from
        for n in range(5):
            c.enqueue({"n": n})
        # A line taken after the enqueues shows them queued, at a rate above zero.
        rows = lines.until_queued(5)
        row = dict(zip(HEADER, rows[-1], strict=True))
        assert row["queued"] == "5" and row["breaker"] == "closed"
        assert any(float(dict(zip(HEADER, r, strict=True))["enq/s"]) > 0
                   for r in rows if r != HEADER)  # fmt: skip
        assert row["usage"].endswith("%")
        proc.send_signal(signal.SIGINT)
        assert_stopped_cleanly(proc)


@pytest.mark.slow
def test_watch_repeats_the_header_like_vmstat() -> None:
    with running_daemon() as daemon, watch(daemon.socket_path, "--interval", "0.01") as proc:
        out = Lines(proc)
        lines = [out.next() for _ in range(2 * (WATCH_HEADER_EVERY + 1))]
        proc.send_signal(signal.SIGINT)
        assert_stopped_cleanly(proc)
    headers = [i for i, cells in enumerate(lines) if cells == HEADER]
    assert headers == [0, WATCH_HEADER_EVERY + 1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_watch_started_at_default_dispositions_stops_cleanly_on_sigint_and_sigterm(
    sig: signal.Signals,
) -> None:
    with running_daemon() as daemon, watch(daemon.socket_path, "--interval", "0.05") as proc:
        assert ignored(proc.pid) == set()
        lines = Lines(proc)
        assert lines.next() == HEADER
        lines.next()  # a row: the loop runs, with its SIGTERM handler in place
        proc.send_signal(sig)
        assert_stopped_cleanly(proc)


@pytest.mark.slow
def test_watch_started_with_sigint_ignored_keeps_ignoring_it_and_stops_on_sigterm() -> None:
    """A background job of a script must not die of the terminal's Ctrl-C; SIGTERM stops it."""
    with running_daemon() as daemon, Client(daemon.socket_path) as c, watch(
        daemon.socket_path, "--interval", "0.05", preexec=ignoring_sigint
    ) as proc:
        assert ignored(proc.pid) == {signal.SIGINT}
        lines = Lines(proc)
        assert lines.next() == HEADER
        lines.next()
        proc.send_signal(signal.SIGINT)
        # A row that shows a request enqueued after the SIGINT comes from a stats call made
        # after the signal reached the watch: had SIGINT stopped it, there would be no such row.
        c.enqueue({"sent": "after the SIGINT"})
        lines.until_queued(1)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert_stopped_cleanly(proc)


@pytest.mark.slow
def test_watch_of_an_unreachable_daemon_exits_2_with_a_clear_message() -> None:
    with short_tmpdir() as tmp, watch(str(tmp / "none.sock")) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.startswith("unreachable: ")
    assert out == ""


@pytest.mark.slow
def test_watch_refuses_an_interval_that_is_not_positive() -> None:
    with running_daemon() as daemon, watch(daemon.socket_path, "--interval", "0") as proc:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "--interval must be a number of seconds > 0" in err
