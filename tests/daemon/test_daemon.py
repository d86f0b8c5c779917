"""The real daemon as a subprocess on a real socket, driven through the clients and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from sidecar.client import AsyncClient, Client, PermanentFailure, decode_payload, item, run_worker
from sidecar.errors import (
    InvalidMessage,
    InvalidState,
    LeaseMismatch,
    NotFound,
    SidecarUnavailable,
)
from sidecar.protocol import Job
from tests.support.daemon import (
    Daemon,
    daemon_env,
    running_daemon,
    serve_expecting_refusal,
    short_tmpdir,
)
from tests.support.metrics_scrape import exported_names

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon(QUEUE_LEASE_SECONDS="30") as d:
        yield d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.socket_path) as c:
        yield c


def cli(daemon: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "--socket", daemon.socket_path, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def expected_mode() -> str:
    """The mode hello reports; the Redis-mode suite overrides it."""
    return "local_only"


async def test_hello_reports_version_and_limits(client: AsyncClient, expected_mode: str) -> None:
    hello = await client.hello()
    assert hello.server == "sidecar"
    assert hello.protocol == 1
    assert hello.mode == expected_mode
    assert hello.limits.priority_min == 0 and hello.limits.priority_max == 9
    assert hello.limits.default_lease_s == 30


async def test_every_op_through_the_async_client(client: AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    a = await client.enqueue(body, priority=1, ttl_s=600)
    b = await client.enqueue({"n": 2}, priority=9)
    assert a.created and a.status == "queued"
    [job] = await client.dequeue(1, lease_s=20)
    assert job.queue_id == a.queue_id
    assert decode_payload(job) == body
    ext = await client.extend(job.queue_id, job.lease_id, 40)
    assert ext.lease_expires_at is not None and ext.lease_expires_at > job.lease_expires_at
    done = await client.complete(job.queue_id, job.lease_id)
    assert done.status == "completed"
    assert (await client.status(a.queue_id)).status == "completed"
    cancelled = await client.cancel(b.queue_id)
    assert (cancelled.status, cancelled.reason) == ("failed", "cancelled")
    c = await client.enqueue("third", max_attempts=1)
    [job] = await client.dequeue(5)
    assert job.queue_id == c.queue_id
    failed = await client.fail(job.queue_id, job.lease_id, "provider said no", retry=True)
    assert failed.status == "failed" and failed.reason is not None
    stats = await client.stats()
    assert stats.balanced and stats.completed >= 1 and stats.failed >= 2
    health = await client.health()
    assert health.status == "ok" and health.connections >= 1


async def test_errors_arrive_as_typed_exceptions(client: AsyncClient) -> None:
    with pytest.raises(NotFound):
        await client.status("no-such-request")
    q = await client.enqueue("x")
    with pytest.raises(InvalidState):
        await client.complete(q.queue_id, "nope")
    [job] = await client.dequeue(1)
    with pytest.raises(LeaseMismatch):
        await client.complete(job.queue_id, "wrong-lease")
    await client.complete(job.queue_id, job.lease_id)


async def test_complete_next_settles_and_leases_in_one_request(client: AsyncClient) -> None:
    first = await client.enqueue({"n": 1}, priority=0)
    rest = await client.enqueue_many([item({"n": n}, priority=0) for n in (2, 3)])
    [job] = await client.dequeue(1)
    assert job.queue_id == first.queue_id
    got = await client.complete_next(job.queue_id, job.lease_id, 5, lease_s=20)
    assert got.error is None and got.completed is not None
    assert (got.completed.queue_id, got.completed.status) == (first.queue_id, "completed")
    assert [j.queue_id for j in got.items] == [r.queue_id for r in rest]
    assert [decode_payload(j) for j in got.items] == [{"n": 2}, {"n": 3}]
    # A lost lease is reported in the reply, not raised; the queue is empty, so no job.
    lost = await client.complete_next(got.items[0].queue_id, "wrong-lease")
    assert lost.completed is None and lost.items == []
    assert lost.error is not None and lost.error.code == "lease_mismatch"
    assert lost.error.details == {"queue_id": got.items[0].queue_id}
    for j in got.items:
        assert (await client.complete(j.queue_id, j.lease_id)).status == "completed"


async def test_complete_many_settles_each_lease_on_its_own_and_leases_more(
    client: AsyncClient,
) -> None:
    done = await client.enqueue_many([item({"n": n}, priority=0) for n in range(3)])
    waiting = await client.enqueue({"n": 3}, priority=0)
    jobs = await client.dequeue(3)
    assert [j.queue_id for j in jobs] == [d.queue_id for d in done]
    leases = [(j.queue_id, j.lease_id) for j in jobs]
    leases[1] = (jobs[1].queue_id, "wrong-lease")  # one lost lease among them
    leases.append(("no-such-request", "x"))
    got = await client.complete_many(leases, 5, lease_s=20)
    assert len(got.results) == 4
    first, lost, third, unknown = got.results
    assert first.error is None and first.completed is not None
    assert (first.completed.queue_id, first.completed.status) == (jobs[0].queue_id, "completed")
    assert third.completed is not None and third.completed.queue_id == jobs[2].queue_id
    # Each refusal is its item's own, exactly what complete would have raised.
    assert lost.completed is None and lost.error is not None
    assert (lost.error.code, lost.error.details) == (
        "lease_mismatch",
        {"queue_id": jobs[1].queue_id},
    )
    assert unknown.error is not None and unknown.error.code == "not_found"
    # The one request still queued was leased in the same round trip.
    assert [j.queue_id for j in got.items] == [waiting.queue_id]
    assert got.items[0].lease_expires_at is not None
    assert (await client.status(jobs[1].queue_id)).status == "processing"
    # Without max_items it only settles; a repeat of a settle answers the same info.
    again = await client.complete_many(
        [(jobs[1].queue_id, jobs[1].lease_id), (jobs[0].queue_id, jobs[0].lease_id)]
    )
    assert [r.completed.status for r in again.results if r.completed] == ["completed"] * 2
    assert again.items == []
    # info=False: a completed lease's entry is empty; an error is still its own.
    [late] = got.items
    brief = await client.complete_many(
        [(late.queue_id, late.lease_id), (late.queue_id, "wrong-lease")], info=False
    )
    assert brief.results[0].completed is None and brief.results[0].error is None
    assert brief.results[1].error is not None
    assert brief.results[1].error.code == "invalid_state"  # completed by the first entry
    assert (await client.status(late.queue_id)).status == "completed"
    over = [("q", "l")] * 1001  # past the default max_batch of 1,000
    with pytest.raises(InvalidMessage) as refused:
        await client.complete_many(over)
    assert refused.value.details == {"items": 1001, "max_batch": 1000}


async def test_batch_enqueue_and_batch_dequeue(client: AsyncClient) -> None:
    res = await client.enqueue_many([item({"i": i}, priority=i % 3) for i in range(50)])
    assert len(res) == 50 and all(r.created for r in res)
    jobs = await client.dequeue(50)
    assert len(jobs) == 50
    assert [j.priority for j in jobs] == sorted(j.priority for j in jobs)
    for job in jobs:
        await client.complete(job.queue_id, job.lease_id)


async def test_idempotent_enqueue_over_the_wire(client: AsyncClient) -> None:
    first = await client.enqueue("once", queue_id="order-42")
    second = await client.enqueue("twice", queue_id="order-42")
    assert first.created and not second.created
    [job] = await client.dequeue(5)
    assert decode_payload(job) == "once"
    await client.complete(job.queue_id, job.lease_id)


async def test_many_tasks_share_one_connection(client: AsyncClient) -> None:
    results = await asyncio.gather(*(client.enqueue({"task": i}) for i in range(200)))
    assert len({r.queue_id for r in results}) == 200
    got: list[Job] = []
    while len(got) < 200:
        batch = await client.dequeue(64)
        assert batch
        got += batch
    await asyncio.gather(*(client.complete(j.queue_id, j.lease_id) for j in got))
    assert {decode_payload(j)["task"] for j in got} == set(range(200))


async def test_long_poll_dequeue_wakes_on_enqueue(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket_path) as worker, AsyncClient(daemon.socket_path) as prod:
        waiting = asyncio.create_task(worker.dequeue(1, wait_s=20))
        await asyncio.sleep(0.05)  # give the dequeue time to reach the daemon and wait
        assert not waiting.done()
        q = await prod.enqueue("wake up")
        [job] = await asyncio.wait_for(waiting, 10)
        assert job.queue_id == q.queue_id
        await worker.complete(job.queue_id, job.lease_id)


async def test_long_poll_returns_empty_after_its_wait(client: AsyncClient) -> None:
    assert await client.dequeue(1, wait_s=0.2) == []


async def test_worker_helper_completes_and_fails(daemon: Daemon) -> None:
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(job: Job) -> None:
        kind = decode_payload(job)["kind"]
        seen.append(kind)
        if kind == "permanent":
            raise PermanentFailure("bad input")
        if len(seen) == 6:
            stop.set()

    async with AsyncClient(daemon.socket_path) as c:
        ok = [await c.enqueue({"kind": "ok"}) for _ in range(5)]
        bad = await c.enqueue({"kind": "permanent"}, priority=0)
        await asyncio.wait_for(
            run_worker(handler, path=daemon.socket_path, concurrency=2, wait_s=0.5, stop=stop), 30
        )
        assert (await c.status(bad.queue_id)).status == "failed"
        assert [(await c.status(q.queue_id)).status for q in ok] == ["completed"] * 5


def test_sync_client_round_trip(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        q = c.enqueue({"sync": True}, priority=0)
        [job] = c.dequeue()
        assert job.queue_id == q.queue_id
        assert c.complete(job.queue_id, job.lease_id).status == "completed"
        assert c.status(q.queue_id).status == "completed"
        assert c.health().status == "ok"
        assert c.stats().balanced


def test_unavailable_daemon_fails_fast() -> None:
    with short_tmpdir() as tmp, pytest.raises(SidecarUnavailable) as info:
        Client(str(tmp / "nobody.sock")).connect()
    assert "sidecar unavailable" in str(info.value)


async def test_async_unavailable_daemon_fails_fast() -> None:
    with short_tmpdir() as tmp, pytest.raises(SidecarUnavailable):
        await AsyncClient(str(tmp / "nobody.sock")).connect()


def test_cli_every_command(daemon: Daemon) -> None:
    enq = cli(daemon, "enqueue", '{"prompt": "from the cli"}', "--priority", "0", "--ttl-s", "60")
    assert enq.returncode == 0, enq.stderr
    qid = enq.stdout.strip()
    status = json.loads(cli(daemon, "status", qid).stdout)
    assert status["status"] == "queued" and status["priority"] == 0
    piped = cli(daemon, "enqueue", "--queue-id", "cli-piped", stdin='{"from": "stdin"}')
    assert piped.stdout.strip() == "cli-piped"
    deq = cli(daemon, "dequeue", "--max", "2")
    jobs = [json.loads(line) for line in deq.stdout.splitlines()]
    assert [j["queue_id"] for j in jobs] == [qid, "cli-piped"]
    assert jobs[0]["payload"] == {"prompt": "from the cli"}
    done = cli(daemon, "complete", qid, jobs[0]["lease_id"])
    assert done.stdout.strip() == "completed"
    failed = cli(daemon, "fail", "cli-piped", jobs[1]["lease_id"], "--no-retry")
    assert failed.stdout.strip() == "failed"
    third = cli(daemon, "enqueue", '"cancel me"').stdout.strip()
    assert cli(daemon, "cancel", third).stdout.strip() == "failed"
    missing = cli(daemon, "status", "missing-id")
    assert missing.returncode == 1
    assert "not_found" in missing.stderr
    bad_json = cli(daemon, "enqueue", "{not json")
    assert bad_json.returncode == 1 and "not valid JSON" in bad_json.stderr


def test_cli_health_and_stats(daemon: Daemon) -> None:
    health = cli(daemon, "health")
    assert health.returncode == 0
    assert health.stdout.startswith("ok: mode=local_only")
    as_json = json.loads(cli(daemon, "health", "--json").stdout)
    assert as_json["status"] == "ok"
    table = cli(daemon, "stats").stdout
    assert "breaker_open" in table and "balanced" in table
    rows = dict(row.split(maxsplit=1) for row in table.splitlines())
    assert (rows["mode"], rows["stores"]) == ("local_only", "local")
    stats = json.loads(cli(daemon, "stats", "--json").stdout)
    assert stats["store"] == "local"


def test_metrics_through_both_clients_and_the_cli(daemon: Daemon) -> None:
    """The metrics op end to end: the same families each way (the values move between calls)."""
    with Client(daemon.socket_path) as c:
        sync = c.metrics()
    assert sync.content_type.startswith("text/plain; version=0.0.4")

    async def via_async() -> str:
        async with AsyncClient(daemon.socket_path) as a:
            return (await a.metrics()).text

    names = exported_names(sync.text)
    assert "sidecar_request_duration_seconds_count" in names
    assert exported_names(asyncio.run(via_async())) == names
    proc = cli(daemon, "metrics")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert exported_names(proc.stdout) == names


def test_cli_metrics_unreachable_exits_2() -> None:
    with short_tmpdir() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "--socket", str(tmp / "x.sock"), "metrics"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("unreachable: sidecar unavailable")


def test_cli_health_unreachable_exits_2() -> None:
    with short_tmpdir() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "--socket", str(tmp / "x.sock"), "health"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 2
    assert proc.stderr.startswith("unreachable: sidecar unavailable")


def test_cli_health_degraded_exits_1() -> None:
    with running_daemon(
        QUEUE_MAX_SIZE="2", QUEUE_HIGH_WATERMARK="0.5", QUEUE_LOW_WATERMARK="0.2"
    ) as d:
        with Client(d.socket_path) as c:
            c.enqueue("fills the queue to its watermark")
        proc = cli(d, "health")
        assert proc.returncode == 1
        assert proc.stdout.startswith("degraded:")


def test_socket_file_mode_is_0660(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o660


def test_second_daemon_on_a_live_socket_refuses(daemon: Daemon) -> None:
    with short_tmpdir() as own_state:  # its own journal, so the socket is what refuses it
        env = daemon_env(daemon.socket_path, SIDECAR_STATE_DIR=str(own_state))
        proc = serve_expecting_refusal(env)
    assert proc.returncode == 1
    assert "another sidecar is already serving" in proc.stderr
    with Client(daemon.socket_path) as c:
        assert c.health().status == "ok"


def test_stale_socket_file_is_replaced() -> None:
    with short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        first = Daemon(sock, daemon_env(sock)).start()
        first.kill()  # SIGKILL leaves the socket file behind
        assert os.path.exists(sock)
        second = Daemon(sock, daemon_env(sock)).start()
        try:
            with Client(sock) as c:
                assert c.health().status == "ok"
        finally:
            assert second.stop() == 0


def test_sigterm_drains_and_removes_the_socket() -> None:
    with running_daemon() as d:
        with Client(d.socket_path) as c:
            c.enqueue("x")
        assert d.stop(signal.SIGTERM) == 0
        assert not os.path.exists(d.socket_path)
        assert d.events("stopped")


async def test_async_client_reconnects_after_a_daemon_restart() -> None:
    with short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        first = Daemon(sock, daemon_env(sock)).start()
        client = await AsyncClient(sock).connect()
        try:
            assert (await client.health()).status == "ok"
            first.stop()
            with pytest.raises(SidecarUnavailable):
                await client.health()  # the daemon is gone: fail fast, no hang
            second = Daemon(sock, daemon_env(sock)).start()
            try:
                assert (await client.health()).status == "ok"  # same client, new connection
            finally:
                second.stop()
        finally:
            await client.close()


async def test_worker_keeps_its_lease_while_a_long_poll_is_open() -> None:
    """Extends must not queue behind the worker's own long-polling dequeue."""
    with running_daemon() as d:
        stop = asyncio.Event()
        runs: list[str] = []

        async def slow(job: Job) -> None:
            runs.append(job.queue_id)
            await asyncio.sleep(2.5)  # the work: longer than the 1 s lease
            stop.set()

        async with AsyncClient(d.socket_path) as c:
            q = await c.enqueue("slow job")
            await asyncio.wait_for(
                run_worker(slow, path=d.socket_path, concurrency=2, lease_s=1, wait_s=5, stop=stop),
                30,
            )
            st = await c.status(q.queue_id)
        assert runs == [q.queue_id]  # handed out once: the lease never lapsed
        assert (st.status, st.attempts) == ("completed", 1)
