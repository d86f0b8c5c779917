"""An AsyncClient whose daemon reads slower than it writes: calls wait for the socket to drain
(past 1 MiB unsent), and go on when the daemon reads again or fail at their deadline; none
hangs and none is lost (client_conn.ClientConnection.drain)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.client import AsyncClient
from sidecar.client import aio as client_module
from sidecar.errors import SidecarUnavailable
from sidecar.protocol import (
    EnqueuedItem,
    EnqueueResult,
    FrameReader,
    OkReply,
    append_frame,
    decode_request,
)

# Each payload is sent alone (over FOLD_ITEM_MAX_BYTES), and eight of them are well past the
# 1 MiB the client lets wait unsent, and past what the socket's kernel buffers hold.
PAYLOAD = "x" * (512 * 1024)
CALLS = 8


@contextlib.asynccontextmanager
async def gated_daemon(path: str, reading: asyncio.Event) -> AsyncIterator[list[int]]:
    """A server that reads nothing until `reading` is set, then answers every enqueue; yields
    the ids of the requests it answered."""
    answered: list[int] = []
    served: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = []

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def serve() -> None:
            await reading.wait()
            frames = FrameReader(1 << 24)
            while data := await reader.read(1 << 20):
                out = bytearray()
                for body in frames.feed(data):
                    req = decode_request(body)
                    assert req.id is not None
                    answered.append(req.id)
                    item = EnqueuedItem(queue_id=f"q{req.id}", status="queued", created=True,
                                        priority=5, expires_at=1.0)  # fmt: skip
                    append_frame(out, OkReply(id=req.id, result=EnqueueResult(items=[item])))
                writer.write(out)

        served.append((asyncio.get_running_loop().create_task(serve()), writer))

    server = await asyncio.start_unix_server(connected, path, limit=1 << 16)
    try:
        yield answered
    finally:
        server.close()
        for task, writer in served:
            task.cancel()
            writer.close()
            await asyncio.gather(task, writer.wait_closed(), return_exceptions=True)


async def _passes(n: int = 5) -> None:
    """Let the loop run n passes: the calls made so far reach the transport by then."""
    for _ in range(n):
        await asyncio.sleep(0)


async def _over_the_mark(client: AsyncClient, calls: list[asyncio.Task[EnqueuedItem]]) -> None:
    """Make calls until the unsent bytes pass the mark, then CALLS more, which must wait."""
    conn = client._conn
    assert conn is not None
    calls += [asyncio.create_task(client.enqueue(PAYLOAD)) for _ in range(CALLS)]
    await _passes()
    assert conn.write_buffer_size() > client_module._WRITE_HIGH_BYTES
    calls += [asyncio.create_task(client.enqueue(PAYLOAD)) for _ in range(CALLS)]
    await _passes()
    assert conn.paused  # the later calls wait for the transport to drain
    assert not any(call.done() for call in calls)


async def test_calls_wait_while_the_daemon_does_not_read_and_go_on_when_it_does(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    reading = asyncio.Event()
    async with gated_daemon(path, reading) as answered, AsyncClient(path, timeout_s=30.0) as c:
        calls: list[asyncio.Task[EnqueuedItem]] = []
        await _over_the_mark(c, calls)
        reading.set()
        results = await asyncio.gather(*calls)
    assert sorted(r.queue_id for r in results) == sorted(f"q{i}" for i in answered)
    assert len(answered) == 2 * CALLS  # each sent once: no call was lost or resent


@pytest.mark.slow
async def test_calls_waiting_on_a_daemon_that_never_reads_fail_at_their_deadline(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    async with gated_daemon(path, asyncio.Event()), AsyncClient(path, timeout_s=1.0) as client:
        calls: list[asyncio.Task[EnqueuedItem]] = []
        await _over_the_mark(client, calls)
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert len(results) == 2 * CALLS
    for r in results:
        assert isinstance(r, SidecarUnavailable), r
        assert r.details == {"sent": True, "reason": "timeout"}


async def test_close_while_calls_wait_to_drain_fails_them_and_returns(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    async with gated_daemon(path, asyncio.Event()):
        client = await AsyncClient(path, timeout_s=30.0).connect()
        calls: list[asyncio.Task[EnqueuedItem]] = []
        await _over_the_mark(client, calls)
        await client.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert len(results) == 2 * CALLS
    assert all(isinstance(r, SidecarUnavailable) for r in results), results
