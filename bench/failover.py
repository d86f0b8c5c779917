"""Failover figures: Redis killed (SIGKILL) and hung (SIGSTOP) under a steady producer.

One redis-server and one daemon on it (REDIS_URL set, REDIS_TIMEOUT_SECONDS lowered to
--redis-timeout) live for both scenarios. Producers (PRODUCERS tasks sharing one AsyncClient,
paced to --producer-rate enqueues/s in all, so latency is the daemon's, not a self-made queue)
enqueue from before the fault to the end of the scenario, and every enqueue's
start, end and outcome is kept. For each fault:

- the switch: the fault, then `health` polled until its mode is local_fallback; the first
  enqueue started after the fault and acknowledged (only the local queue can acknowledge it:
  Redis is dead or frozen); the worst enqueue latency of those that ended after the fault; and
  when enqueues are fast again (the end of the last slow one, slow meaning over SLOW_FACTOR x
  the p99 before the fault, at least SLOW_FLOOR_S);
- the move back: the local backlog topped up to --failover-backlog (enqueue batches through the
  daemon), Redis restarted (after SIGKILL: empty) or resumed (SIGCONT), then `stats` polled
  until `recoveries` counts one more and until `stores.local.queued` is 0.

These are latencies of a mechanism, so the table gives absolute times (and the worst switch
latency over the configured timeout), not ratios to a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.payload import llm_request
from bench.redis_server import RedisProcess, redis_running, redis_socket
from bench.servers import daemon_spec, running
from bench.tables import markdown_table, note
from sidecar.client import AsyncClient, item
from sidecar.errors import SidecarError

PRODUCERS = 8
SLOW_FACTOR = 5.0
SLOW_FLOOR_S = 0.02
POLL_S = 0.005
BATCH = 1000
# Bounds on every wait: a scenario that takes longer than these has failed.
SWITCH_TIMEOUT_S = 30.0
MOVE_TIMEOUT_S = 300.0
ROOM: dict[str, str | None] = {"QUEUE_MAX_SIZE": "10000000", "QUEUE_MAX_MEMORY_MB": "8192"}


def add_failover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--failover-backlog", type=int, default=20_000, help="local backlog to move back"
    )
    p.add_argument(
        "--redis-timeout", type=float, default=0.5, help="the daemon's REDIS_TIMEOUT_SECONDS"
    )
    p.add_argument("--steady-s", type=float, default=1.0, help="producing before each fault")
    p.add_argument(
        "--producer-rate", type=float, default=2000, help="enqueues/s of the failover producers"
    )


def quick_failover(args: argparse.Namespace) -> None:
    args.failover_backlog, args.steady_s, args.producer_rate = 2_000, 0.3, 1000


@dataclass
class Enqueued:
    start: float
    end: float
    ok: bool

    @property
    def latency(self) -> float:
        return self.end - self.start


class Producer:
    """PRODUCERS tasks enqueueing through one AsyncClient until stopped (or a cap is hit)."""

    def __init__(self, client: AsyncClient, rate: float, max_s: float) -> None:
        self.client = client
        # Each task keeps its own schedule; one late by a stall starts afresh, never bursts.
        self.interval_s = PRODUCERS / rate
        self.log: list[Enqueued] = []
        self.stop = asyncio.Event()
        self.deadline = time.monotonic() + max_s
        self.tasks: list[asyncio.Task[None]] = []
        self.steady_s = 1.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._produce()) for _ in range(PRODUCERS)]

    async def _produce(self) -> None:
        payload = llm_request()
        next_at = time.monotonic()
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            start = time.monotonic()
            if next_at > start:
                await asyncio.sleep(next_at - start)
                start = time.monotonic()
            next_at = max(next_at + self.interval_s, start)
            try:
                await self.client.enqueue(payload)
                ok = True
            except SidecarError:
                ok = False
            self.log.append(Enqueued(start, time.monotonic(), ok))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def _poll(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll an async predicate until it holds; the time it held (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"failover bench: {what} did not happen within {timeout_s} s")


@dataclass
class Scenario:
    fault: str
    timeout_s: float
    switch_s: float = math.nan
    first_local_ms: float = math.nan
    worst_ms: float = math.nan
    fast_again_s: float = math.nan
    errors: int = 0
    backlog: int = 0
    detect_s: float = math.nan
    move_s: float = math.nan


def _switch_figures(sc: Scenario, log: list[Enqueued], fault_at: float) -> None:
    before = sorted(e.latency for e in log if e.end < fault_at)
    p99 = before[max(0, math.ceil(0.99 * len(before)) - 1)] if before else 0.0
    slow = max(SLOW_FACTOR * p99, SLOW_FLOOR_S)
    after = [e for e in log if e.end >= fault_at]
    acked = [e.end for e in after if e.ok and e.start >= fault_at]
    sc.first_local_ms = (min(acked) - fault_at) * 1000 if acked else math.nan
    sc.worst_ms = max((e.latency for e in after), default=0.0) * 1000
    slow_ends = [e.end for e in after if e.latency > slow]
    sc.fast_again_s = max(slow_ends, default=fault_at) - fault_at
    sc.errors = sum(1 for e in log if not e.ok)


async def _mode_is(client: AsyncClient, mode: str) -> bool:
    return (await client.health()).mode == mode


async def _local_queued(client: AsyncClient) -> int:
    local = (await client.stats()).stores.get("local")
    return 0 if local is None else local.queued


async def _top_up(client: AsyncClient, target: int) -> int:
    """Enqueue batches until the local queue holds at least target; what it holds then."""
    payload = llm_request()
    for _ in range(target // BATCH + 2):
        held = await _local_queued(client)
        if held >= target:
            return held
        await client.enqueue_many([item(payload) for _ in range(min(BATCH, target - held))])
    return await _local_queued(client)


async def _switch(sc: Scenario, server: RedisProcess, probe: AsyncClient, prod: Producer) -> None:
    """Apply the fault under load; the switch figures into sc."""
    await asyncio.sleep(prod.steady_s)
    fault_at = time.monotonic()
    if sc.fault == "SIGKILL":
        server.kill()
    else:
        server.pause()
    switched = await _poll(lambda: _mode_is(probe, "local_fallback"), SWITCH_TIMEOUT_S, "switch")
    sc.switch_s = switched - fault_at
    # Keep producing long enough that enqueues caught in the switch have all answered.
    await asyncio.sleep(max(prod.steady_s, 2 * sc.timeout_s))
    _switch_figures(sc, list(prod.log), fault_at)


async def _move_back(sc: Scenario, server: RedisProcess, probe: AsyncClient, target: int) -> None:
    """Top the local backlog up to target, bring Redis back; the move-back figures into sc."""
    before = (await probe.stats()).recoveries
    sc.backlog = await _top_up(probe, target)
    back_at = time.monotonic()
    if sc.fault == "SIGKILL":
        await asyncio.to_thread(server.start)
    else:
        server.resume()

    async def recovered() -> bool:
        return (await probe.stats()).recoveries > before

    async def drained() -> bool:
        return await _local_queued(probe) == 0

    sc.detect_s = await _poll(recovered, MOVE_TIMEOUT_S, "recovery") - back_at
    sc.move_s = await _poll(drained, MOVE_TIMEOUT_S, "move back") - back_at - sc.detect_s


async def _scenario(
    fault: str, server: RedisProcess, sock: str, args: argparse.Namespace
) -> Scenario:
    sc = Scenario(fault, args.redis_timeout)
    note(f"failover: {fault} of redis-server under {PRODUCERS} producers")
    async with AsyncClient(sock) as client, AsyncClient(sock) as probe:
        if not await _mode_is(probe, "redis"):
            raise RuntimeError("failover bench: the daemon is not on Redis before the fault")
        prod = Producer(client, args.producer_rate, max_s=MOVE_TIMEOUT_S + SWITCH_TIMEOUT_S + 60)
        prod.steady_s = args.steady_s
        prod.start()
        try:
            await _switch(sc, server, probe, prod)
            await _move_back(sc, server, probe, args.failover_backlog)
        finally:
            await prod.finish()
        sc.errors = sum(1 for e in prod.log if not e.ok)
    note(f"  switch {sc.switch_s * 1000:.0f} ms, worst {sc.worst_ms:.0f} ms, "
         f"moved {sc.backlog:,} in {sc.move_s:.2f} s")  # fmt: skip
    return sc


def run_failover(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Start Redis and the daemon; SIGKILL, then SIGSTOP; the two tables as Markdown."""
    timeout = str(args.redis_timeout)
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp, contextlib.ExitStack() as st:
        folder = Path(tmp)
        server = st.enter_context(redis_running(redis_socket(folder)))
        sock = str(folder / "sidecar.sock")
        env = {**ROOM, "REDIS_URL": server.url, "REDIS_TIMEOUT_SECONDS": timeout,
               "REDIS_CONNECT_TIMEOUT_SECONDS": timeout}  # fmt: skip
        st.enter_context(running(daemon_spec(sock, env)))

        async def both() -> list[Scenario]:
            return [await _scenario(f, server, sock, args) for f in ("SIGKILL", "SIGSTOP")]

        scenarios = uvloop.run(both())
    return [
        ("failover: the switch to the local queue", format_switch(scenarios)),
        ("failover: the move back to Redis", format_move(scenarios)),
    ]


def format_switch(scenarios: list[Scenario]) -> str:
    head = (
        "fault",
        "REDIS_TIMEOUT s",
        "mode switch ms",
        "first local ack ms",
        "worst enqueue ms",
        "worst / timeout",
        "fast again after ms",
        "enqueue errors",
    )
    body = [
        (sc.fault, f"{sc.timeout_s:g}", f"{sc.switch_s * 1000:.0f}", f"{sc.first_local_ms:.0f}",
         f"{sc.worst_ms:.0f}", f"{sc.worst_ms / 1000 / sc.timeout_s:.2f}",
         f"{sc.fast_again_s * 1000:.0f}", str(sc.errors))
        for sc in scenarios
    ]  # fmt: skip
    return markdown_table(head, body)


def format_move(scenarios: list[Scenario]) -> str:
    head = ("fault", "back by", "local backlog", "recovery seen after s", "moved in s",
            "moved / s")  # fmt: skip
    body = [
        (sc.fault, "restart (empty)" if sc.fault == "SIGKILL" else "SIGCONT",
         f"{sc.backlog:,}", f"{sc.detect_s:.2f}", f"{sc.move_s:.2f}",
         f"{sc.backlog / sc.move_s:,.0f}" if sc.move_s > 0 else "-")
        for sc in scenarios
    ]  # fmt: skip
    return markdown_table(head, body)
