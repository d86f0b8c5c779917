"""The growth table: Redis-mode throughput with a deep backlog already queued.

One redis-server, one daemon on it (REDIS_URL set) and the raw redis-py ceiling live for the
whole table. For each size the bench first fills the backlog up to that size straight into
Redis (the enqueue script, BACKLOG_BATCH requests per call, a ~200-byte payload, at the lowest
priority so the timed dequeues take the rows' own requests and the backlog only makes the
sorted sets deep), then times dequeue+complete and enqueue with many in flight, alternating
slices between the ceiling and the daemon as the other tables do.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from redis.asyncio import Redis

from bench.lean import LeanSession
from bench.measure import Measurement, Workload, combine, compare, dequeue_complete, enqueue
from bench.redis_ceiling import (
    RedisCeiling,
    client_for,
    fill_backlog,
    load_scripts,
    queued_in_redis,
)
from bench.redis_server import redis_running, redis_socket
from bench.servers import daemon_spec, running
from bench.sessions import SessionFactory, SidecarSession
from bench.tables import markdown_table, note

GROWTH_SIZES = (10_000, 100_000, 1_000_000)
QUICK_GROWTH_SIZES = (1_000, 10_000)
BACKLOG_PAYLOAD = b"x" * 200
# A filling call of BACKLOG_BATCH requests takes tens of milliseconds; allow far more.
FILL_TIMEOUT_S = 30.0
ROOM: dict[str, str | None] = {"QUEUE_MAX_SIZE": "10000000", "QUEUE_MAX_MEMORY_MB": "8192"}


def add_growth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-prefill",
        type=int,
        default=max(GROWTH_SIZES),
        help="growth table: the largest backlog to fill (default 1,000,000; 100000 skips 1M)",
    )


def quick_growth(args: argparse.Namespace) -> None:
    args.growth_sizes = QUICK_GROWTH_SIZES


def _sizes(args: argparse.Namespace) -> list[int]:
    sizes: Sequence[int] = getattr(args, "growth_sizes", GROWTH_SIZES)
    return [n for n in sizes if n <= args.max_prefill] or [min(sizes)]


@dataclass
class GrowthRow:
    size: int
    workload: Workload
    queued_at_start: int
    fill_s: float
    redis_mb: float
    daemon: list[Measurement] = field(default_factory=list)
    ceiling: list[Measurement] = field(default_factory=list)


async def _redis_mb(client: Redis) -> float:
    info = await client.info("memory")
    return float(info.get("used_memory", 0)) / 2**20


async def _rows(
    url: str, daemon: SessionFactory, ceiling: SessionFactory, args: argparse.Namespace
) -> list[GrowthRow]:
    many = (args.in_flight, args.connections)
    workloads = [
        Workload("dequeue+complete", dequeue_complete, *many, consumes=True),
        Workload("enqueue", enqueue, *many),
    ]
    client = client_for(url, timeout_s=FILL_TIMEOUT_S)
    rows: list[GrowthRow] = []
    try:
        await load_scripts(client)
        for size in _sizes(args):
            start = time.monotonic()
            await fill_backlog(client, size - await queued_in_redis(client), BACKLOG_PAYLOAD)
            fill_s = time.monotonic() - start
            note(f"growth: {size:,} queued (filled in {fill_s:.1f} s)")
            for workload in workloads:
                queued, mb = await queued_in_redis(client), await _redis_mb(client)
                row = GrowthRow(size, workload, queued, fill_s, mb)
                row.ceiling, row.daemon = await compare(
                    [ceiling, daemon], workload, args.ops, args.warmup, args.slices
                )
                rows.append(row)
                note(f"  {workload.label}: daemon {combine(row.daemon).ops_per_s:,.0f} ops/s")
    finally:
        await client.aclose()
    return rows


def run_growth(args: argparse.Namespace) -> str:
    """Start Redis, the daemon and the ceiling; measure every size; the table as Markdown."""
    client = "lean" if "lean" in args.client else args.client[0]
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp, contextlib.ExitStack() as st:
        folder = Path(tmp)
        url = f"unix://{redis_socket(folder)}"
        st.enter_context(redis_running(redis_socket(folder)))
        sock = str(folder / "sidecar.sock")
        st.enter_context(running(daemon_spec(sock, {**ROOM, "REDIS_URL": url})))
        factory = LeanSession.factory if client == "lean" else SidecarSession.factory
        rows = uvloop.run(_rows(url, factory(sock), RedisCeiling(url).factory(), args))
    return format_growth(rows, client)


def format_growth(rows: Sequence[GrowthRow], client: str) -> str:
    head = (
        "queued",
        "workload",
        "queued at start",
        "redis MB",
        "fill s",
        "sidecar ops/s",
        f"sidecar vs {rows[0].size:,}",
        "redis-py ops/s",
        f"redis-py vs {rows[0].size:,}",
        "ratio",
    )
    first: dict[str, tuple[float, float]] = {}
    body = []
    for r in rows:
        d, c = combine(r.daemon).ops_per_s, combine(r.ceiling).ops_per_s
        d0, c0 = first.setdefault(r.workload.label, (d, c))
        ratio = statistics.median(
            a.ops_per_s / b.ops_per_s for a, b in zip(r.daemon, r.ceiling, strict=True)
        )
        body.append(
            (
                f"{r.size:,}",
                f"{r.workload.label} ({client})",
                f"{r.queued_at_start:,}",
                f"{r.redis_mb:,.0f}",
                f"{r.fill_s:.1f}",
                f"{d:,.0f}",
                f"{d / d0:.2f}",
                f"{c:,.0f}",
                f"{c / c0:.2f}",
                f"{ratio:.2f}",
            )
        )
    return markdown_table(head, body)
