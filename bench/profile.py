"""Where the daemon's time goes: py-spy (native frames) on the real daemon under the bench's load.

`python -m bench.profile [--store local,local-fsync,redis] [--op enqueue,dequeue+complete]
[--in-flight 1,64] [--seconds 20] [--raw-dir DIR]` (from the repository root, as root or with
ptrace allowed). Per case, the real daemon (`python -m sidecar serve`, as `bench.run` starts
it) serves the lean client (`bench/lean.py`) from this process, one operation at a time or
with 64 in flight over 8 connections (`bench.measure`'s workloads), while `py-spy record
--native --threads --nolineno --format raw` attaches to it in windows of `--window` seconds.
A dequeue case queues, untimed and between windows, what its next window will take; nothing
is sampled while it does. The stacks are folded by `bench/stacks.py` into a table of buckets
and one of the top frames, printed as Markdown on stdout (progress on stderr).

Stores: `local` (no REDIS_URL, SIDECAR_JOURNAL_FSYNC=off, as the bench's local rows),
`local-fsync` (the default `always`: a reply waits for its loop pass's fdatasync) and `redis`
(REDIS_URL on a redis-server started here: ResilientQueue over Redis). Default: every store
with `enqueue`, `local` and `redis` with `dequeue+complete`, each at 1 and 64 in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench.bullmq import cpu_s
from bench.lean import LeanSession
from bench.measure import Op, dequeue_complete, enqueue
from bench.redis_server import redis_running, redis_socket
from bench.run import QUEUE_ROOM
from bench.servers import daemon_spec, running
from bench.sessions import EmptyQueue, Session
from bench.stacks import Profile, bucket_table, fold, frame_table, parse_raw
from bench.tables import note

STORES: dict[str, dict[str, str | None]] = {
    "local": {"REDIS_URL": None, "SIDECAR_JOURNAL_FSYNC": "off"},
    "local-fsync": {"REDIS_URL": None, "SIDECAR_JOURNAL_FSYNC": "always"},
    "redis": {},  # REDIS_URL is set once the run's redis-server has a socket
}
OPS: dict[str, Op] = {"enqueue": enqueue, "dequeue+complete": dequeue_complete}
DEFAULT_CASES = (
    ("local", "enqueue"),
    ("local-fsync", "enqueue"),
    ("local", "dequeue+complete"),
    ("redis", "enqueue"),
    ("redis", "dequeue+complete"),
)
CONNECTIONS_MANY = 8  # in flight > 1 is spread over this many connections, as bench.run does
WARMUP_S = 1.0
# A dequeue window is given this many times what the last one took (py-spy's pauses only slow
# the daemon down, so an estimate from an unsampled run is high, which is the safe side).
REFILL_MARGIN = 2.0
PYSPY_TIMEOUT_S = 60.0


class ProfileError(RuntimeError):
    """py-spy is missing, cannot attach, or failed."""


@dataclass(frozen=True)
class Case:
    store: str
    op: str
    in_flight: int

    @property
    def connections(self) -> int:
        return 1 if self.in_flight == 1 else min(CONNECTIONS_MANY, self.in_flight)

    @property
    def title(self) -> str:
        many = f" ({self.connections} conn x {self.in_flight // self.connections})"
        return f"{self.store} {self.op} x{self.in_flight}" + (many if self.in_flight > 1 else "")


@dataclass
class Result:
    case: Case
    raw: Counter[str] = field(default_factory=Counter)  # raw stack line -> samples
    ops: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0

    def profile(self) -> Profile:
        return fold(parse_raw(f"{line} {n}" for line, n in self.raw.items()))


def pyspy_path() -> str | None:
    """py-spy beside this Python (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def pyspy_problem() -> str | None:
    """Why py-spy cannot sample a process here (None: it can): attach to a sleeping child."""
    exe = pyspy_path()
    if exe is None:
        return "py-spy is not installed (.venv/bin/pip install py-spy)"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        done = subprocess.run(
            [exe, "dump", "--native", "--pid", str(child.pid)],
            capture_output=True, text=True, timeout=PYSPY_TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "py-spy dump timed out attaching to a child process"
    finally:
        child.kill()
        child.wait()
    if done.returncode != 0:
        return f"py-spy cannot attach (ptrace refused?): {done.stderr.strip()[-300:]}"
    return None


async def _drive(
    sessions: Sequence[Session], op: Op, in_flight: int, until: asyncio.Future[Any]
) -> tuple[int, float]:
    """Run op from in_flight tasks over sessions until `until` ends: the count that answered
    and the seconds the load ran. A dequeue that finds the queue empty stops the load early
    (the sampler then sees the daemon idle, which the folding leaves out)."""
    done = 0
    start = time.perf_counter()
    stopped: list[float] = []

    async def worker(session: Session) -> None:
        nonlocal done
        while not until.done() and not stopped:
            try:
                await op(session)
            except EmptyQueue:
                if not stopped:
                    stopped.append(time.perf_counter())
                    note("  the queue ran empty before the window ended")
                return
            done += 1

    async with asyncio.TaskGroup() as group:
        for k in range(in_flight):
            group.create_task(worker(sessions[k % len(sessions)]))
        await asyncio.wait([until])
    return done, (stopped[0] if stopped else time.perf_counter()) - start


async def _record(pid: int, seconds: int, rate: int, out: Path) -> asyncio.subprocess.Process:
    exe = pyspy_path()
    if exe is None:
        raise ProfileError("py-spy is not installed (.venv/bin/pip install py-spy)")
    argv = [exe, "record", "--native", "--threads", "--nolineno", "--format", "raw"]
    argv += ["--rate", str(rate), "--duration", str(seconds), "--pid", str(pid), "-o", str(out)]
    return await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )


async def _profile(
    case: Case, socket_path: str, pid: int, args: argparse.Namespace, raw_dir: Path
) -> Result:
    result = Result(case)
    factory = LeanSession.factory(socket_path)
    sessions = [await factory() for _ in range(case.connections)]
    op = OPS[case.op]
    consumes = case.op == "dequeue+complete"
    try:
        queued = 0
        warm = 20_000 if case.in_flight == 1 else 50_000
        if consumes:
            await sessions[0].prefill(warm)
            queued = warm
        warmup = asyncio.ensure_future(asyncio.sleep(WARMUP_S))
        done, ran_s = await _drive(sessions, op, case.in_flight, warmup)
        rate = done / ran_s
        queued -= done
        windows = max(1, math.ceil(args.seconds / args.window))
        for k in range(windows):
            window = min(args.window, args.seconds - k * args.window)
            if consumes:  # untimed and unsampled: what this window will take, with room
                need = math.ceil(rate * (window + 2) * REFILL_MARGIN) + 2 * case.in_flight
                if need > queued:
                    await sessions[0].prefill(need - queued)
                    queued = need
            out = raw_dir / f"{case.store}-{case.op}-x{case.in_flight}-{k}.raw"
            cpu0 = cpu_s(pid)
            spy = await _record(pid, window, args.rate, out)
            done, ran_s = await _drive(
                sessions, op, case.in_flight, asyncio.ensure_future(spy.wait())
            )
            result.cpu_s += cpu_s(pid) - cpu0
            result.seconds += ran_s
            result.ops += done
            queued -= done
            rate = done / ran_s
            assert spy.stderr is not None
            err = (await spy.stderr.read()).decode(errors="replace")
            if spy.returncode != 0 or not out.exists():
                raise ProfileError(f"py-spy record failed ({spy.returncode}): {err[-500:]}")
            for line in out.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if stack and n.isdigit():
                    result.raw[stack] += int(n)
    finally:
        for s in sessions:
            await s.close()
    return result


@contextlib.contextmanager
def _daemon(store: str, folder: Path) -> Iterator[tuple[str, int]]:
    """The daemon configured for store (and its redis-server): its socket path and pid."""
    with contextlib.ExitStack() as stack:
        env = {**QUEUE_ROOM, **STORES[store]}
        if store == "redis":
            stack.enter_context(redis_running(redis_socket(folder)))
            env["REDIS_URL"] = f"unix://{redis_socket(folder)}"
        path = str(folder / "sidecar.sock")
        proc = stack.enter_context(running(daemon_spec(path, env)))
        yield path, proc.pid


def run_case(case: Case, args: argparse.Namespace, raw_dir: Path) -> Result:
    """A fresh daemon (and redis-server) for the case, profiled under its load."""
    with (
        tempfile.TemporaryDirectory(prefix="sc-profile-") as tmp,
        _daemon(case.store, Path(tmp)) as (path, pid),
    ):
        return uvloop.run(_profile(case, path, pid, args, raw_dir))


def format_result(result: Result, top: int) -> str:
    """The case's heading line, its bucket table and its top-frames table."""
    p = result.profile()
    rate = result.ops / result.seconds if result.seconds else 0.0
    cpu_us = result.cpu_s / result.ops * 1e6 if result.ops else 0.0
    core = 100.0 * result.cpu_s / result.seconds if result.seconds else 0.0
    other = sum(p.others.values())
    lines = [
        f"### {result.case.title}",
        "",
        f"{p.busy:,} busy samples of the event-loop thread, {other:,} in other threads; "
        f"{rate:,.0f} ops/s under the sampler; daemon CPU {cpu_us:,.0f} µs per op "
        f"({core:.0f}% of a core).",
    ]
    if other:
        shown = ", ".join(f"{f}: {n}" for f, n in p.others.most_common(3))
        lines.append(f"Other threads' busy samples, top: {shown}.")
    lines += ["", bucket_table(p), "", frame_table(p, top), ""]
    return "\n".join(lines)


def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def cases(args: argparse.Namespace) -> list[Case]:
    stores, ops = _split(args.store), _split(args.op)
    for name, known in (("store", STORES), ("op", OPS)):
        unknown = set(stores if name == "store" else ops) - set(known)
        if unknown:
            known_names = ", ".join(known)
            raise SystemExit(f"unknown --{name} {', '.join(sorted(unknown))}; known: {known_names}")
    pairs = [
        (s, o)
        for s, o in DEFAULT_CASES
        + tuple((s, o) for s in stores for o in ops if (s, o) not in DEFAULT_CASES)
        if (not stores or s in stores) and (not ops or o in ops)
    ]
    return [Case(s, o, n) for s, o in pairs for n in args.in_flight]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--store", action="append", help=f"comma list of {', '.join(STORES)}")
    p.add_argument("--op", action="append", help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--in-flight", default="1,64", help="comma list (default: 1,64)")
    p.add_argument("--seconds", type=int, default=20, help="sampled seconds per case")
    p.add_argument("--window", type=int, default=5, help="seconds per py-spy attach")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=15, help="frames per list")
    p.add_argument("--raw-dir", type=Path, help="keep py-spy's raw files here (flamegraph.pl)")
    args = p.parse_args(argv)
    args.in_flight = [int(n) for n in _split([args.in_flight])]
    if min(args.seconds, args.window, args.rate, args.top, *args.in_flight) < 1:
        p.error("--seconds, --window, --rate, --top and --in-flight must be at least 1")
    bad = [n for n in args.in_flight if n > 1 and n % min(CONNECTIONS_MANY, n)]
    if bad:
        p.error(f"--in-flight above 1 must be a multiple of {CONNECTIONS_MANY}: {bad}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    selected = cases(args)
    problem = pyspy_problem()
    if problem is not None:
        note(problem)
        return 2
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = f"## Profiles, {stamp}: {args.seconds} s sampled per case at {args.rate} Hz\n"
    print(head, flush=True)
    with contextlib.ExitStack() as stack:
        raw_dir = args.raw_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        raw_dir.mkdir(parents=True, exist_ok=True)
        for case in selected:
            note(f"{case.title}: profiling {args.seconds} s")
            print(format_result(run_case(case, args, raw_dir), args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
