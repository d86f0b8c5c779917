"""Run the benchmarks and print the daemon's numbers beside its ceilings', as ratios.

Usage (from the repository root): `.venv/bin/python -m bench.run [--quick] [--mode a,b]`.
Sections, in order: local, redis, journal (ratio tables, here), bullmq (bullmq.py), replay
(journal.py), growth (growth.py), failover (failover.py); see README.md.

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

from bench.bullmq import add_bullmq_args, quick_bullmq, run_bullmq
from bench.failover import add_failover_args, quick_failover, run_failover
from bench.growth import add_growth_args, quick_growth, run_growth
from bench.journal import quick_replay, run_replay
from bench.layouts import layout_env, replicated
from bench.lean import LeanSession
from bench.measure import Measurement, Workload, combine, compare, dequeue_complete, enqueue
from bench.metrics_cost import METRICS_TITLE, run_metrics_cost
from bench.redis_ceiling import RedisCeiling
from bench.redis_server import redis_running, redis_socket
from bench.servers import ServerSpec, daemon_spec, echo_spec, running
from bench.sessions import SessionFactory, SidecarSession
from bench.tables import markdown_table, note, print_section

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
    # Started before both targets and stopped after them (the Redis mode's redis-server).
    backend: Callable[[Path], contextlib.AbstractContextManager[object]] | None = None


# The clients of the sidecar protocol the load generator can drive a server with.
CLIENTS: dict[str, Callable[[str], SessionFactory]] = {
    "lean": LeanSession.factory,
    "AsyncClient": SidecarSession.factory,
}


@contextlib.contextmanager
def _protocol_server(spec: ServerSpec, socket_path: str, client: str) -> Iterator[SessionFactory]:
    with running(spec):
        yield CLIENTS[client](socket_path)


def sidecar_target(
    env: Mapping[str, str | None], client: str, socket_name: str = "sidecar.sock"
) -> TargetStarter:
    """The real daemon with env added to (None: removed from) this process's environment."""

    def start(folder: Path) -> contextlib.AbstractContextManager[SessionFactory]:
        path = str(folder / socket_name)
        return _protocol_server(daemon_spec(path, env), path, client)

    return start


def echo_target(client: str) -> TargetStarter:
    """The echo server: the daemon's framing without the queue."""

    def start(folder: Path) -> contextlib.AbstractContextManager[SessionFactory]:
        path = str(folder / "echo.sock")
        return _protocol_server(echo_spec(path), path, client)

    return start


def redis_backend(folder: Path) -> contextlib.AbstractContextManager[object]:
    """The redis-server both targets of the Redis mode use (the same data, the same size)."""
    return redis_running(redis_socket(folder))


def redis_daemon_target(client: str) -> TargetStarter:
    """The daemon on the mode's redis-server (REDIS_URL set: ResilientQueue over Redis)."""

    def start(folder: Path) -> contextlib.AbstractContextManager[SessionFactory]:
        env = {**QUEUE_ROOM, "REDIS_URL": f"unix://{redis_socket(folder)}"}
        return sidecar_target(env, client)(folder)

    return start


@contextlib.contextmanager
def redis_ceiling_target(folder: Path) -> Iterator[SessionFactory]:
    """Raw redis-py running the daemon's scripts on the mode's redis-server."""
    yield RedisCeiling(f"unix://{redis_socket(folder)}").factory()


def layout_target(how: str, client: str, socket_name: str) -> TargetStarter:
    """The daemon on the replicated layout (bench/layouts.py): single, sentinel or wait1."""

    def start(folder: Path) -> contextlib.AbstractContextManager[SessionFactory]:
        return sidecar_target({**QUEUE_ROOM, **layout_env(folder, how)}, client, socket_name)(
            folder
        )

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
    # The local rows measure the daemon's own path beside the echo, so their journal writes
    # without syncing; the journal rows below show what fsync `always` (the default) costs.
    local_env = {**QUEUE_ROOM, "REDIS_URL": None, "SIDECAR_JOURNAL_FSYNC": "off"}
    local = [
        Mode("local", client, sidecar_target(local_env, client), "echo", echo_target(client),
             workloads)
        for client in args.client
    ]  # fmt: skip
    redis = [
        Mode("redis", client, redis_daemon_target(client), "redis-py", redis_ceiling_target,
             workloads, backend=redis_backend)
        for client in args.client
    ]  # fmt: skip
    # The journal's price: the same local daemon with fsync on every commit, beside one that
    # writes without syncing. One client is enough: the ratio is between two daemons.
    journal_env = {**QUEUE_ROOM, "REDIS_URL": None}
    journal = [
        Mode("journal", client, sidecar_target({**journal_env, "SIDECAR_JOURNAL_FSYNC": "always"},
             client), "fsync off", sidecar_target({**journal_env, "SIDECAR_JOURNAL_FSYNC": "off"},
             client, "off.sock"), journal_workloads(args.in_flight, args.connections))
        for client in args.client[:1]
    ]  # fmt: skip
    # The production layouts, each beside the daemon on the same primary by its plain URL.
    # One client: the ratio is between two daemons.
    layouts = [
        Mode(name, client, layout_target(how, client, f"{how}.sock"), "single URL",
             layout_target("single", client, "single.sock"), workloads, backend=replicated)
        for client in args.client[:1]
        for name, how in (("sentinel", "sentinel"), ("replica-ack", "wait1"))
    ]  # fmt: skip
    return local + redis + journal + layouts


def journal_workloads(in_flight: int, connections: int) -> list[Workload]:
    """Enqueue one at a time, and with in_flight outstanding: over the usual connections, and
    over one connection each (both share one fsync among all requests of a loop pass, since a
    connection's requests run concurrently)."""
    return [
        Workload("enqueue", enqueue),
        Workload("enqueue", enqueue, in_flight, connections),
        Workload("enqueue", enqueue, in_flight, in_flight),
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
        note(f"  {workload.label}: ratio {row.ratio:.2f}")
    return rows


def run_all(selected: Sequence[Mode], args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for mode in selected:
        with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp, contextlib.ExitStack() as st:
            note(f"{mode.name}/{mode.client}: starting the daemon and {mode.ceiling_name}")
            if mode.backend is not None:
                st.enter_context(mode.backend(Path(tmp)))
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
    return markdown_table(head, body)


BULLMQ_TITLE = "bullmq: issue 9's goals, Redis mode beside BullMQ (ratio = sidecar / BullMQ)"
SECTIONS = (
    "local",
    "redis",
    "journal",
    "bullmq",
    "replay",
    "growth",
    "failover",
    "sentinel",
    "replica-ack",
    "metrics",
)
# The layout sections start five more servers, metrics two daemons per mode: run only when named.
OPTIONAL_SECTIONS = ("sentinel", "replica-ack", "metrics")
RATIO_SECTIONS = ("local", "redis", "journal", "sentinel", "replica-ack")
TITLES = {
    "journal": "journal: fsync always beside off (local store, ratio = always / off)",
    "sentinel": "sentinel: through Sentinel beside the plain URL (ratio = sentinel / single)",
    "replica-ack": "replica-ack: WAIT 1 after enqueues beside no WAIT (ratio = wait / single)",
}


def _sections(values: Sequence[str] | None) -> list[str]:
    """--mode values (repeatable, each a comma list) in the run's fixed order."""
    picked = {v.strip() for value in values or [] for v in value.split(",") if v.strip()}
    unknown = picked - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}"
        )
    if not picked:
        return [s for s in SECTIONS if s not in OPTIONAL_SECTIONS]
    return [s for s in SECTIONS if s in picked]


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
    p.add_argument(
        "--mode", action="append", help=f"sections to run, comma-separated: {','.join(SECTIONS)}"
    )
    add_growth_args(p)
    add_failover_args(p)
    add_bullmq_args(p)
    p.add_argument("--quick", action="store_true", help="a smoke run of every section")
    args = p.parse_args(argv)
    try:
        args.sections = _sections(args.mode)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.client = args.client or list(CLIENTS)
    if args.quick:
        args.ops, args.slices = QUICK_OPS, 2
        quick_growth(args)
        quick_replay(args)
        quick_failover(args)
        quick_bullmq(args)
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
    for section in args.sections:
        if section in RATIO_SECTIONS:
            selected = [m for m in modes(args) if m.name == section]
            title = TITLES.get(section, f"{section}: the daemon beside its ceiling")
            print_section(title, format_table(run_all(selected, args)))
        elif section == "bullmq":
            table = run_bullmq(args)
            if table is not None:  # skipped (node missing): run_bullmq said why on stderr
                print_section(BULLMQ_TITLE, table)
        elif section == "replay":
            print_section("replay: restart time of the local store's backlog", run_replay(args))
        elif section == "metrics":
            print_section(METRICS_TITLE, run_metrics_cost(args))
        elif section == "growth":
            print_section("growth: throughput with a backlog queued in Redis", run_growth(args))
        else:
            for title, table in run_failover(args):
                print_section(title, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
