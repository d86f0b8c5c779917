"""Where a lone enqueue's time goes: the daemon beside a relay that only makes the hop.

`python -m bench.hop [--ops N] [--slices K] [--quick]`: one redis-server on a Unix socket, the
daemon in Redis mode on it, and the relay (`bench/relay.py`): a uvloop Protocol that
has Redis run one no-op script per request and answers a canned reply once Redis has answered,
with none of the daemon's work. Two clients make enqueues one at a time against each, in
slices that alternate the two targets: the lean client (frames and writes, nothing else) and
AsyncClient. Per client and target: the rate and p50 (medians over the slices) and each
process's CPU µs per call. The relay's row is what the extra hop costs on this machine (three
processes, each write waking the next); the daemon's row minus the relay's is the daemon's
own path and the enqueue script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.bullmq import ROOM, cpu_s
from bench.lean import LeanSession
from bench.redis_server import redis_running, redis_socket
from bench.servers import daemon_spec, relay_spec, running
from bench.sessions import SessionFactory, SidecarSession
from bench.tables import markdown_table, note

CLIENTS = ("lean", "AsyncClient")
TARGETS = ("daemon", "relay")


@dataclass
class Samples:
    """One client and target: per slice, the rate, the p50 and each process's CPU per call."""

    rates: list[float] = field(default_factory=list)
    p50s_us: list[float] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)

    def add_cpu(self, name: str, seconds: float, calls: int) -> None:
        self.cpu_us.setdefault(name, []).append(seconds / calls * 1e6)


async def _slice(factory: SessionFactory, calls: int, pids: dict[str, int], out: Samples) -> None:
    session = await factory()
    try:
        for _ in range(max(1, calls // 10)):  # untimed: the connection and caches warm up
            await session.enqueue()
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        client_before = time.process_time()
        latencies = []
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter_ns()
            await session.enqueue()
            latencies.append(time.perf_counter_ns() - t)
        elapsed = time.perf_counter() - start
        out.add_cpu("client", time.process_time() - client_before, calls)
        for name, pid in pids.items():
            out.add_cpu(name, cpu_s(pid) - before[name], calls)
        out.rates.append(calls / elapsed)
        out.p50s_us.append(statistics.median(latencies) / 1000)
    finally:
        await session.close()


async def measure(
    paths: dict[str, str], pids: dict[str, int], redis_pid: int, calls: int, slices: int
) -> dict[tuple[str, str], Samples]:
    factories = {"lean": LeanSession.factory, "AsyncClient": SidecarSession.factory}
    results = {(c, t): Samples() for c in CLIENTS for t in TARGETS}
    for k in range(slices):
        for client in CLIENTS:
            order = TARGETS if k % 2 == 0 else TARGETS[::-1]  # who goes first alternates
            for target in order:
                procs = {"server": pids[target], "redis": redis_pid}
                factory = factories[client](paths[target])
                await _slice(factory, calls, procs, results[(client, target)])
        note(f"hop: slice {k + 1} of {slices}")
    return results


def table(results: dict[tuple[str, str], Samples]) -> str:
    head = ["client", "target", "calls/s", "p50 µs", "CPU µs per call: client / server / redis"]
    body = []
    for (client, target), s in results.items():
        cpu = " / ".join(f"{statistics.median(s.cpu_us[n]):.0f}"
                         for n in ("client", "server", "redis"))  # fmt: skip
        body.append([client, target, f"{statistics.median(s.rates):,.0f}",
                     f"{statistics.median(s.p50s_us):.0f}", cpu])  # fmt: skip
    return markdown_table(head, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__.split("\n")[0])
    p.add_argument("--ops", type=int, default=20_000, help="timed enqueues per client and target")
    p.add_argument("--slices", type=int, default=4, help="alternations between the targets")
    p.add_argument("--quick", action="store_true", help="a few hundred calls: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.ops, args.slices = 400, 2
    calls = max(1, args.ops // args.slices)
    with tempfile.TemporaryDirectory(prefix="sidecar-hop-") as tmp:
        folder = Path(tmp)
        redis_path = redis_socket(folder)
        paths = {"daemon": str(folder / "daemon.sock"), "relay": str(folder / "relay.sock")}
        relay = relay_spec(paths["relay"], redis_path)
        with redis_running(redis_path) as redis_proc:
            assert redis_proc.proc is not None
            env = {**ROOM, "REDIS_URL": redis_proc.url}
            with running(daemon_spec(paths["daemon"], env)) as daemon, running(relay) as rel:
                pids = {"daemon": daemon.pid, "relay": rel.pid}
                results = uvloop.run(measure(paths, pids, redis_proc.proc.pid, calls, args.slices))
    print("## hop: a lone enqueue through the daemon, and through a relay that only makes the hop")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
