"""The server in-process: shutdown behaviour, placed exactly without signals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest

from sidecar.app import build_server
from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import ShuttingDown
from sidecar.models import QueuedRequest
from sidecar.protocol import encode_frame
from sidecar.queue.base import QueueStore
from sidecar.queue.build import build_local_queue
from tests.support.daemon import short_tmpdir
from tests.support.helpers import live, read_replies_async


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    with short_tmpdir() as tmp:
        yield Settings.from_env({"SIDECAR_SOCKET": str(tmp / "s.sock")})


async def test_connect_during_drain_gets_shutting_down(settings: Settings) -> None:
    server = build_server(settings, build_local_queue(settings))
    await server.start()
    try:
        server.state.draining = True
        client = AsyncClient(settings.socket_path)
        await client.connect()
        with pytest.raises(ShuttingDown):
            await client.health()
        await client.close()
    finally:
        await server.drain(1.0)


async def test_shutdown_answers_a_waiting_dequeue_then_closes(settings: Settings) -> None:
    server = build_server(settings, build_local_queue(settings))
    await server.start()
    worker = await AsyncClient(settings.socket_path).connect()
    # Both frames leave in one write. The daemon flushes the health reply just before it
    # starts waiting on the dequeue, so once the reply is here, the dequeue is waiting.
    health = asyncio.create_task(worker.health())
    waiting = asyncio.create_task(worker.dequeue(1, wait_s=30))
    assert (await health).status == "ok"
    assert not waiting.done()
    await server.drain(10.0)
    assert await asyncio.wait_for(waiting, 5) == []  # answered at once, not after 30 s
    await worker.close()


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
async def test_a_request_sent_after_the_daemons_end_of_stream_is_not_run(
    settings: Settings, eager: bool
) -> None:
    """Draining, the daemon half-closes each idle connection and lingers for the client's end.
    A request the client sent meanwhile is neither run nor answered: the client read the end
    first, and sends it again to the next daemon. (Run and then written, its reply met the
    closed write side: an error in the op's task, and an enqueue stored but never answered.)"""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    queue = build_local_queue(settings)
    server = build_server(settings, queue, eager_ops=eager)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(settings.socket_path)
    try:
        writer.write(encode_frame({"op": "health", "id": 1}))
        [reply] = await read_replies_async(reader, 1)
        assert reply.id == 1
        drain = asyncio.create_task(server.drain(5.0))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the daemon's end of stream
        item = {"payload": b"\x80", "queue_id": "late"}
        writer.write(encode_frame({"op": "enqueue", "id": 2, "items": [item]}))
        await writer.drain()
        writer.close()
        await asyncio.wait_for(drain, 10)
    finally:
        loop.set_exception_handler(None)
    assert errors == []
    assert await queue.status("late") is None
    await queue.close()


class GatedStatus:
    """The local store, except that status of "slow" waits for a gate and "fast" signals."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.gate = asyncio.Event()
        self.fast_started = asyncio.Event()
        self.slow_done = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def status(self, queue_id: str) -> QueuedRequest | None:
        if queue_id == "slow":
            await self.gate.wait()
            self.slow_done = True
        elif queue_id == "fast":
            self.fast_started.set()
        elif queue_id == "cancelled":
            raise asyncio.CancelledError  # as a cancelled shared future inside a store would
        return None


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
async def test_one_connections_requests_run_concurrently_replies_in_order(
    settings: Settings, eager: bool
) -> None:
    store = GatedStatus(build_local_queue(settings))
    server = build_server(settings, cast(QueueStore, store), eager_ops=eager)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(settings.socket_path)
    try:
        writer.write(
            encode_frame({"op": "status", "id": 1, "queue_id": "slow"})
            + encode_frame({"op": "status", "id": 2, "queue_id": "fast"})
        )
        # A server that answered one request after another would never start the second.
        await asyncio.wait_for(store.fast_started.wait(), 10)
        assert not store.slow_done
        store.gate.set()
        replies = await read_replies_async(reader, 2)
        assert [r.id for r in replies] == [1, 2]
        assert [r.error.code if r.error else None for r in replies] == ["not_found"] * 2
    finally:
        writer.close()
        await server.drain(5.0)


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
async def test_a_drain_past_its_timeout_cancels_and_awaits_running_ops(
    settings: Settings, eager: bool
) -> None:
    store = GatedStatus(build_local_queue(settings))
    server = build_server(settings, cast(QueueStore, store), eager_ops=eager)
    await server.start()
    _, writer = await asyncio.open_unix_connection(settings.socket_path)
    writer.write(encode_frame({"op": "status", "id": 1, "queue_id": "slow"}))
    writer.write(encode_frame({"op": "status", "id": 2, "queue_id": "fast"}))
    await asyncio.wait_for(store.fast_started.wait(), 10)
    [conn] = live(server)
    [op] = conn.running  # the fast one has answered; the slow one waits for the gate
    await server.drain(0.1)  # the gate never opens: the drain gives up on it
    assert op.cancelled() and not store.slow_done
    writer.close()


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
async def test_a_cancellation_inside_an_op_is_an_error_reply_and_later_replies_follow(
    settings: Settings, eager: bool
) -> None:
    store = GatedStatus(build_local_queue(settings))
    server = build_server(settings, cast(QueueStore, store), eager_ops=eager)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(settings.socket_path)
    try:
        writer.write(
            encode_frame({"op": "status", "id": 1, "queue_id": "cancelled"})
            + encode_frame({"op": "status", "id": 2, "queue_id": "fast"})
        )
        replies = await read_replies_async(reader, 2)
        assert [r.id for r in replies] == [1, 2]
        assert [r.error.code if r.error else None for r in replies] == [
            "internal_error",
            "not_found",
        ]
    finally:
        writer.close()
        await server.drain(5.0)
