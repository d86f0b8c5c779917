"""BullMQ as the reference row: issue 9's goals for the Redis mode, as ratios in one run.

One redis-server serves both: the daemon in Redis mode driven through the real `AsyncClient`
and `run_worker` (as the README shows), and BullMQ (Node, ioredis) running bullmq/bench.mjs.
Each row runs in slices (--ops / --slices jobs), alternating BullMQ and the sidecar, after one
untimed warm-up slice each; the ratio is the median of the per-slice ratios, so both sides of a
ratio ran under the same load.
BullMQ is installed by this set-up step into bench/bullmq/node_modules (`npm ci`); where node or
npm is missing, or the install fails, the section is skipped with a message saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import uvloop

from bench.payload import TTL_S, llm_request
from bench.redis_server import redis_running, redis_socket
from bench.servers import daemon_spec, relay_spec, running
from bench.tables import markdown_table, note
from sidecar.client import AsyncClient, item, run_worker
from sidecar.protocol import Job

NODE_DIR = Path(__file__).resolve().parent / "bullmq"
MEMORY_JOBS = 100_000
QUICK_MEMORY_JOBS = 1_000
BATCH = 64
ROOM: dict[str, str | None] = {"QUEUE_MAX_SIZE": "10000000", "QUEUE_MAX_MEMORY_MB": "8192"}
NODE_TIMEOUT_S = 600
# (key, workload, goal as sidecar ÷ BullMQ, or None where none is set)
ROWS = (
    ("enqueue_1", "enqueue, 1 in flight", 0.6),
    ("floor", "enqueue, 1 in flight, through a relay that only makes the hop (the floor)", None),
    (
        "floor_enqueue",
        "enqueue, 1 in flight, through a relay that makes the hop and runs the daemon's enqueue "
        "function (the floor with Redis's work)",
        None,
    ),
    ("enqueue_many", "enqueue, {n} in flight on one shared client", 1.0),
    ("enqueue_batches", f"enqueue, batches of {BATCH}", None),
    ("dequeue_complete_1", "dequeue + complete, 1 at a time", 0.6),
    (
        "floor_dequeue_complete",
        "dequeue + complete, 1 at a time, through a relay that makes the hop and runs the "
        "daemon's dequeue and complete functions (the floor with Redis's work)",
        None,
    ),
    ("complete_next_1", "complete_next, 1 at a time / moveToCompleted fetching the next", None),
    ("worker", "run_worker(concurrency={n}) / Worker(concurrency={n})", 1.0),
)


# Rows run through a relay (bench/relay.py) in the slices of the BullMQ row they sit beside:
# row key -> (the relay: "noop" makes the hop, "store" runs the daemon's functions, BullMQ's row)
FLOORS = {
    "floor": ("noop", "enqueue_1"),
    "floor_enqueue": ("store", "enqueue_1"),
    "floor_dequeue_complete": ("store", "dequeue_complete_1"),
}


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
            payload_file = folder / "payload.json"
            payload_file.write_text(json.dumps(llm_request()))
            env = {**ROOM, "REDIS_URL": f"unix://{sock}"}
            path = str(folder / "sidecar.sock")
            relays = {name: str(folder / f"relay-{name}.sock") for name in ("noop", "store")}
            with (
                running(daemon_spec(path, env)) as daemon,
                running(relay_spec(relays["noop"], sock)) as noop,
                running(relay_spec(relays["store"], sock, store=True)) as store,
                NodeBench(sock, args.in_flight, payload_file, server.proc.pid) as theirs,
            ):
                ours = Meter(daemon.pid, server.proc.pid)
                meters = {
                    "noop": Meter(noop.pid, server.proc.pid),
                    "store": Meter(store.pid, server.proc.pid),
                }
                uvloop.run(_alternate(path, relays, sock, args, ours, meters, theirs))
    return _table(ours, meters, theirs, args.in_flight)


class NodeBench:
    """BullMQ's side: one long-lived `node bench.mjs`, asked for one slice of a row at a time."""

    def __init__(self, sock: str, in_flight: int, payload: Path, redis_pid: int) -> None:
        self.argv = ["node", "bench.mjs", sock, str(in_flight), str(payload), str(redis_pid)]
        self.proc: subprocess.Popen[str] | None = None
        self.slices: dict[str, list[dict[str, float]]] = {}
        self.memory = 0.0

    def __enter__(self) -> NodeBench:
        self.proc = subprocess.Popen(
            self.argv, cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(timeout=NODE_TIMEOUT_S) != 0:
            raise RuntimeError(f"node bench.mjs exited with {self.proc.returncode}")

    def ask(self, row: str, n: int) -> dict[str, float]:
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"row": row, "n": n}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node bench.mjs stopped during {row} (exit {self.proc.poll()})")
        reply: dict[str, float] = json.loads(line)
        return reply

    def timed(self, row: str, n: int) -> None:
        self.slices.setdefault(row, []).append(self.ask(row, n))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Per slice of each row: jobs per second, and CPU µs per job of daemon, Redis and client."""

    def __init__(self, daemon_pid: int, redis_pid: int) -> None:
        self.pids = {"daemon": daemon_pid, "redis": redis_pid}
        self.slices: dict[str, list[dict[str, float]]] = {}
        self.memory = 0.0

    async def timed(self, key: str, n: int, run: Callable[[], Awaitable[object]]) -> None:
        before = {name: cpu_s(pid) for name, pid in self.pids.items()}
        mine = time.process_time()
        start = time.perf_counter()
        await run()
        rate = n / (time.perf_counter() - start)
        used = {name: cpu_s(pid) - before[name] for name, pid in self.pids.items()}
        used["client"] = time.process_time() - mine
        cpu = {name: s * 1e6 / n for name, s in used.items()}
        self.slices.setdefault(key, []).append({"rate": rate, **cpu})


def _slice_runs(
    client: AsyncClient, path: str, n: int, in_flight: int
) -> dict[str, Callable[[], Awaitable[tuple[int, Callable[[], Awaitable[object]]]]]]:
    """Per row: set-up (untimed) giving the job count and the timed part of one slice of n."""
    payload = llm_request()

    async def one(i: int) -> None:
        await client.enqueue(payload, priority=i % 10, ttl_s=TTL_S)

    async def sequential() -> None:
        for i in range(n):
            await one(i)

    async def shared() -> None:
        await asyncio.gather(*(_loop(one, -(-n // in_flight)) for _ in range(in_flight)))

    async def batches() -> None:
        for _ in range(-(-n // BATCH)):
            await client.enqueue_many(
                [item(payload, priority=k % 10, ttl_s=TTL_S) for k in range(BATCH)]
            )

    async def dequeue_complete() -> None:
        for _ in range(n):
            [job] = await client.dequeue(1)
            await client.complete(job.queue_id, job.lease_id)

    async def worker() -> None:
        await _worker(path, n, in_flight)

    held: list[Job] = []

    async def complete_next() -> None:
        [job] = held
        for _ in range(n):
            got = await client.complete_next(job.queue_id, job.lease_id, 1)
            [job] = got.items
        held[:] = [job]

    async def complete_next_setup() -> tuple[int, Callable[[], Awaitable[object]]]:
        for job in held:  # the last run's next job, leased and not completed yet
            await client.complete(job.queue_id, job.lease_id)
        await _drain(client)
        await _prefill(client, payload, n + 1)
        held[:] = await client.dequeue(1)  # the first job, before the clock starts
        return n, complete_next

    def enqueue_row(
        count: int, run: Callable[[], Awaitable[object]]
    ) -> Callable[[], Awaitable[tuple[int, Callable[[], Awaitable[object]]]]]:
        async def setup() -> tuple[int, Callable[[], Awaitable[object]]]:
            await _drain(client)  # like BullMQ's side, each slice starts from an empty queue
            return count, run

        return setup

    def dequeue_row(
        run: Callable[[], Awaitable[object]],
    ) -> Callable[[], Awaitable[tuple[int, Callable[[], Awaitable[object]]]]]:
        async def setup() -> tuple[int, Callable[[], Awaitable[object]]]:
            await _drain(client)
            await _prefill(client, payload, n)
            return n, run

        return setup

    return {
        "enqueue_1": enqueue_row(n, sequential),
        "enqueue_many": enqueue_row(-(-n // in_flight) * in_flight, shared),
        "enqueue_batches": enqueue_row(-(-n // BATCH) * BATCH, batches),
        "dequeue_complete_1": dequeue_row(dequeue_complete),
        "complete_next_1": complete_next_setup,
        "worker": dequeue_row(worker),
    }


async def _alternate(
    path: str,
    relays: dict[str, str],
    sock: str,
    args: argparse.Namespace,
    ours: Meter,
    meters: dict[str, Meter],
    theirs: NodeBench,
) -> None:
    """Each row in slices, alternating BullMQ and the sidecar (and who goes first) per slice.

    The floor rows (FLOORS) run AsyncClient through a relay in the slices of the row they sit
    beside, with the same BullMQ slices. Through the relay that makes the hop and has Redis run
    a no-op script, a ratio is the most any daemon could reach here one at a time ("floor");
    through the one that has Redis run the daemon's own functions, the most a daemon doing
    this Redis work could reach ("floor_enqueue", "floor_dequeue_complete"). What the daemon
    adds beyond those is its own work.
    """
    n = max(1, args.ops // args.slices)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(AsyncClient(path))
        relayed = {
            name: await stack.enter_async_context(AsyncClient(sock_path))
            for name, sock_path in relays.items()
        }
        runs = _slice_runs(client, path, n, args.in_flight)
        floor_runs = {
            key: _floor_run(relayed[relay], row, n) for key, (relay, row) in FLOORS.items()
        }
        for key, setup in runs.items():
            beside = [floor for floor, (_, row) in FLOORS.items() if row == key]
            count, run = await setup()  # warm-up, untimed: one slice each
            await run()
            for floor in beside:
                await (await floor_runs[floor]())()
            theirs.ask(key, n)
            for s in range(args.slices):
                count, run = await setup()
                if s % 2:
                    theirs.timed(key, n)
                await ours.timed(key, count, run)
                for floor in beside:
                    floor_run = await floor_runs[floor]()
                    await meters[FLOORS[floor][0]].timed(floor, n, floor_run)
                if not s % 2:
                    theirs.timed(key, n)
            note(f"bullmq: {key}: ratio {_ratio(ours.slices[key], theirs.slices[key]):.2f}")
        await _drain(client)
        ours.memory = await _memory(client, sock, llm_request(), args.memory_jobs)
        theirs.memory = theirs.ask("memory", args.memory_jobs)["bytes_per_job"]


def _floor_run(
    relayed: AsyncClient, row: str, n: int
) -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]]:
    """One slice of n through a relay, as the row it sits beside: its set-up (untimed) gives
    the timed part. The relay answers a dequeue with the echo's canned job whatever Redis
    leased, so its backlog is queued by lone enqueues, one request each, never drained."""
    payload = llm_request()

    async def enqueue() -> None:
        for i in range(n):
            await relayed.enqueue(payload, priority=i % 10, ttl_s=TTL_S)

    async def dequeue_complete() -> None:
        for _ in range(n):
            [job] = await relayed.dequeue(1)
            await relayed.complete(job.queue_id, job.lease_id)

    async def setup() -> Callable[[], Awaitable[None]]:
        if row == "dequeue_complete_1":
            await enqueue()
            return dequeue_complete
        return enqueue

    return setup


def _ratio(mine: list[dict[str, float]], bull: list[dict[str, float]]) -> float:
    """Sidecar over BullMQ: the median of the per-slice ratios (each pair ran back to back)."""
    return statistics.median(m["rate"] / b["rate"] for m, b in zip(mine, bull, strict=True))


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


def _mean(slices: list[dict[str, float]], name: str) -> float:
    return statistics.fmean(s[name] for s in slices)


def _table(ours: Meter, meters: dict[str, Meter], theirs: NodeBench, n: int) -> str:
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
        if key in FLOORS:  # a relay's slices, beside the BullMQ slices of the row it sits by
            relay, row = FLOORS[key]
            mine, bull = meters[relay].slices[key], theirs.slices[row]
        else:
            mine, bull = ours.slices[key], theirs.slices[key]
        ratio = _ratio(mine, bull)
        body.append(
            (
                label.format(n=n),
                f"{statistics.median(m['rate'] for m in mine):,.0f}",
                f"{statistics.median(b['rate'] for b in bull):,.0f}",
                f"{ratio:.2f}",
                "-" if goal is None else f">= {goal:.1f}",
                "-" if goal is None else ("yes" if ratio >= goal else "no"),
                " / ".join(f"{_mean(mine, k):.0f}" for k in ("daemon", "client", "redis")),
                " / ".join(f"{_mean(bull, k):.0f}" for k in ("node", "redis")),
            )
        )
    mine_b, bull_b = ours.memory, theirs.memory
    body.append(
        (
            "Redis used_memory per queued request (bytes)",
            f"{mine_b:,.0f}",
            f"{bull_b:,.0f}",
            f"{mine_b / bull_b:.2f}",
            "<= 1.0",
            "yes" if mine_b <= bull_b else "no",
            "-",
            "-",
        )
    )
    return markdown_table(head, body)
