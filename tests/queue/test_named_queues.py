"""The daemon's named queues (requests, deliveries, pickups): each its own store stack, served by
one daemon and kept apart; `take` and `unknown_queue` over a real socket, in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.app import build_server
from sidecar.client import AsyncClient, Client, PermanentFailure, decode_payload, run_worker
from sidecar.config import ConfigError, Settings
from sidecar.errors import NotFound, UnknownQueue
from sidecar.metrics import DaemonMetrics
from sidecar.protocol import Job
from sidecar.queue.build import NamedQueues, build_queues
from tests.support.daemon import short_tmpdir

OUTBOX = ("deliveries", "pickups")


def local_settings(tmp: Path, **env: str) -> Settings:
    return Settings.from_env(
        {"SIDECAR_SOCKET": str(tmp / "s.sock"), "SIDECAR_STATE_DIR": str(tmp / "state"), **env}
    )


@pytest.fixture
async def served() -> AsyncIterator[tuple[Settings, NamedQueues]]:
    """The daemon's named queues (local only) behind a real server on a socket."""
    with short_tmpdir() as tmp:
        settings = local_settings(tmp)
        queues = build_queues(settings)
        await queues.start()
        server = build_server(settings, queues.requests, outbox=queues.outbox)
        await server.start()
        try:
            yield settings, queues
        finally:
            await server.drain(1.0)
            await queues.close(1.0)


async def test_each_outbox_queue_has_its_own_journal_and_limits(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, OUTBOX_MAX_SIZE="7", OUTBOX_MAX_MEMORY_MB="1")
    queues = build_queues(settings)
    assert list(queues.stores) == ["requests", *OUTBOX]
    await queues.start()
    try:
        for name, local in queues.locals.items():
            if name == "requests":
                assert (local.max_items, local.max_bytes) == (1000, 100 * 1024 * 1024)
            else:
                assert (local.max_items, local.max_bytes) == (7, 1024 * 1024)
    finally:
        await queues.close(1.0)
    state = tmp_path / "state"
    # Today's journal stays where it was; each outbox queue journals in a subfolder of its own.
    assert list(state.glob("journal-*.log")) or list(state.glob("snapshot-*.bin"))
    for name in OUTBOX:
        assert (state / name / "lock").exists()
        assert list((state / name).glob("journal-*.log")) or list(
            (state / name).glob("snapshot-*.bin")
        )


async def test_hello_lists_the_queues(served: tuple[Settings, NamedQueues]) -> None:
    settings, _ = served
    async with AsyncClient(settings.socket_path) as client:
        assert (await client.hello()).queues == ["requests", *OUTBOX]


async def test_the_same_queue_id_in_two_queues_is_two_entries(
    served: tuple[Settings, NamedQueues],
) -> None:
    settings, _ = served
    async with AsyncClient(settings.socket_path) as client:
        a = await client.enqueue({"prompt": "p"}, queue_id="same")
        b = await client.enqueue({"result": "r"}, queue_id="same", queue="pickups")
        assert a.created and b.created
        assert (await client.stats()).queued == 1
        assert (await client.stats(queue="pickups")).queued == 1
        assert (await client.stats(queue="deliveries")).accepted == 0
        # A worker of the request queue gets the request, never the result waiting in pickups.
        [job] = await client.dequeue(10)
        assert job.queue_id == "same"
        assert (await client.status("same", queue="pickups")).status == "queued"
        await client.complete(job.queue_id, job.lease_id)
        assert (await client.status("same")).status == "completed"  # retained in requests
        taken = await client.take("same")
        assert taken is not None
        assert decode_payload(taken) == {"result": "r"}
        await client.complete("same", taken.lease_id, queue="pickups")
        # Deleted at once in the outbox: picked up once, then gone.
        with pytest.raises(NotFound):
            await client.status("same", queue="pickups")
        assert await client.take("same") is None
        assert (await client.status("same")).status == "completed"


async def test_an_unknown_queue_is_refused_and_the_connection_goes_on(
    served: tuple[Settings, NamedQueues],
) -> None:
    settings, _ = served
    async with AsyncClient(settings.socket_path) as client:
        calls = [
            client.enqueue({"x": 1}, queue="nope"),
            client.dequeue(1, queue="nope"),
            client.status("q", queue="nope"),
            client.stats(queue="nope"),
            client.take("q", queue="nope"),
            client.cancel("q", queue="nope"),
            client.complete("q", "l", queue="nope"),
            client.fail("q", "l", queue="nope"),
            client.extend("q", "l", queue="nope"),
            client.complete_next("q", "l", queue="nope"),
            client.complete_many([("q", "l")], queue="nope"),
        ]
        for call in calls:
            with pytest.raises(UnknownQueue) as refused:
                await call
            err = refused.value
            assert err.code == "unknown_queue"
            assert err.message == (
                "no queue 'nope': this daemon serves requests, deliveries, pickups"
            )
            assert err.details == {"queue": "nope", "queues": ["requests", *OUTBOX]}
        # Nothing was stored, and the same connection serves the next call.
        assert (await client.health()).status == "ok"
        assert (await client.enqueue({"x": 1})).created
        assert (await client.stats()).accepted == 1


async def test_take_from_the_blocking_client(served: tuple[Settings, NamedQueues]) -> None:
    settings, _ = served
    async with AsyncClient(settings.socket_path) as client:
        await client.enqueue({"result": 1}, queue_id="b-1", queue="pickups")

    def pick_up() -> tuple[Job | None, Job | None]:
        with Client(settings.socket_path) as blocking:
            first = blocking.take("b-1")
            second = blocking.take("b-1")
            assert first is not None
            blocking.complete("b-1", first.lease_id, queue="pickups")
            return first, second

    first, second = await asyncio.to_thread(pick_up)
    assert first is not None and first.queue_id == "b-1" and second is None


async def test_run_worker_drains_the_named_queue_only(
    served: tuple[Settings, NamedQueues],
) -> None:
    settings, _ = served
    seen: list[str] = []
    stop = asyncio.Event()

    async def deliver(job: Job) -> None:
        seen.append(job.queue_id)
        if len(seen) == 3:
            stop.set()
        if job.queue_id == "d-2":
            raise PermanentFailure("410 Gone")  # settled as a fail in `deliveries`

    async with AsyncClient(settings.socket_path) as client:
        await client.enqueue({"prompt": 1}, queue_id="req")
        for i in range(3):
            await client.enqueue({"url": i}, queue_id=f"d-{i}", queue="deliveries")
        await asyncio.wait_for(
            run_worker(deliver, path=settings.socket_path, queue="deliveries", wait_s=0.2,
                       stop=stop),
            30,
        )  # fmt: skip
        assert sorted(seen) == ["d-0", "d-1", "d-2"]
        deliveries = await client.stats(queue="deliveries")
        assert (deliveries.queued, deliveries.processing) == (0, 0)
        assert (deliveries.completed, deliveries.failed) == (2, 1)
        with pytest.raises(NotFound):  # a completed entry is deleted at once
            await client.status("d-0", queue="deliveries")
        failed = await client.status("d-2", queue="deliveries")
        assert (failed.status, failed.reason) == ("failed", "410 Gone")
        assert (await client.status("req")).status == "queued"


async def test_health_names_an_outbox_queue_s_own_trouble(
    served: tuple[Settings, NamedQueues],
) -> None:
    settings, queues = served
    pickups = queues.locals["pickups"]
    async with AsyncClient(settings.socket_path) as client:
        assert (await client.health()).status == "ok"
        # Fill pickups past its high watermark: its breaker opens, the daemon says so.
        pickups._state.breaker_open = True
        health = await client.health()
        assert health.status == "degraded"
        assert health.reasons == ["pickups: local queue above its watermark"]


@pytest.mark.parametrize(
    ("env", "value", "accepted"),
    [
        ("OUTBOX_MAX_SIZE", "0", "a whole number >= 1"),
        ("OUTBOX_MAX_SIZE", "many", "a whole number >= 1"),
        ("OUTBOX_MAX_MEMORY_MB", "0", "a number of megabytes > 0"),
        ("OUTBOX_MAX_MEMORY_MB", "nan", "a number of megabytes > 0"),
    ],
)
def test_a_bad_outbox_limit_names_its_variable(env: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({env: value})
    assert str(bad.value) == f"{env}={value!r} is invalid: expected {accepted}"


async def test_metrics_count_the_outbox_apart_from_requests(
    served: tuple[Settings, NamedQueues],
) -> None:
    settings, queues = served
    metrics = DaemonMetrics(version="t", high_watermark=0.8, low_watermark=0.6)
    metrics.bind(queues.requests, outbox=queues.outbox)
    async with AsyncClient(settings.socket_path) as client:
        await client.enqueue({"p": 1})
        for i in range(3):
            await client.enqueue({"r": i}, queue="pickups")
        await client.enqueue({"r": 0}, queue="deliveries")
        await client.dequeue(1, queue="deliveries")
    text = (await metrics.render()).decode()
    assert 'sidecar_outbox_items{queue="pickups",status="queued"} 3.0' in text
    assert 'sidecar_outbox_items{queue="deliveries",status="processing"} 1.0' in text
    assert 'sidecar_outbox_items{queue="deliveries",status="queued"} 0.0' in text
    # The request queue's gauges count requests only.
    assert 'sidecar_queue_requests{scope="host",status="queued",store="local"} 1.0' in text


async def test_the_cli_shows_one_queue_or_the_outbox_line(
    served: tuple[Settings, NamedQueues], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = served
    async with AsyncClient(settings.socket_path) as client:
        await client.enqueue({"r": 1}, queue="pickups")
        await client.enqueue({"r": 2}, queue="pickups")
    sock = ["--socket", settings.socket_path]
    assert await asyncio.to_thread(cli.main, [*sock, "stats"]) == 0
    out = capsys.readouterr().out
    assert "outbox: deliveries queued=0 processing=0; pickups queued=2 processing=0" in out
    assert await asyncio.to_thread(cli.main, [*sock, "stats", "--queue", "pickups"]) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines() if line.startswith("queued ")] == [
        ["queued", "2"]
    ]
    assert "outbox:" not in out
    code = await asyncio.to_thread(cli.main, [*sock, "stats", "--queue", "nope"])
    assert code == cli.EXIT_ERROR
    assert capsys.readouterr().err == (
        "error: unknown_queue: no queue 'nope': this daemon serves requests, deliveries, pickups\n"
    )
