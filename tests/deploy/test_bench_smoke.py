"""The benchmark still runs: `python -m bench.run --quick` exits 0 and prints every section.

It asserts nothing about speed; the numbers of a few-second run on a shared machine mean little.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from redis.asyncio import Redis

from bench.echo_server import EchoConnection, canned_results
from bench.growth import QUICK_GROWTH_SIZES
from bench.journal import QUICK_REPLAY_SIZES
from bench.payload import TTL_S, llm_request
from bench.relay import RELAY_PREFIX
from bench.run import modes, parse_args
from bench.servers import relay_spec, running
from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.models import QueueStatus
from tests.support.redis_server import (
    RedisServer,
    redis_queue_for,
    redis_server_fixture,  # noqa: F401
)

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT_S = 180

Table = list[dict[str, str]]


def _sections(stdout: str) -> dict[str, Table]:
    """Each `## title` of stdout and the rows of the Markdown table under it, keyed by header."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], [])
        elif line.startswith("|") and current is not None:
            current.append(line)
    tables: dict[str, Table] = {}
    for title, lines in sections.items():
        assert len(lines) >= 2, f"no table under {title!r}:\n{stdout}"
        head = [cell.strip() for cell in lines[0].strip("|").split("|")]
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
        tables[title] = [dict(zip(head, row, strict=True)) for row in rows]
    return tables


def _bench(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the repository root; it must exit 0 (its output shown if not)."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _section(tables: dict[str, Table], prefix: str) -> Table:
    found = [rows for title, rows in tables.items() if title.startswith(prefix)]
    assert len(found) == 1, f"expected one section {prefix!r}, got {list(tables)}"
    return found[0]


def _check_ratio_table(rows: Table, mode_name: str) -> None:
    expected = [
        (mode.name, mode.client, workload.label)
        for mode in modes(parse_args(["--quick"]))
        if mode.name == mode_name
        for workload in mode.workloads
    ]
    assert [(r["mode"], r["client"], r["workload"]) for r in rows] == expected
    for row in rows:
        assert _number(row["ratio"]) > 0, row
        assert _number(row["sidecar ops/s"]) > 0, row
        assert _number(row["ceiling ops/s"]) > 0, row


def _check_growth(rows: Table) -> None:
    sizes = [_number(r["queued"]) for r in rows]
    assert sizes == [n for n in QUICK_GROWTH_SIZES for _ in range(2)], rows
    assert [r["workload"].split(" ")[0] for r in rows[:2]] == ["dequeue+complete", "enqueue"]
    for row in rows:
        assert _number(row["queued at start"]) >= _number(row["queued"]), row
        assert _number(row["sidecar ops/s"]) > 0, row
        assert _number(row["redis-py ops/s"]) > 0, row
        assert _number(row["ratio"]) > 0, row


def _check_failover(switch: Table, move: Table) -> None:
    assert [r["fault"] for r in switch] == ["SIGKILL", "SIGSTOP"]
    assert [r["fault"] for r in move] == ["SIGKILL", "SIGSTOP"]
    for row in switch:
        assert _number(row["mode switch ms"]) >= 0, row
        assert _number(row["worst enqueue ms"]) >= 0, row
        assert _number(row["enqueue errors"]) >= 0, row
    for row in move:
        assert _number(row["local backlog"]) > 0, row
        assert _number(row["moved / s"]) > 0, row


def _check_replay(rows: Table) -> None:
    assert [r["stopped by"] for r in rows] == ["SIGKILL: segment", "SIGTERM: snapshot"]
    for row in rows:
        assert _number(row["queued"]) == QUICK_REPLAY_SIZES[0], row
        assert _number(row["records read"]) > _number(row["queued"]), row
        assert _number(row["replay s"]) >= 0 and _number(row["start to serving s"]) > 0, row


@pytest.mark.slow
@pytest.mark.timeout(BENCH_TIMEOUT_S + 30)
def test_quick_bench_prints_every_section() -> None:
    proc = _bench("bench.run", "--quick", timeout_s=BENCH_TIMEOUT_S)
    tables = _sections(proc.stdout)
    _check_ratio_table(_section(tables, "local:"), "local")
    _check_ratio_table(_section(tables, "redis:"), "redis")
    _check_ratio_table(_section(tables, "journal:"), "journal")
    _check_replay(_section(tables, "replay:"))
    _check_growth(_section(tables, "growth:"))
    _check_failover(
        _section(tables, "failover: the switch"), _section(tables, "failover: the move")
    )


def test_layout_sections_run_only_when_named() -> None:
    default = parse_args([])
    assert "sentinel" not in default.sections and "replica-ack" not in default.sections
    named = parse_args(["--mode", "sentinel,replica-ack"])
    assert named.sections == ["sentinel", "replica-ack"]
    layouts = {m.name: m.ceiling_name for m in modes(named) if m.backend is not None}
    assert layouts["sentinel"] == layouts["replica-ack"] == "single URL"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_llm_bench_prints_its_ratios() -> None:
    proc = _bench("bench.llm", "--quick", timeout_s=90)
    rows = _section(_sections(proc.stdout), "llm:")
    assert [r["way"] for r in rows] == ["direct", "gateway fresh", "gateway queued"]
    assert _number(rows[0]["ratio over direct"]) == 1.0
    for row in rows:
        assert _number(row["ratio over direct"]) > 0 and _number(row["median µs per call"]) > 0
    assert "llm_" not in proc.stdout  # the decision log lines stay out of the tables


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_hop_bench_prints_the_daemon_beside_the_relay() -> None:
    proc = _bench("bench.hop", "--quick", timeout_s=90)
    rows = _section(_sections(proc.stdout), "hop:")
    assert [(r["client"], r["target"]) for r in rows] == [
        ("lean", "daemon"), ("lean", "relay"), ("AsyncClient", "daemon"), ("AsyncClient", "relay")
    ]
    for row in rows:
        assert _number(row["calls/s"]) > 0 and _number(row["p50 µs"]) > 0


@pytest.mark.slow
@pytest.mark.timeout(BENCH_TIMEOUT_S + 30)
def test_quick_bullmq_section_prints_every_goal() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the BullMQ row needs {' and '.join(missing)}")
    proc = _bench("bench.run", "--quick", "--mode", "bullmq", timeout_s=BENCH_TIMEOUT_S)
    if "bullmq: skipped" in proc.stderr:  # node is here but the install failed (no registry)
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    rows = _section(_sections(proc.stdout), "bullmq:")
    assert [r["workload"].split(",")[0] for r in rows] == [
        "enqueue", "enqueue", "enqueue", "enqueue", "enqueue", "dequeue + complete",
        "dequeue + complete", "complete_next",
        "run_worker(concurrency=64) / "
        "Worker(concurrency=64)", "Redis used_memory per queued request (bytes)",
    ]  # fmt: skip
    for row in rows:
        assert _number(row["sidecar-redis jobs/s"]) > 0, row
        assert _number(row["BullMQ jobs/s"]) > 0, row
        assert row["met"] in ("yes", "no", "-"), row


async def test_the_echo_ceiling_answers_folded_requests_per_item(tmp_path: Path) -> None:
    """AsyncClient folds concurrent enqueues and completes into one request each; the echo
    must answer them with one result per item, as the daemon does, or the client would resend
    them one by one and the ceiling would do more work than the daemon."""
    frames: list[int] = []

    class Counting(EchoConnection):
        def data_received(self, data: bytes) -> None:
            frames.append(len(data))
            super().data_received(data)

    results = canned_results()
    path = str(tmp_path / "echo.sock")
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Counting(results), path)
    try:
        async with AsyncClient(path) as client:
            done = await asyncio.gather(*(client.complete(f"q{i}", "l") for i in range(5)))
            stored = await asyncio.gather(*(client.enqueue({"n": i}) for i in range(5)))
    finally:
        server.close()
        await server.wait_closed()
    assert [d.status for d in done] == ["completed"] * 5 and len(stored) == 5
    assert len(frames) == 2  # one read per folded request: nothing was resent alone


async def test_the_store_relay_does_the_daemons_redis_work_for_each_request(
    redis_server: RedisServer,
) -> None:
    """The floor rows with Redis's work are honest only if Redis does the daemon's work for
    each request, with a default daemon's arguments: what goes through the relay is what the
    daemon's own store reads back."""
    defaults = Settings()
    path = str(redis_server.dir / "relay.sock")
    with running(relay_spec(path, redis_server.socket_path, store=True)):
        async with AsyncClient(path) as client:
            for _ in range(4):
                await client.enqueue(llm_request())
            for _ in range(2):
                [job] = await client.dequeue(1)  # the echo's canned job
                await client.complete(job.queue_id, job.lease_id)
            await client.dequeue(1)  # leased by the relay, and held
    store = redis_queue_for(redis_server.url, time.time, retention_s=60.0, prefix=RELAY_PREFIX)
    await store.start()
    try:
        stats = await store.stats()
        raw = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            [held_id] = await raw.zrange(store.keys.leases, 0, -1)
        finally:
            await raw.aclose()
        held = await store.status(str(held_id))
        [left] = await store.dequeue(10, 30.0)
    finally:
        await store.close()
    assert (stats.queued, stats.processing, stats.completed) == (1, 1, 2)
    assert held is not None and held.status is QueueStatus.PROCESSING
    assert held.lease_expires_at is not None
    assert held.lease_expires_at - held.updated_at == pytest.approx(defaults.queue_lease_s)
    for rec in (held, left):
        assert rec.max_attempts == defaults.queue_max_attempts
        assert rec.expires_at - rec.created_at == pytest.approx(TTL_S)
    assert left.payload == msgspec.msgpack.encode(llm_request())
