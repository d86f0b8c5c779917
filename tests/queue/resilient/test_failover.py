"""Failover through the real daemon: Redis killed or frozen under load, then back.

Every test counts what the daemon acknowledged against what is found and settled afterwards:
lost must be 0 and duplicated settlements must be 0.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import pytest

from sidecar.client import AsyncClient
from sidecar.errors import BackendUnavailable, InvalidState, LeaseMismatch, QueueFull
from tests.support.daemon import Daemon, running_daemon
from tests.support.redis_server import RedisServer

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

PRODUCERS = 4
PER_PRODUCER = 300
WORKERS = 4
DRAIN_DEADLINE_S = 60.0


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:  # AOF: a restarted server keeps its data
        yield server


def daemon_on(redis: RedisServer, **overrides: str) -> AbstractContextManager[Daemon]:
    env = {
        "REDIS_URL": redis.url,
        "REDIS_TIMEOUT_SECONDS": "0.3",
        "REDIS_CONNECT_TIMEOUT_SECONDS": "0.3",
        "QUEUE_LEASE_SECONDS": "3",  # a lease lost with a dropped reply comes back quickly
        "QUEUE_MAX_SIZE": "100000",
    }
    return running_daemon(**(env | overrides))


@dataclass
class Ledger:
    """What the clients saw: acknowledged ids, settlements by lease, errors."""

    acked: set[str] = field(default_factory=set)
    settled: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    producer_errors: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def all_settled(self) -> bool:
        return self.acked <= self.settled.keys()


async def produce(path: str, n: int, ledger: Ledger) -> None:
    async with AsyncClient(path) as client:
        for i in range(PER_PRODUCER):
            qid = f"p{n}-{i}"
            try:
                res = await client.enqueue({"prompt": qid, "pad": "x" * 200}, queue_id=qid)
            except Exception as exc:  # any error a service would see counts against us
                ledger.producer_errors.append(f"{qid}: {exc!r}")
                continue
            ledger.acked.add(res.queue_id)


async def work(path: str, ledger: Ledger) -> None:
    async with AsyncClient(path) as client:
        while not ledger.done.is_set():
            try:
                jobs = await client.dequeue(10, wait_s=0.2)
            except BackendUnavailable:
                jobs = []
            for job in jobs:
                await settle(client, job.queue_id, job.lease_id, ledger)


async def settle(client: AsyncClient, queue_id: str, lease_id: str, ledger: Ledger) -> None:
    """Complete, retrying while the store that holds the request is away (as a worker would)."""
    for _ in range(200):
        try:
            await client.complete(queue_id, lease_id)
        except BackendUnavailable:
            await asyncio.sleep(0.05)  # a worker's retry backoff, not a test wait
            continue
        except (LeaseMismatch, InvalidState):
            return  # the lease lapsed: the request will be handed out again
        ledger.settled[queue_id].add(lease_id)
        return


async def run_fault(daemon: Daemon, redis: RedisServer, fault: str) -> Ledger:
    ledger = Ledger()
    path = daemon.socket_path
    total = PRODUCERS * PER_PRODUCER
    producers = [asyncio.create_task(produce(path, n, ledger)) for n in range(PRODUCERS)]
    workers = [asyncio.create_task(work(path, ledger)) for _ in range(WORKERS)]
    await until(lambda: len(ledger.acked) >= total // 3, 30)
    if fault == "kill":
        redis.kill()
    else:
        redis.pause()
    await until(lambda: len(ledger.acked) >= 2 * total // 3, 30)
    if fault == "kill":
        redis.restart()
    else:
        redis.resume()
    await asyncio.gather(*producers)
    await until(ledger.all_settled, DRAIN_DEADLINE_S)
    ledger.done.set()
    await asyncio.gather(*workers)
    return ledger


async def until(predicate: Callable[[], bool], timeout: float) -> None:
    """Wait for a condition the running tasks make true, re-checking as they make progress."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # yield to the producers and workers doing the work


@pytest.mark.parametrize("fault", ["kill", "stop"])
async def test_redis_fault_under_load_loses_nothing(redis: RedisServer, fault: str) -> None:
    with daemon_on(redis) as daemon:
        ledger = await run_fault(daemon, redis, fault)
        async with AsyncClient(daemon.socket_path) as client:
            found = [await client.status(qid) for qid in sorted(ledger.acked)]
            stats = await client.stats()
            health = await client.health()
    acknowledged = len(ledger.acked)
    completed = sum(1 for s in found if s.status == "completed")
    duplicates = sum(1 for leases in ledger.settled.values() if len(leases) > 1)
    lost = acknowledged - completed
    print(
        f"fault={fault} acknowledged={acknowledged} found={len(found)} completed={completed} "
        f"lost={lost} duplicated_settlements={duplicates} producer_errors="
        f"{len(ledger.producer_errors)} failovers={stats.failovers} "
        f"moved_out_of_local={stats.stores['local'].moved_out}"
    )
    assert ledger.producer_errors == []
    assert acknowledged == PRODUCERS * PER_PRODUCER
    assert lost == 0
    assert duplicates == 0
    assert stats.failovers >= 1 and stats.recoveries >= 1
    assert stats.balanced, stats
    assert health.mode == "redis"


async def test_local_watermark_during_an_outage(redis: RedisServer) -> None:
    with daemon_on(
        redis, QUEUE_MAX_SIZE="100", QUEUE_HIGH_WATERMARK="0.8", QUEUE_LOW_WATERMARK="0.5"
    ) as daemon:
        async with AsyncClient(daemon.socket_path) as client:
            await client.enqueue("before the outage", queue_id="before")
            redis.kill()
            acked, rejected = [], []
            for i in range(150):
                try:
                    acked.append((await client.enqueue({"i": i}, queue_id=f"o{i}")).queue_id)
                except QueueFull as err:
                    rejected.append(err)
            assert len(acked) == 80 and len(rejected) == 70
            assert rejected[0].details["reason"] == "high_watermark"
            health = await client.health()
            assert health.mode == "local_fallback" and health.status == "degraded"
            redis.restart()
            deadline = time.monotonic() + 30
            while (await client.stats()).stores["local"].queued:  # each poll is a real request
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            statuses = [await client.status(q) for q in ["before", *acked]]
            lost = sum(1 for s in statuses if s.status != "queued")
            print(f"acknowledged={len(acked) + 1} found={len(statuses)} lost={lost}")
            assert lost == 0
            stats = await client.stats()
            assert stats.accepted == 81 and stats.queued == 81 and stats.balanced
            assert (await client.enqueue("accepted again")).created


def test_redis_restarted_empty_is_reported_by_health() -> None:
    with RedisServer(appendonly=False) as redis, daemon_on(redis) as daemon:
        sidecar = [sys.executable, "-m", "sidecar", "--socket", daemon.socket_path]
        subprocess.run([*sidecar, "enqueue", '"lost with redis"'], check=True, timeout=30)
        redis.kill()
        redis.restart()  # no persistence: back without its data
        deadline = time.monotonic() + 30
        while True:
            proc = subprocess.run(
                [*sidecar, "health", "--json"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            report = json.loads(proc.stdout)
            if any("without its data" in r for r in report["reasons"]):
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.1)  # re-ask: the daemon's watcher checks the marker every second
        assert proc.returncode == 1
        assert report["status"] == "degraded"
        assert daemon.events("redis_data_lost")
