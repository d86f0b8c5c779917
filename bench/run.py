"""Run the benchmarks and print the daemon's numbers beside its ceilings', as ratios.

Usage (from the repository root): `.venv/bin/python -m bench.run [--quick] [--ops N]`.

Each mode starts the daemon and its ceiling as processes of their own (the load generator is a
third), then runs every workload against both, alternating slices of it between them. Absolute
numbers on a shared machine drift from minute to minute; the ratio of runs made within the
same seconds is what to compare between commits.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.lean import LeanSession
from bench.measure import Measurement, Workload, combine, compare, dequeue_complete, enqueue
from bench.servers import ServerSpec, daemon_spec, echo_spec, running
from bench.sessions import SessionFactory, SidecarSession

DEFAULT_OPS = 20_000
QUICK_OPS = 300
# Enough room that no workload meets the local queue's limits (or its watermark breaker).
QUEUE_ROOM: dict[str, str | None] = {"QUEUE_MAX_SIZE": "10000000", "QUEUE_MAX_MEMORY_MB": "8192"}

# A target is started inside a temporary folder and yields how to open sessions to it.
TargetStarter = Callable[[Path], contextlib.AbstractContextManager[SessionFactory]]


@dataclass(frozen=True)
class Mode:
    """The daemon configured one way, the ceiling it is compared with, and the workloads."""

    name: str
    # Which client the load generator speaks through (a ceiling of its own may ignore it).
    client: str
    daemon: TargetStarter
    ceiling_name: str
    ceiling: TargetStarter
    workloads: Sequence[Workload] = field(default_factory=tuple)


# The clients of the sidecar protocol the load generator can drive a server with.
CLIENTS: dict[str, Callable[[str], SessionFactory]] = {
    "lean": LeanSession.factory,
    "AsyncClient": SidecarSession.factory,
}


@contextlib.contextmanager
def _protocol_server(spec: ServerSpec, socket_path: str, client: str) -> Iterator[SessionFactory]:
    with running(spec):
        yield CLIENTS[client](socket_path)


def sidecar_target(env: Mapping[str, str | None], client: str) -> TargetStarter:
    """The real daemon with env added to (None: removed from) this process's environment."""

    def start(folder: Path) -> contextlib.AbstractContextManager[SessionFactory]:
        path = str(folder / "sidecar.sock")
        return _protocol_server(daemon_spec(path, env), path, client)

    return start


def echo_target(client: str) -> TargetStarter:
    """The echo server: the daemon's framing without the queue."""

    def start(folder: Path) -> contextlib.AbstractContextManager[SessionFactory]:
        path = str(folder / "echo.sock")
        return _protocol_server(echo_spec(path), path, client)

    return start


def standard_workloads(in_flight: int, connections: int) -> list[Workload]:
    """Enqueue, and dequeue+complete, with one request in flight and with many."""
    return [
        Workload("enqueue", enqueue),
        Workload("enqueue", enqueue, in_flight, connections),
        Workload("dequeue+complete", dequeue_complete, consumes=True),
        Workload("dequeue+complete", dequeue_complete, in_flight, connections, consumes=True),
    ]


def modes(args: argparse.Namespace) -> list[Mode]:
    """Every mode the bench knows; a new one is a daemon environment and a ceiling."""
    workloads = standard_workloads(args.in_flight, args.connections)
    local_env = {**QUEUE_ROOM, "REDIS_URL": None}
    return [
        Mode(
            "local",
            client,
            sidecar_target(local_env, client),
            "echo",
            echo_target(client),
            workloads,
        )
        for client in args.client
    ]


# -- running and reporting -------------------------------------------------------------------


@dataclass
class Row:
    """One workload of one mode: a measurement of each target per slice."""

    mode: Mode
    workload: Workload
    daemon: list[Measurement] = field(default_factory=list)
    ceiling: list[Measurement] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Daemon throughput over the ceiling's: the median over slices (each a paired run)."""
        return statistics.median(
            d.ops_per_s / c.ops_per_s for d, c in zip(self.daemon, self.ceiling, strict=True)
        )


async def run_mode(
    mode: Mode, daemon: SessionFactory, ceiling: SessionFactory, args: argparse.Namespace
) -> list[Row]:
    rows = []
    for workload in mode.workloads:
        row = Row(mode, workload)
        row.ceiling, row.daemon = await compare(
            [ceiling, daemon], workload, args.ops, args.warmup, args.slices
        )
        rows.append(row)
        print(f"  {workload.label}: ratio {row.ratio:.2f}", file=sys.stderr)
    return rows


def run_all(selected: Sequence[Mode], args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for mode in selected:
        with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp, contextlib.ExitStack() as st:
            print(
                f"{mode.name}/{mode.client}: starting the daemon and {mode.ceiling_name}",
                file=sys.stderr,
            )
            daemon = st.enter_context(mode.daemon(Path(tmp)))
            ceiling = st.enter_context(mode.ceiling(Path(tmp)))
            rows += uvloop.run(run_mode(mode, daemon, ceiling, args))
    return rows


def _cells(ms: Sequence[Measurement]) -> tuple[str, str]:
    """Throughput, and p50 / p99 latency, of a target's slices taken together."""
    whole = combine(ms)
    return (
        f"{whole.ops_per_s:,.0f}",
        f"{whole.percentile_us(50):.0f} / {whole.percentile_us(99):.0f}",
    )


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: one line per workload, the daemon beside its ceiling."""
    head = (
        "mode",
        "client",
        "workload",
        "sidecar ops/s",
        "ceiling",
        "ceiling ops/s",
        "ratio",
        "sidecar p50 / p99 µs",
        "ceiling p50 / p99 µs",
    )
    body = []
    for r in rows:
        (daemon_rate, daemon_lat), (ceiling_rate, ceiling_lat) = _cells(r.daemon), _cells(r.ceiling)
        body.append(
            (
                r.mode.name,
                r.mode.client,
                r.workload.label,
                daemon_rate,
                r.mode.ceiling_name,
                ceiling_rate,
                f"{r.ratio:.2f}",
                daemon_lat,
                ceiling_lat,
            )
        )
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *(line(b) for b in body)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--ops", type=int, default=DEFAULT_OPS, help="timed operations per run")
    p.add_argument("--warmup", type=int, help="untimed operations first (default: ops / 10)")
    p.add_argument(
        "--slices", type=int, default=10, help="alternations between daemon and ceiling per row"
    )
    p.add_argument("--in-flight", type=int, default=64, help="concurrency of the 'many' rows")
    p.add_argument("--connections", type=int, default=8, help="connections the 'many' share")
    p.add_argument("--client", action="append", choices=sorted(CLIENTS), help="default: all")
    p.add_argument("--mode", action="append", help="run only this mode (repeatable)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a second or two")
    args = p.parse_args(argv)
    args.client = args.client or list(CLIENTS)
    if args.quick:
        args.ops, args.slices = QUICK_OPS, 2
    if args.warmup is None:
        args.warmup = args.ops // 10
    if min(args.ops, args.slices, args.in_flight, args.connections) < 1:
        p.error("--ops, --slices, --in-flight and --connections must be at least 1")
    if args.ops < args.slices:
        p.error("--ops must be at least --slices")
    if args.in_flight % args.connections:
        p.error("--in-flight must be a multiple of --connections")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    known = modes(args)
    selected = [m for m in known if not args.mode or m.name in args.mode]
    if not selected:
        print(f"no such mode; known: {', '.join(m.name for m in known)}", file=sys.stderr)
        return 2
    rows = run_all(selected, args)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
