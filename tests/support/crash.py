"""Load the real daemon with producers and workers, stop it hard, and count what survived.

Every crash test keeps a ledger of what the daemon acknowledged (enqueues and completions),
stops the daemon mid-load, starts it again and checks: every acknowledged request is found
(lost must be 0) and no acknowledged completion is handed out again (settled twice must be 0).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.client import AsyncClient
from sidecar.errors import NotFound, SidecarError, SidecarUnavailable
from sidecar.queue.local import LocalQueue
from tests.support.bounded import in_thread, settle

PRODUCERS = 4
WORKERS = 4
LOAD_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 90.0


def crash_local(queue: LocalQueue) -> None:
    """Drop a local store as a killed process would: files as they are, no final snapshot."""
    journal = queue._journal
    assert journal is not None and journal._fd is not None and journal._lock_fd is not None
    os.close(journal._fd)
    os.close(journal._lock_fd)
    journal._fd = journal._lock_fd = None


@dataclass
class Ledger:
    """What the clients were told."""

    acked: set[str] = field(default_factory=set)
    completed: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once both targets are met: the moment to stop the daemon.
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    acked_target: int = 0
    completed_target: int = 0

    def note(self) -> None:
        if len(self.acked) >= self.acked_target and len(self.completed) >= self.completed_target:
            self.loaded.set()


@dataclass
class Outcome:
    """What the restarted daemon holds, against the ledger."""

    acked: int
    completed: int
    lost: list[str]
    completion_lost: list[str]
    settled_twice: list[str]


async def _produce(path: str, n: int, ledger: Ledger) -> None:
    async with AsyncClient(path, timeout_s=5.0) as client:
        i = 0
        while not ledger.stopped.is_set():
            qid = f"p{n}-{i}"
            i += 1
            try:
                res = await client.enqueue({"prompt": qid, "pad": "x" * 200}, queue_id=qid)
            except SidecarUnavailable:
                return
            except SidecarError as exc:
                ledger.errors.append(f"{qid}: {exc.code}")
                continue
            ledger.acked.add(res.queue_id)
            ledger.note()


async def _work(path: str, ledger: Ledger) -> None:
    async with AsyncClient(path, timeout_s=5.0) as client:
        while not ledger.stopped.is_set():
            try:
                jobs = await client.dequeue(5, wait_s=0.1)
                for job in jobs:
                    await client.complete(job.queue_id, job.lease_id)
                    ledger.completed.add(job.queue_id)
                    ledger.note()
            except SidecarUnavailable:
                return
            except SidecarError as exc:
                ledger.errors.append(f"worker: {exc.code}")


async def load_then(
    path: str,
    stop: Callable[[], object],
    *,
    acked_at_least: int,
    completed_at_least: int,
    workers: int = WORKERS,
) -> Ledger:
    """Run producers and workers until both targets are met, then `stop()` the daemon."""
    ledger = Ledger(acked_target=acked_at_least, completed_target=completed_at_least)
    tasks = [asyncio.create_task(_produce(path, n, ledger)) for n in range(PRODUCERS)]
    tasks += [asyncio.create_task(_work(path, ledger)) for _ in range(workers)]
    try:
        loaded = asyncio.create_task(ledger.loaded.wait())
        await asyncio.wait(
            [loaded, *tasks], timeout=LOAD_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        loaded.cancel()
        assert ledger.loaded.is_set(), f"load ended early or stalled: {ledger.errors[:5]}"
        # Bounded, and off the default executor, which the closing loop would join.
        await in_thread(stop, timeout_s=LOAD_TIMEOUT_S)
    finally:
        ledger.stopped.set()
        # Cancels what outlives the bound and re-raises what a load task raised unexpectedly.
        await settle(tasks, LOAD_TIMEOUT_S)
    return ledger


async def check(path: str, ledger: Ledger) -> Outcome:
    """Find every acknowledged request, then drain the queue and count second settlements."""
    lost: list[str] = []
    completion_lost: list[str] = []
    twice: list[str] = []
    async with AsyncClient(path, timeout_s=10.0) as client:
        for qid in sorted(ledger.acked):
            try:
                info = await client.status(qid)
            except NotFound:
                lost.append(qid)
                continue
            if qid in ledger.completed and info.status != "completed":
                completion_lost.append(qid)
        try:
            await _drain(client, ledger, twice)
        except TimeoutError:
            raise AssertionError(f"queue not drained: {await client.stats()}") from None
    return Outcome(
        acked=len(ledger.acked),
        completed=len(ledger.completed),
        lost=lost,
        completion_lost=completion_lost,
        settled_twice=twice,
    )


async def _drain(client: AsyncClient, ledger: Ledger, twice: list[str]) -> None:
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        while True:
            jobs = await client.dequeue(100, lease_s=60, wait_s=0.5)
            for job in jobs:
                if job.queue_id in ledger.completed:
                    twice.append(job.queue_id)
                await client.complete(job.queue_id, job.lease_id)
            stats = await client.stats()
            if not jobs and stats.queued == 0 and stats.processing == 0:
                break


async def back_on_redis(client: AsyncClient, timeout_s: float = 40.0) -> dict[str, Any]:
    """Bounded: the daemon serves from Redis again with no local backlog; its stats."""
    async with asyncio.timeout(timeout_s):
        while True:
            stats = await client.stats()
            local = stats.stores.get("local")
            if stats.mode == "redis" and local is not None and local.queued == 0:
                return {"failovers": stats.failovers, "degraded_s": stats.degraded_s}
            await asyncio.sleep(0.2)  # a bounded poll of another process's state
