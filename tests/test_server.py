"""The server in-process: shutdown behaviour, placed exactly without signals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.app import build_local_queue
from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import ShuttingDown
from sidecar.handlers import Ops
from sidecar.server import SidecarServer
from tests.daemon import short_tmpdir


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    with short_tmpdir() as tmp:
        yield Settings.from_env({"SIDECAR_SOCKET": str(tmp / "s.sock")})


async def test_connect_during_drain_gets_shutting_down(settings: Settings) -> None:
    server = SidecarServer(Ops(settings, build_local_queue(settings)))
    await server.start()
    try:
        server.draining = True
        client = AsyncClient(settings.socket_path)
        await client.connect()
        with pytest.raises(ShuttingDown):
            await client.health()
        await client.close()
    finally:
        await server.drain(1.0)


async def test_shutdown_answers_a_waiting_dequeue_then_closes(settings: Settings) -> None:
    ops = Ops(settings, build_local_queue(settings))
    server = SidecarServer(ops)
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
