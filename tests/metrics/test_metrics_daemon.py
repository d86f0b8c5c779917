"""The metrics of the real daemon in local mode, read through its HTTP listener.

Each family that an outside client can move is moved here and read back from a scrape; the
server's own (requests, errors, connections) too, and the `metrics` op through the CLI.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sidecar.client import Client
from sidecar.errors import NotFound, QueueFull, SidecarError
from tests.support.daemon import (
    Daemon,
    daemon_env,
    running_daemon,
    serve_expecting_refusal,
    short_tmpdir,
)
from tests.support.metrics_scrape import (
    has,
    http_status,
    metrics_url,
    promtool,
    samples,
    scrape,
    value,
    wait_scrape,
)

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

LOCAL = {"scope": "host", "store": "local"}


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with running_daemon(SIDECAR_METRICS_ADDR="127.0.0.1:0") as d:
        yield d


def test_queue_gauges_and_books_follow_the_requests(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        c.enqueue({"n": 1}, priority=1)
        c.enqueue({"n": 2}, priority=1)
        c.enqueue({"n": 3}, priority=7)
        text = scrape(daemon)
        assert value(text, "sidecar_queue_requests", status="queued", **LOCAL) == 3
        assert value(text, "sidecar_queue_ready_requests", priority="1", **LOCAL) == 2
        assert value(text, "sidecar_queue_ready_requests", priority="7", **LOCAL) == 1
        assert value(text, "sidecar_queue_ready_requests", priority="5", **LOCAL) == 0
        assert value(text, "sidecar_queue_oldest_queued_age_seconds", **LOCAL) > 0
        assert value(text, "sidecar_queue_held_bytes", **LOCAL) > 0
        assert value(text, "sidecar_queue_events_total", event="accepted", **LOCAL) == 3
        assert value(text, "sidecar_mode", mode="local_only") == 1
        assert value(text, "sidecar_mode", mode="redis") == 0
        [job] = c.dequeue(1)
        c.complete(job.queue_id, job.lease_id)
        text = scrape(daemon)
    assert value(text, "sidecar_queue_requests", status="queued", **LOCAL) == 2
    assert value(text, "sidecar_queue_events_total", event="completed", **LOCAL) == 1
    assert value(text, "sidecar_queue_retained_requests", **LOCAL) == 1
    assert value(text, "sidecar_first_lease_wait_seconds_count", store="local") == 1
    assert value(text, "sidecar_first_lease_wait_seconds_sum", store="local") > 0


def test_retries_failures_and_expiries_count_by_reason(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        c.enqueue({"n": 1}, max_attempts=5)
        [job] = c.dequeue(1)
        c.fail(job.queue_id, job.lease_id, "provider said 500", retry=True)
        [job] = c.dequeue(1)
        c.fail(job.queue_id, job.lease_id, "bad prompt", retry=False)
        cancelled = c.enqueue({"n": 2})
        c.cancel(cancelled.queue_id)
        c.enqueue({"n": 3}, max_attempts=5)
        c.dequeue(1, lease_s=0.2)  # never settled: the lease lapses
        c.enqueue({"n": 4}, ttl_s=0.2)
        text = wait_scrape(
            daemon,
            lambda t: value(t, "sidecar_expiries_total", store="local") >= 1
            and value(t, "sidecar_retries_total", reason="lease_expired") >= 1,
            "the expiry and the lapsed lease are counted",
        )
    assert value(text, "sidecar_retries_total", store="local", reason="worker_retry") == 1
    assert value(text, "sidecar_failures_total", store="local", reason="worker_failed") == 1
    assert value(text, "sidecar_failures_total", store="local", reason="cancelled") == 1
    assert value(text, "sidecar_expiries_total", store="local", reason="ttl_elapsed") == 1
    assert value(text, "sidecar_queue_events_total", event="expired", **LOCAL) == 1
    # The reasons are the fixed kinds, never the worker's free text.
    assert "provider said 500" not in text and "bad prompt" not in text


def test_exhausted_attempts_count_as_their_own_failure_reason(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        c.enqueue({"n": 1}, max_attempts=1)
        [job] = c.dequeue(1)
        c.fail(job.queue_id, job.lease_id, "timeout", retry=True)
        text = scrape(daemon)
    assert value(text, "sidecar_failures_total", store="local", reason="attempts_exhausted") == 1
    assert value(text, "sidecar_retries_total", store="local") == 0


def test_rejections_breaker_and_usage_against_the_watermarks() -> None:
    with running_daemon(
        SIDECAR_METRICS_ADDR=":0", QUEUE_MAX_SIZE="4", QUEUE_HIGH_WATERMARK="0.75",
        QUEUE_LOW_WATERMARK="0.25",
    ) as daemon, Client(daemon.socket_path) as c:  # fmt: skip
        text = scrape(daemon)
        assert value(text, "sidecar_local_queue_breaker_open") == 0
        assert value(text, "sidecar_local_queue_watermark_ratio", level="high") == 0.75
        assert value(text, "sidecar_local_queue_watermark_ratio", level="low") == 0.25
        assert value(text, "sidecar_local_queue_limit_requests") == 4
        for n in range(3):
            c.enqueue({"n": n})
        with pytest.raises(QueueFull):
            c.enqueue({"n": 3})
        text = scrape(daemon)
    assert value(text, "sidecar_local_queue_breaker_open") == 1
    assert value(text, "sidecar_local_queue_usage_ratio") == 0.75
    assert value(text, "sidecar_rejections_total", store="local", reason="high_watermark") == 1


def test_journal_fsyncs_are_timed(daemon: Daemon) -> None:
    before = value(scrape(daemon), "sidecar_journal_fsync_duration_seconds_count")
    with Client(daemon.socket_path) as c:
        for n in range(3):
            c.enqueue({"n": n})  # each waits for its own fsync (one per loop pass)
    text = scrape(daemon)
    assert value(text, "sidecar_journal_fsync_duration_seconds_count") >= before + 3
    assert value(text, "sidecar_journal_fsync_duration_seconds_sum") > 0


def test_local_mode_output_passes_promtool_check_metrics(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        c.enqueue({"n": 1})
        [job] = c.dequeue(1)
        c.complete(job.queue_id, job.lease_id)
    text = scrape(daemon)
    assert has(text, "sidecar_build_info")
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_listener_answers_only_get_metrics(daemon: Daemon) -> None:
    url = metrics_url(daemon)
    assert http_status(url) == 200
    assert http_status(url + "?name[]=x") == 200  # Prometheus may add parameters
    assert http_status(url.replace("/metrics", "/")) == 404
    assert http_status(url.replace("/metrics", "/metricsx")) == 404
    assert http_status(url, method="POST") == 405


def test_listener_refuses_an_oversized_request_head(daemon: Daemon) -> None:
    url = metrics_url(daemon)
    host, port = url.split("/")[2].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        reply = sock.recv(1024)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert http_status(url) == 200  # the listener serves on


def test_listener_is_off_by_default() -> None:
    with running_daemon() as daemon:
        assert daemon.events("metrics_listening") == []


@pytest.mark.parametrize("bad", ["localhost", "host:port", "127.0.0.1:70000", ":-1", "[::1"])
def test_a_bad_metrics_address_is_refused_naming_the_variable(bad: str) -> None:
    with short_tmpdir() as tmp:
        result = serve_expecting_refusal(daemon_env(str(tmp / "s.sock"), SIDECAR_METRICS_ADDR=bad))
    assert result.returncode == 2
    assert f"SIDECAR_METRICS_ADDR={bad!r} is invalid" in result.stderr
    assert "host:port, :port or a port" in result.stderr


def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error() -> None:
    with socket.socket() as taken, short_tmpdir() as tmp:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = daemon_env(str(tmp / "s.sock"), SIDECAR_METRICS_ADDR=f"127.0.0.1:{port}")
        result = serve_expecting_refusal(env)
    assert result.returncode == 1
    assert f"SIDECAR_METRICS_ADDR=127.0.0.1:{port} cannot be bound" in result.stderr


def test_requests_errors_and_connections_are_reported_by_the_server(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        for n in range(3):
            c.enqueue({"n": n})
        with pytest.raises(NotFound):
            c.status("f" * 32)
        text = scrape(daemon)
        assert value(text, "sidecar_connections_open") >= 1
    assert value(text, "sidecar_request_duration_seconds_count", op="enqueue") == 3
    assert value(text, "sidecar_request_duration_seconds_sum", op="enqueue") > 0
    assert value(text, "sidecar_request_errors_total", op="status", code="not_found") == 1
    assert value(text, "sidecar_request_errors_total", op="enqueue") == 0
    assert value(text, "sidecar_connections_opened_total") >= 1
    later = wait_scrape(daemon, lambda t: value(t, "sidecar_connections_open") == 0,
                        "the closed connection is counted")  # fmt: skip
    assert value(later, "sidecar_connections_opened_total") >= 1


def test_refused_connections_are_counted_by_reason() -> None:
    with running_daemon(SIDECAR_METRICS_ADDR=":0", SIDECAR_MAX_CONNECTIONS="1") as daemon, Client(
        daemon.socket_path
    ) as first:
        first.stats()  # holds the only connection
        with pytest.raises(SidecarError), Client(daemon.socket_path, timeout_s=5) as second:
            second.stats()
        text = wait_scrape(daemon, lambda t: value(t, "sidecar_connections_refused_total") >= 1,
                           "the refusal is counted")  # fmt: skip
    [reason] = {dict(labels)["reason"] for name, labels in samples(text)
                if name == "sidecar_connections_refused_total"}  # fmt: skip
    assert reason == "too_many_connections"


def test_the_metrics_op_and_cli_serve_what_promtool_accepts(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        c.enqueue({"n": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "--socket", daemon.socket_path, "metrics"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert value(proc.stdout, "sidecar_request_duration_seconds_count", op="enqueue") == 1
    check = subprocess.run([promtool(), "check", "metrics"], input=proc.stdout,
                           capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
