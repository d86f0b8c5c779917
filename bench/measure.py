"""Workloads and how one is measured: a fixed count of operations, timed one by one."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import perf_counter_ns

from bench.sessions import Session, SessionFactory

Op = Callable[[Session], Awaitable[None]]


@dataclass(frozen=True)
class Workload:
    """One row of the table: an operation, how many run at once, over how many connections."""

    name: str
    op: Op
    in_flight: int = 1
    connections: int = 1
    # Each timed (and warm-up) operation takes one queued request, queued untimed beforehand.
    consumes: bool = False

    @property
    def label(self) -> str:
        if self.connections == 1:
            return f"{self.name} x{self.in_flight}"
        per_conn = self.in_flight // self.connections
        return f"{self.name} x{self.in_flight} ({self.connections} conn x {per_conn})"


async def enqueue(session: Session) -> None:
    await session.enqueue()


async def dequeue_complete(session: Session) -> None:
    await session.dequeue_complete()


@dataclass(frozen=True)
class Measurement:
    """A run of `ops` operations: the wall time of all of them and each one's latency."""

    ops: int
    elapsed_ns: int
    latencies_ns: Sequence[int]

    @property
    def ops_per_s(self) -> float:
        return self.ops * 1e9 / self.elapsed_ns

    def percentile_us(self, p: float) -> float:
        """The nearest-rank percentile p (0-100) of the latencies, in microseconds."""
        ordered = sorted(self.latencies_ns)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1] / 1000


def combine(parts: Sequence[Measurement]) -> Measurement:
    """Slices of one workload on one target as one measurement: summed, latencies pooled."""
    return Measurement(
        ops=sum(m.ops for m in parts),
        elapsed_ns=sum(m.elapsed_ns for m in parts),
        latencies_ns=[ns for m in parts for ns in m.latencies_ns],
    )


async def compare(
    targets: Sequence[SessionFactory], workload: Workload, ops: int, warmup: int, slices: int
) -> list[list[Measurement]]:
    """Time `ops` operations on each target, alternating between them slice by slice.

    Alternating within seconds gives every target the same share of the machine's good and
    bad moments (on a shared VM they last seconds, and move a run's numbers by 2x).
    """
    opened: list[list[Session]] = []
    try:
        for factory in targets:
            opened.append([await factory() for _ in range(workload.connections)])
            if workload.consumes:
                await opened[-1][0].prefill(ops + warmup)
            if warmup:
                await _drive(opened[-1], workload, warmup)
        results: list[list[Measurement]] = [[] for _ in targets]
        for k in range(slices):
            count = ops // slices + (k < ops % slices)
            for sessions, out in zip(opened, results, strict=True):
                out.append(await _drive(sessions, workload, count))
        return results
    finally:
        for sessions in opened:
            for session in sessions:
                await session.close()


async def _drive(sessions: Sequence[Session], workload: Workload, ops: int) -> Measurement:
    """Run ops operations from in_flight tasks spread over the sessions; each task starts the
    next operation as soon as its last one answers, so exactly in_flight are outstanding."""
    latencies = [0] * ops
    tickets = itertools.count()
    op = workload.op

    async def worker(session: Session) -> None:
        while (i := next(tickets)) < ops:
            start = perf_counter_ns()
            await op(session)
            latencies[i] = perf_counter_ns() - start

    start = perf_counter_ns()
    async with asyncio.TaskGroup() as group:
        for k in range(workload.in_flight):
            group.create_task(worker(sessions[k % len(sessions)]))
    return Measurement(ops=ops, elapsed_ns=perf_counter_ns() - start, latencies_ns=latencies)
