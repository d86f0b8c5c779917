"""BullMQ as the reference row: issue 9's goals for the Redis mode, as ratios in one run.

One redis-server serves both: the daemon in Redis mode driven through the real `AsyncClient`
and `run_worker` (as the README shows), and BullMQ (Node, ioredis) running bullmq/bench.mjs.
BullMQ is installed by this set-up step into bench/bullmq/node_modules (`npm ci`); where node or
npm is missing, or the install fails, the section is skipped with a message saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import uvloop

from bench.payload import llm_request
from bench.redis_server import redis_running, redis_socket
from bench.servers import daemon_spec, running
from bench.tables import markdown_table, note
from sidecar.client import AsyncClient, item, run_worker
from sidecar.protocol import Job

NODE_DIR = Path(__file__).resolve().parent / "bullmq"
MEMORY_JOBS = 100_000
QUICK_MEMORY_JOBS = 1_000
BATCH = 64
TTL_S = 3600.0
ROOM: dict[str, str | None] = {"QUEUE_MAX_SIZE": "10000000", "QUEUE_MAX_MEMORY_MB": "8192"}
NODE_TIMEOUT_S = 600
# (key, workload, goal as sidecar ÷ BullMQ, or None where the issue sets none)
ROWS = (
    ("enqueue_1", "enqueue, 1 in flight", 0.6),
    ("enqueue_many", "enqueue, {n} in flight on one shared client", 1.0),
    ("enqueue_batches", f"enqueue, batches of {BATCH}", None),
    ("dequeue_complete_1", "dequeue + complete, 1 at a time", 0.6),
    ("worker", "run_worker(concurrency={n}) / Worker(concurrency={n})", 1.0),
)


def add_bullmq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-jobs", type=int, default=MEMORY_JOBS, help="requests queued to measure memory"
    )


def quick_bullmq(args: argparse.Namespace) -> None:
    args.memory_jobs = QUICK_MEMORY_JOBS


def bullmq_unavailable() -> str | None:
    """Why the BullMQ row cannot run here (node or npm missing, install failed), or None."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH"
    if (NODE_DIR / "node_modules" / "bullmq" / "package.json").exists():
        return None
    note("bullmq: installing bullmq and ioredis (npm ci) into bench/bullmq/node_modules")
    proc = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        return f"npm ci failed: {proc.stderr.strip()[-300:]}"
    return None


def run_bullmq(args: argparse.Namespace) -> str | None:
    """The section's table, or None (with a note on stderr) when BullMQ cannot run."""
    why = bullmq_unavailable()
    if why is not None:
        note(f"bullmq: skipped, {why}")
        return None
    with tempfile.TemporaryDirectory(prefix="sc-bullmq-") as tmp:
        folder = Path(tmp)
        sock = redis_socket(folder)
        with redis_running(sock) as server:
            assert server.proc is not None
            redis_pid = server.proc.pid
            env = {**ROOM, "REDIS_URL": f"unix://{sock}"}
            path = str(folder / "sidecar.sock")
            with running(daemon_spec(path, env)) as daemon:
                note("bullmq: the sidecar's rows")
                ours = Meter(daemon.pid, redis_pid)
                uvloop.run(_sidecar_rates(path, sock, args, ours))
            payload_file = folder / "payload.json"
            payload_file.write_text(json.dumps(llm_request()))
            note("bullmq: BullMQ's rows")
            theirs = _bullmq_rates(sock, redis_pid, args, payload_file)
    return _table(ours, theirs, args.in_flight)


def _bullmq_rates(
    sock: str, redis_pid: int, args: argparse.Namespace, payload: Path
) -> dict[str, dict[str, float]]:
    argv = ["node", "bench.mjs", sock, str(args.ops), str(args.in_flight)]
    argv += [str(args.memory_jobs), str(payload), str(redis_pid)]
    proc = subprocess.run(
        argv, cwd=NODE_DIR, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=True
    )
    rows: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Jobs per second of each row, and the CPU µs per job of the daemon, Redis and the client."""

    def __init__(self, daemon_pid: int, redis_pid: int) -> None:
        self.pids = {"daemon": daemon_pid, "redis": redis_pid}
        self.rates: dict[str, float] = {}
        self.cpu: dict[str, dict[str, float]] = {}

    async def timed(self, key: str, n: int, run: Callable[[], Awaitable[object]]) -> None:
        before = {name: cpu_s(pid) for name, pid in self.pids.items()}
        mine = time.process_time()
        start = time.perf_counter()
        await run()
        self.rates[key] = n / (time.perf_counter() - start)
        used = {name: cpu_s(pid) - before[name] for name, pid in self.pids.items()}
        used["client"] = time.process_time() - mine
        self.cpu[key] = {name: s * 1e6 / n for name, s in used.items()}


async def _sidecar_rates(path: str, sock: str, args: argparse.Namespace, meter: Meter) -> None:
    ops, n = args.ops, args.in_flight
    payload = llm_request()
    async with AsyncClient(path) as client:

        async def one(i: int) -> None:
            await client.enqueue(payload, priority=i % 10, ttl_s=TTL_S)

        async def sequential() -> None:
            for i in range(ops):
                await one(i)

        async def shared() -> None:
            per = -(-ops // n)
            await asyncio.gather(*(_loop(one, per) for _ in range(n)))

        async def batches() -> None:
            for _ in range(-(-ops // BATCH)):
                await client.enqueue_many(
                    [item(payload, priority=k % 10, ttl_s=TTL_S) for k in range(BATCH)]
                )

        async def dequeue_complete() -> None:
            for _ in range(ops):
                [job] = await client.dequeue(1)
                await client.complete(job.queue_id, job.lease_id)

        await meter.timed("enqueue_1", ops, sequential)
        await meter.timed("enqueue_many", -(-ops // n) * n, shared)
        await meter.timed("enqueue_batches", -(-ops // BATCH) * BATCH, batches)
        await _drain(client)
        await _prefill(client, payload, ops)
        await meter.timed("dequeue_complete_1", ops, dequeue_complete)
        await _prefill(client, payload, ops)
        await meter.timed("worker", ops, lambda: _worker(path, ops, n))
        await _drain(client)
        meter.rates["memory"] = await _memory(client, sock, payload, args.memory_jobs)


async def _loop(op: Callable[[int], Awaitable[None]], count: int) -> None:
    for i in range(count):
        await op(i)


async def _prefill(client: AsyncClient, payload: object, count: int) -> None:
    for start in range(0, count, 500):
        size = min(500, count - start)
        await client.enqueue_many(
            [item(payload, priority=k % 10, ttl_s=TTL_S) for k in range(size)]
        )


async def _drain(client: AsyncClient) -> None:
    """Settle what earlier rows queued, so each dequeue row starts from its own backlog."""
    while jobs := await client.dequeue(500):
        await asyncio.gather(*(client.complete(j.queue_id, j.lease_id) for j in jobs))


async def _worker(path: str, ops: int, concurrency: int) -> None:
    stop = asyncio.Event()
    handled = 0

    async def handler(job: Job) -> None:
        nonlocal handled
        handled += 1
        if handled >= ops:
            stop.set()

    await run_worker(handler, path=path, concurrency=concurrency, wait_s=0.05, stop=stop)


async def _memory(client: AsyncClient, sock: str, payload: object, count: int) -> float:
    r = redis.Redis(unix_socket_path=sock)
    try:
        before = int(r.info("memory")["used_memory"])
        await _prefill(client, payload, count)
        after = int(r.info("memory")["used_memory"])
    finally:
        r.close()
    return (after - before) / count


def _cpu(per_job: dict[str, float], client: str) -> str:
    return f"{per_job[client]:.0f} / {per_job['redis']:.0f}"


def _table(ours: Meter, theirs: dict[str, dict[str, float]], n: int) -> str:
    head = (
        "workload",
        "sidecar-redis jobs/s",
        "BullMQ jobs/s",
        "ratio",
        "goal",
        "met",
        "sidecar CPU µs/job: daemon / client / redis",
        "BullMQ CPU µs/job: node / redis",
    )
    body = []
    for key, label, goal in ROWS:
        mine, bull = ours.rates[key], theirs[key]["rate"]
        ratio = mine / bull
        cpu = ours.cpu[key]
        body.append(
            (
                label.format(n=n),
                f"{mine:,.0f}",
                f"{bull:,.0f}",
                f"{ratio:.2f}",
                "-" if goal is None else f">= {goal:.1f}",
                "-" if goal is None else ("yes" if ratio >= goal else "no"),
                f"{cpu['daemon']:.0f} / {cpu['client']:.0f} / {cpu['redis']:.0f}",
                _cpu(theirs[key], "node"),
            )
        )
    mine, bull = ours.rates["memory"], theirs["memory"]["bytes_per_job"]
    body.append(
        (
            "Redis used_memory per queued request (bytes)",
            f"{mine:,.0f}",
            f"{bull:,.0f}",
            f"{mine / bull:.2f}",
            "<= 1.0",
            "yes" if mine <= bull else "no",
            "-",
            "-",
        )
    )
    return markdown_table(head, body)
