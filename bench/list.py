"""A page of `list` over a deep Redis queue, and enqueues while an operator pages (issue 23).

`.venv/bin/python -m bench.list [--count 1000000] [--seconds 10]`: the real daemon in Redis
mode on its own redis-server. It fills the queue with `--count` small queued requests (batches
of enqueue), then measures:

- the latency of one page (`list queued`, 50 items) at the head, deep in the list (following
  the cursor), newest first, with a priority filter, and of `list failed` (dead letters), as
  p50 and p99 over `--pages` calls each (goal: p99 under 50 ms over a million queued);
- enqueue throughput (single enqueues from `--producers` concurrent tasks of one client) for
  `--seconds` idle, then for `--seconds` while an operator pages through the list
  (`--operator-rate` pages a second, 5 by default: faster than anyone reads; 0 pages back to
  back, as fast as replies come), and the ratio (goal: >= 0.9).

Prints Markdown tables on stdout; progress on stderr. Not run in CI: a full run fills a
million requests and takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from bench.redis_server import redis_running
from bench.servers import daemon_spec, running
from bench.tables import markdown_table, note
from sidecar.client import AsyncClient, item

BATCH = 1000
PAGE = 50


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fill(client: AsyncClient, count: int) -> float:
    """Enqueue count small requests (priorities 0-9 in turn) in batches; returns seconds."""
    began = time.perf_counter()
    sent = 0
    while sent < count:
        n = min(BATCH, count - sent)
        await client.enqueue_many(
            [item({"p": "x" * 64, "i": sent + i}, priority=(sent + i) % 10) for i in range(n)]
        )
        sent += n
        if sent % 100_000 == 0:
            note(f"filled {sent}")
    return time.perf_counter() - began


async def page_latencies(client: AsyncClient, pages: int, **query: object) -> list[float]:
    """Milliseconds of `pages` calls of one list, following the cursor."""
    times: list[float] = []
    cursor = None
    for _ in range(pages):
        began = time.perf_counter()
        page = await client.list(cursor=cursor, limit=PAGE, **query)  # type: ignore[arg-type]
        times.append((time.perf_counter() - began) * 1000)
        cursor = page.next_cursor
    return times


async def enqueue_rate(client: AsyncClient, seconds: float, producers: int) -> float:
    """Single enqueues per second from `producers` concurrent tasks for `seconds`."""
    done = 0
    stop = time.perf_counter() + seconds

    async def producer() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.enqueue({"p": "y" * 64})
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(producers)))
    return done / (time.perf_counter() - began)


async def operator(
    client: AsyncClient, stop: asyncio.Event, counted: list[int], rate: float
) -> None:
    """Pages through the queued list at `rate` pages a second (0: back to back) until told to
    stop."""
    cursor = None
    began = time.perf_counter()
    while not stop.is_set():
        page = await client.list("queued", cursor=cursor, limit=PAGE)
        counted[0] += 1
        cursor = page.next_cursor
        if rate > 0:
            due = began + counted[0] / rate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))


async def measure(socket_path: str, args: argparse.Namespace) -> None:
    async with AsyncClient(socket_path) as client:
        note(f"filling {args.count} queued requests")
        fill_s = await fill(client, args.count)
        rows = []
        for name, query in (
            ("queued, oldest first (following the cursor)", {"status": "queued"}),
            ("queued, newest first", {"status": "queued", "order": "newest"}),
            ("queued, priority 7 only", {"status": "queued", "priority": 7}),
            ("failed (no dead letters)", {"status": "failed"}),
        ):
            times = await page_latencies(client, args.pages, **query)
            rows.append([name, f"{_pct(times, 0.5):.2f}", f"{_pct(times, 0.99):.2f}",
                         f"{max(times):.2f}"])  # fmt: skip
        print(f"\n{args.count:,} queued requests in Redis (filled in {fill_s:.1f} s); "
              f"pages of {PAGE}, {args.pages} calls each\n")  # fmt: skip
        print(markdown_table(["list", "p50 ms", "p99 ms", "max ms"], rows))

        # Idle and paged windows alternate (--rounds pairs), so a change in the machine's load
        # between two windows shows as spread between pairs rather than as the ratio.
        pairs: list[tuple[float, float, float]] = []
        async with AsyncClient(socket_path) as op_client:
            for n in range(args.rounds):
                note(f"round {n + 1}: enqueue throughput, idle, then while an operator pages")
                idle = await enqueue_rate(client, args.seconds, args.producers)
                stop = asyncio.Event()
                counted = [0]
                paging = asyncio.ensure_future(
                    operator(op_client, stop, counted, args.operator_rate)
                )
                busy = await enqueue_rate(client, args.seconds, args.producers)
                stop.set()
                await paging
                pairs.append((idle, busy, counted[0] / args.seconds))
        rows = [[f"round {n + 1}", f"{idle:,.0f}", f"{busy:,.0f}", f"{rate:.0f}",
                 f"{busy / idle:.2f}"] for n, (idle, busy, rate) in enumerate(pairs)]  # fmt: skip
        ratios = sorted(busy / idle for idle, busy, _ in pairs)
        rows.append(["median", "", "", "", f"{ratios[len(ratios) // 2]:.2f}"])
        print()
        print(markdown_table(
            ["enqueue (single, concurrent)", "idle /s", "while paging /s", "pages/s",
             "ratio"], rows))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="idle/paged pairs (3)")
    parser.add_argument("--producers", type=int, default=64)
    parser.add_argument("--operator-rate", type=float, default=5.0,
                        help="pages a second while enqueues run (0: back to back)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sl", dir="/tmp") as tmp:
        folder = Path(tmp)
        with redis_running(str(folder / "r.sock")) as redis:
            spec = daemon_spec(
                str(folder / "s.sock"),
                {"REDIS_URL": redis.url, "SIDECAR_METRICS_ADDR": None},
            )
            with running(spec):
                asyncio.run(measure(str(folder / "s.sock"), args))


if __name__ == "__main__":
    main()
