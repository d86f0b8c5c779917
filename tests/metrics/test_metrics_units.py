"""Metrics at unit level: the server's per-request calls, the store hooks, the listener's bounds."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.config import ConfigError, Settings
from sidecar.errors import BackendUnavailable, QueueFull
from sidecar.metrics import MAX_LABEL_VALUES, DaemonMetrics
from sidecar.metrics.http import MetricsListener
from sidecar.models import QueuedRequest, QueueStats
from sidecar.queue.base import new_request
from sidecar.queue.hooks import failure_kind
from sidecar.queue.local import LocalQueue
from tests.support.helpers import FakeClock
from tests.support.metrics_scrape import samples, value


def make_metrics() -> DaemonMetrics:
    return DaemonMetrics(version="test", high_watermark=0.8, low_watermark=0.6)


async def test_request_done_counts_and_times_each_op_and_errors_by_code() -> None:
    m = make_metrics()
    m.request_done("enqueue", 0.0002, None)
    m.request_done("enqueue", 0.003, "queue_full")
    m.request_done("dequeue", 2.0, None)
    text = (await m.render()).decode()
    assert value(text, "sidecar_request_duration_seconds_count", op="enqueue") == 2
    assert value(text, "sidecar_request_duration_seconds_count", op="dequeue") == 1
    assert value(text, "sidecar_request_duration_seconds_bucket", op="enqueue", le="0.00025") == 1
    assert value(text, "sidecar_request_duration_seconds_sum", op="dequeue") == 2.0
    assert value(text, "sidecar_request_errors_total", op="enqueue", code="queue_full") == 1
    assert value(text, "sidecar_request_errors_total", op="dequeue") == 0


async def test_label_values_past_the_cap_count_as_other() -> None:
    m = make_metrics()
    for n in range(MAX_LABEL_VALUES + 5):
        m.request_done(f"op{n}", 0.001, None)
    text = (await m.render()).decode()
    ops = {dict(labels)["op"] for name, labels in samples(text)
           if name == "sidecar_request_duration_seconds_count"}  # fmt: skip
    assert len(ops) == MAX_LABEL_VALUES + 1 and "other" in ops
    assert value(text, "sidecar_request_duration_seconds_count", op="other") == 5


async def test_connections_open_closed_and_refused() -> None:
    m = make_metrics()
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.connection_refused("max_connections")
    m.connection_refused("permission_denied")
    m.connection_refused("max_connections")
    text = (await m.render()).decode()
    assert value(text, "sidecar_connections_open") == 1
    assert value(text, "sidecar_connections_opened_total") == 2
    assert value(text, "sidecar_connections_refused_total", reason="max_connections") == 2
    assert value(text, "sidecar_connections_refused_total", reason="permission_denied") == 1


async def test_timed_sync_observes_each_sync_even_a_failing_one(tmp_path: Path) -> None:
    m = make_metrics()
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(5, "EIO")

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        m.timed_sync(os.fdatasync)(fd)
        with pytest.raises(OSError):
            m.timed_sync(failing)(fd)
    finally:
        os.close(fd)
    assert calls == [fd]
    text = (await m.render()).decode()
    assert value(text, "sidecar_journal_fsync_duration_seconds_count") == 2


def local_store(clock: FakeClock, metrics: DaemonMetrics, **limits: int) -> LocalQueue:
    store = LocalQueue(
        max_items=limits.get("max_items", 100),
        max_bytes=10 * 1024 * 1024,
        high_watermark=0.8,
        low_watermark=0.6,
        retention_s=600.0,
        clock=clock,
        hooks=metrics,
    )
    metrics.bind(store)
    return store


def request(clock: FakeClock, ttl_s: float = 60.0, max_attempts: int = 3) -> QueuedRequest:
    return new_request(payload=b"\x80", priority=5, ttl_s=ttl_s,
                       max_attempts=max_attempts, now=clock())  # fmt: skip


async def test_local_store_hooks_count_waits_retries_failures_and_expiries(
    clock: FakeClock,
) -> None:
    m = make_metrics()
    store = local_store(clock, m)
    await store.enqueue([request(clock, max_attempts=2), request(clock, ttl_s=5.0)])
    clock.advance(3.0)
    [first] = await store.dequeue(1, lease_s=10.0)
    await store.fail(first.queue_id, first.lease_id or "", "busy", retry=True)
    [again] = await store.dequeue(1, lease_s=10.0)  # the same request: not a first lease
    assert again.queue_id == first.queue_id
    clock.advance(11.0)  # its lease lapses with no attempt left; the other one's TTL ends
    await store.stats()
    text = (await m.render()).decode()
    assert value(text, "sidecar_first_lease_wait_seconds_count", store="local") == 1
    assert value(text, "sidecar_first_lease_wait_seconds_sum", store="local") == 3.0
    assert value(text, "sidecar_retries_total", store="local", reason="worker_retry") == 1
    assert value(text, "sidecar_failures_total", reason="attempts_exhausted") == 1
    assert value(text, "sidecar_expiries_total", store="local", reason="ttl_elapsed") == 1


async def test_local_store_hooks_count_rejections_by_reason(clock: FakeClock) -> None:
    m = make_metrics()
    store = local_store(clock, m, max_items=2)
    await store.enqueue([request(clock)])
    with pytest.raises(QueueFull):
        await store.enqueue([request(clock), request(clock)])
    text = (await m.render()).decode()
    assert value(text, "sidecar_rejections_total", store="local", reason="max_size") == 2


async def test_a_store_without_hooks_has_no_observer(clock: FakeClock) -> None:
    store = LocalQueue(max_items=10, max_bytes=1 << 20, high_watermark=0.8, low_watermark=0.6,
                       retention_s=60.0, clock=clock)  # fmt: skip
    assert store._state.observer is None  # the default costs nothing per transition


def test_failure_kinds_are_a_fixed_set() -> None:
    assert failure_kind("cancelled") == "cancelled"
    assert failure_kind("attempts_exhausted: lease_expired") == "attempts_exhausted"
    assert failure_kind("the provider said no") == "worker_failed"
    assert failure_kind(None) == "worker_failed"


# -- the listener's bounds -------------------------------------------------------------------


async def fixed_render() -> bytes:
    return b"# HELP x_total x\n# TYPE x_total counter\nx_total 1.0\n"


async def get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    return reply


@pytest.mark.slow
async def test_listener_caps_connections_and_times_out_silent_ones() -> None:
    listener = MetricsListener(fixed_render, "127.0.0.1", 0, max_connections=1, read_timeout_s=1)
    await listener.start()
    try:
        reader, silent = await asyncio.open_connection("127.0.0.1", listener.port)
        async with asyncio.timeout(10):  # the listener takes the connection on its next pass
            while not listener._active:  # noqa: ASYNC110 - a condition with a deadline
                await asyncio.sleep(0)
        try:  # over the cap: dropped unanswered (a reset or a plain close, by timing)
            refused = await get(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        except ConnectionError:
            refused = b""
        assert refused == b""
        # The silent one is dropped after the read timeout, with a 408, and frees its slot.
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 408 ")
        silent.close()
        await silent.wait_closed()
        ok = await get(listener.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"x_total 1.0\n")
    finally:
        await listener.close()


async def test_listener_answers_a_bad_request_line_and_a_failing_render() -> None:
    async def broken() -> bytes:
        raise RuntimeError("a collector bug")

    listener = MetricsListener(broken, "127.0.0.1", 0)
    await listener.start()
    try:
        assert (await get(listener.port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        failed = await get(listener.port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert failed.startswith(b"HTTP/1.1 500 ")
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("raw", "addr"),
    [("9100", ("127.0.0.1", 9100)), (":9100", ("127.0.0.1", 9100)),
     ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::1]:9100", ("::1", 9100))],
)  # fmt: skip
def test_metrics_addr_forms(raw: str, addr: tuple[str, int]) -> None:
    assert Settings.from_env({"SIDECAR_METRICS_ADDR": raw}).metrics_addr == addr


def test_metrics_addr_is_off_by_default_and_a_bad_one_names_the_variable() -> None:
    assert Settings.from_env({}).metrics_addr is None
    with pytest.raises(ConfigError, match=r"SIDECAR_METRICS_ADDR='a:b' is invalid: expected"):
        Settings.from_env({"SIDECAR_METRICS_ADDR": "a:b"})


class FrozenLocal(LocalQueue):
    """A store whose stats cannot be read (as a frozen backend's)."""

    async def stats(self) -> QueueStats:
        raise BackendUnavailable("frozen", {"kind": "timeout"})


async def test_a_failed_read_of_the_stores_is_counted_and_the_rest_still_served(
    clock: FakeClock,
) -> None:
    m = make_metrics()
    store = FrozenLocal(max_items=10, max_bytes=1 << 20, high_watermark=0.8, low_watermark=0.6,
                        retention_s=60.0, clock=clock, hooks=m)  # fmt: skip
    m.bind(store)
    m.request_done("stats", 0.001, None)
    text = (await m.render()).decode()
    assert value(text, "sidecar_metrics_refresh_errors_total") == 1
    assert value(text, "sidecar_request_duration_seconds_count", op="stats") == 1
    assert "sidecar_queue_requests" not in text  # no stale or invented queue gauges
