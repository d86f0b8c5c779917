"""One AsyncClient shared by many tasks across daemon restarts, frozen daemons and deadlines.

The daemon is the real one (a subprocess) on Redis with AOF, so what was acknowledged before a
restart can be looked for after it: acknowledged vs found, and no request stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import pytest
import structlog.testing

from sidecar.client import AsyncClient, Client, decode_payload, run_worker
from sidecar.config import ConfigError
from sidecar.errors import SidecarUnavailable
from sidecar.protocol import Job
from tests.support.daemon import Daemon, daemon_env, running_daemon, short_tmpdir
from tests.support.redis_server import RedisServer

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

BURST = 25


@pytest.fixture
def redis_daemon() -> Iterator[Daemon]:
    with RedisServer(appendonly=True) as server, short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        daemon = Daemon(sock, daemon_env(sock, REDIS_URL=server.url)).start()
        try:
            yield daemon
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()


class Producer:
    """Bursts of concurrent enqueues on one shared client; books what each call answered."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.acked: dict[str, str] = {}  # tag -> queue_id
        self.not_sent = 0  # SidecarUnavailable with sent False: nothing reached the daemon
        self.unknown: list[str] = []  # tags sent without a reply: stored or not
        self.bursts = 0

    async def one(self, tag: str) -> bool:
        try:
            res = await self.client.enqueue({"tag": tag})
        except SidecarUnavailable as err:
            if err.details.get("sent"):
                self.unknown.append(tag)
            else:
                self.not_sent += 1
            return False
        self.acked[tag] = res.queue_id
        return True

    async def burst(self) -> int:
        """One burst of concurrent calls; how many were acknowledged."""
        n = self.bursts = self.bursts + 1
        done = await asyncio.gather(*(self.one(f"{n}-{i}") for i in range(BURST)))
        return sum(done)


async def restart(daemon: Daemon, how: signal.Signals) -> None:
    await asyncio.to_thread(daemon.stop, how)
    await asyncio.to_thread(daemon.start)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_shared_client_survives_restarts_under_a_burst(
    redis_daemon: Daemon, how: signal.Signals
) -> None:
    client = AsyncClient(redis_daemon.socket_path)  # not connected: the first burst connects
    producer = Producer(client)
    try:
        assert await producer.burst() == BURST
        assert (await client.health()).connections == 1  # one connection for the whole burst
        stop = asyncio.Event()

        async def keep_producing() -> None:
            while not stop.is_set():
                await producer.burst()

        load = asyncio.get_running_loop().create_task(keep_producing())
        try:
            for _ in range(2):
                await restart(redis_daemon, how)
                # After the restart the same client serves again: a whole burst succeeds.
                for _attempt in range(50):
                    if await producer.burst() == BURST:
                        break
                else:
                    pytest.fail("no burst fully succeeded after the restart")
        finally:
            stop.set()
            await load
        assert (await client.health()).connections == 1  # one reconnect for all waiting calls

        # Acknowledged vs found; and nothing stored twice although calls were resent.
        found = [await client.status(qid) for qid in producer.acked.values()]
        assert all(info.status == "queued" for info in found)
        stats = await client.stats()
        assert len(producer.acked) <= stats.accepted <= len(producer.acked) + len(producer.unknown)
        jobs: list[Job] = []
        while batch := await client.dequeue(100):
            jobs += batch
        tags = [decode_payload(job)["tag"] for job in jobs]
        assert len(tags) == len(set(tags)) == stats.accepted  # no duplicates
        assert set(producer.acked) <= set(tags)  # 0 lost
        assert producer.bursts > 4
    finally:
        await client.close()


async def test_frozen_daemon_fails_the_call_at_its_deadline() -> None:
    with running_daemon() as d:
        assert d.proc is not None
        client = AsyncClient(d.socket_path, timeout_s=0.5)
        fresh = AsyncClient(d.socket_path, timeout_s=0.5)
        try:
            assert (await client.health()).status == "ok"
            d.proc.send_signal(signal.SIGSTOP)
            try:
                for c in (client, fresh):  # a live connection, and a new one (the backlog)
                    with pytest.raises(SidecarUnavailable) as info:
                        await c.health()
                    assert info.value.details == {"sent": True, "reason": "timeout"}
                    assert "no reply from the sidecar within 0.5s" in info.value.message
                with pytest.raises(SidecarUnavailable) as sync_info:
                    Client(d.socket_path, timeout_s=0.5).health()
                assert sync_info.value.details["reason"] == "timeout"
            finally:
                d.proc.send_signal(signal.SIGCONT)
            client.timeout_s = 10.0  # the next connection's deadline: room for a loaded machine
            assert (await client.health()).status == "ok"  # and it reconnects once thawed
        finally:
            await client.close()
            await fresh.close()


async def test_a_long_poll_adds_its_wait_to_the_deadline() -> None:
    with running_daemon() as d:
        async with AsyncClient(d.socket_path, timeout_s=1.0) as c:
            # The dequeue waits 3 s, over the 1 s deadline; the health behind it on the same
            # connection cannot be answered before it either. Neither times out.
            poll = asyncio.create_task(c.dequeue(1, wait_s=3.0))
            await asyncio.sleep(0)
            behind = asyncio.create_task(c.health())
            assert await poll == []
            assert (await behind).status == "ok"


def test_blocking_client_notices_a_restart_before_it_sends(redis_daemon: Daemon) -> None:
    """A dequeue is never resent blindly; the stale connection is noticed before sending."""
    with Client(redis_daemon.socket_path) as c:
        queued = c.enqueue("x")
        redis_daemon.stop()
        redis_daemon.start()
        [job] = c.dequeue(1)  # one call, one new connection, one lease
        assert job.queue_id == queued.queue_id
        assert c.status(queued.queue_id).attempts == 1


def test_client_deadlines_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_CLIENT_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("SIDECAR_CLIENT_CONNECT_TIMEOUT_SECONDS", "0.25")
    c = AsyncClient("/nowhere.sock")
    assert (c.timeout_s, c.connect_timeout_s) == (2.5, 0.25)
    assert AsyncClient("/nowhere.sock", timeout_s=7).timeout_s == 7
    s = Client("/nowhere.sock")
    assert (s.timeout_s, s.connect_timeout_s) == (2.5, 0.25)
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("SIDECAR_CLIENT_TIMEOUT_SECONDS", bad)
        with pytest.raises(ConfigError, match="SIDECAR_CLIENT_TIMEOUT_SECONDS"):
            AsyncClient("/nowhere.sock")


async def test_enqueue_names_its_items_so_a_resend_cannot_duplicate() -> None:
    with running_daemon() as d:
        async with AsyncClient(d.socket_path) as c:
            res = await c.enqueue("x")
            assert len(res.queue_id) == 32 and int(res.queue_id, 16) >= 0
            named = await c.enqueue("y", queue_id="mine")
            assert named.queue_id == "mine"


async def test_worker_settle_failing_under_a_restart_is_observed(redis_daemon: Daemon) -> None:
    """A complete that fails because the daemon is away is logged; the job is redelivered."""
    release = asyncio.Event()
    runs: list[str] = []
    stop = asyncio.Event()

    async def handler(job: Job) -> None:
        runs.append(job.queue_id)
        if len(runs) == 1:
            await release.wait()  # the first run settles while the daemon is down
        else:
            stop.set()

    sock = redis_daemon.socket_path
    async with AsyncClient(sock) as c:
        queued = await c.enqueue("work")
        worker = asyncio.create_task(
            run_worker(handler, path=sock, lease_s=1, wait_s=0.5, stop=stop)
        )
        for _ in range(200):
            if runs:
                break
            await asyncio.sleep(0.05)
        assert runs == [queued.queue_id]
        await asyncio.to_thread(redis_daemon.stop, signal.SIGKILL)
        with structlog.testing.capture_logs() as logs:
            release.set()  # complete now fails: nobody listens
            for _ in range(200):
                if any(e["event"] == "settle_failed" for e in logs):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the failed complete was not reported")
        await asyncio.to_thread(redis_daemon.start)
        await asyncio.wait_for(worker, 30)  # the lapsed lease hands the job out again
        assert runs == [queued.queue_id, queued.queue_id]
        info = await c.status(queued.queue_id)
        assert (info.status, info.attempts) == ("completed", 2)


async def test_close_during_a_connect_leaves_no_connection_open() -> None:
    with running_daemon() as d:
        c = AsyncClient(d.socket_path)
        call = asyncio.create_task(c.health())
        await asyncio.sleep(0)  # the call has started the connect
        assert c._connecting is not None
        await c.close()
        with contextlib.suppress(SidecarUnavailable):
            await call  # answered, or failed with "client closed": never left hanging
        async with AsyncClient(d.socket_path) as probe:
            for _ in range(200):
                if (await probe.health()).connections == 1:  # only the probe's own
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the closed client's connection stayed open")
