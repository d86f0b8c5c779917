"""Issue 24: memory goes back to the OS once the local store empties, off the hot path.

The trim function and the timer are injected: the test runs the scheduled call itself, so
nothing depends on a real delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.queue.local import LocalQueue
from sidecar.queue.local.trim import TRIM_DELAY_S, EmptyTrim, glibc_malloc_trim
from tests.support.helpers import FakeClock, make_request

LIMIT = 200
INTERVAL = 30.0


class Timers:
    """A stand-in for loop.call_later: records each call; the test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[[], None]]] = []
        self.now = 0.0

    def schedule(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        self.calls.append((delay, callback))
        return asyncio.get_running_loop().call_later(3600, lambda: None)  # never fires here

    def fire(self) -> None:
        _, callback = self.calls.pop(0)
        callback()


def trimmed_store(clock: FakeClock, timers: Timers, trims: list[int]) -> LocalQueue:
    def build(held: Callable[[], int]) -> EmptyTrim:
        return EmptyTrim(
            lambda: trims.append(1),
            held,
            min_interval_s=INTERVAL,
            schedule=timers.schedule,
            monotonic=lambda: timers.now,
        )

    return LocalQueue(
        max_items=LIMIT,
        max_bytes=100 * 1024 * 1024,
        high_watermark=1.0,
        low_watermark=0.9,
        retention_s=600.0,
        clock=clock,
        trim=build,
    )


async def burst_then_drain(store: LocalQueue, clock: FakeClock) -> None:
    await store.enqueue([make_request(clock) for _ in range(LIMIT)])
    while jobs := await store.dequeue(50, 30.0):
        for job in jobs:
            assert job.lease_id is not None
            await store.complete(job.queue_id, job.lease_id)


async def test_a_burst_then_a_drain_trims_once(clock: FakeClock) -> None:
    timers, trims = Timers(), list[int]()
    store = trimmed_store(clock, timers, trims)
    await store.start()
    try:
        await burst_then_drain(store, clock)
        assert (await store.stats()).queued == 0
        # One trim scheduled, however many commits found the store empty; none ran inline.
        assert [d for d, _ in timers.calls] == [TRIM_DELAY_S] and trims == []
        timers.fire()
        assert trims == [1]
        # Empty and idle: reads schedule nothing more.
        await store.stats()
        assert timers.calls == []
        # A second burst soon after: its trim waits for the interval to pass.
        timers.now = 5.0
        await burst_then_drain(store, clock)
        [(delay, _)] = timers.calls
        assert delay == INTERVAL - 5.0
        timers.fire()
        assert trims == [1, 1]
    finally:
        await store.close()


async def test_no_trim_when_the_store_fills_again_before_it_is_due(clock: FakeClock) -> None:
    timers, trims = Timers(), list[int]()
    store = trimmed_store(clock, timers, trims)
    await store.start()
    try:
        await burst_then_drain(store, clock)
        await store.enqueue([make_request(clock)])
        timers.fire()
        assert trims == []
    finally:
        await store.close()


def test_the_glibc_trim_is_found_here_and_runs() -> None:
    import platform

    trim = glibc_malloc_trim()
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None
        trim()
    else:  # pragma: no cover - only on musl or macOS
        assert trim is None
