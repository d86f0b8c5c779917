"""The server's eager ops (the local store alone): each op's first step runs inside the read.

A connection is driven in-process through a recording transport, so what is written, when and
in how many writes is observed exactly, with the real journaled local store behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from sidecar.app import build_server
from sidecar.config import Settings
from sidecar.protocol import Enqueue, EnqueueItem, FrameReader, Reply, append_frame
from sidecar.queue.build import build_local_queue
from sidecar.queue.local import LocalQueue
from sidecar.server import SidecarServer
from sidecar.server.connection import Connection
from tests.support.daemon import short_tmpdir

READ = 64  # requests in one read, as a pipelining client sends them


class RecordingTransport:
    """Keeps each write's replies, and whether the journal had everything on disk by then."""

    def __init__(self, store: LocalQueue) -> None:
        self.store = store
        self.writes: list[list[Reply]] = []
        self.journal_behind: list[bool] = []
        self.written = asyncio.Event()
        self._frames = FrameReader(1 << 24)

    def write(self, data: bytes | bytearray) -> None:
        journal = self.store._journal
        assert journal is not None
        self.journal_behind.append(journal.pending)
        bodies = self._frames.feed(bytes(data))
        self.writes.append([msgspec.msgpack.decode(b, type=Reply) for b in bodies])
        self.written.set()

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def served(fsync: str) -> AsyncIterator[tuple[SidecarServer, LocalQueue]]:
    with short_tmpdir() as tmp:
        settings = Settings.from_env(
            {
                "SIDECAR_SOCKET": str(tmp / "s.sock"),
                "SIDECAR_STATE_DIR": str(tmp / "state"),
                "SIDECAR_JOURNAL_FSYNC": fsync,
            }
        )
        store = build_local_queue(settings)
        await store.start()
        try:
            server = build_server(settings, store)
            assert server.state.eager_ops  # the local store alone: the default
            yield server, store
        finally:
            await store.close()


@pytest.fixture
async def fsync_off() -> AsyncIterator[tuple[SidecarServer, LocalQueue]]:
    async for pair in served("off"):
        yield pair


@pytest.fixture
async def fsync_always() -> AsyncIterator[tuple[SidecarServer, LocalQueue]]:
    async for pair in served("always"):
        yield pair


def enqueues(count: int) -> bytes:
    out = bytearray()
    payload = msgspec.Raw(msgspec.msgpack.encode({"messages": ["hi"]}))
    for i in range(1, count + 1):
        append_frame(out, Enqueue(id=i, items=[EnqueueItem(payload=payload, queue_id=f"q{i}")]))
    return bytes(out)


def connect(server: SidecarServer, store: LocalQueue) -> tuple[Connection, RecordingTransport]:
    conn = Connection(server.state)
    transport = RecordingTransport(store)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def test_ops_that_never_wait_are_answered_inside_the_read_in_one_write(
    fsync_off: tuple[SidecarServer, LocalQueue],
) -> None:
    server, store = fsync_off
    conn, transport = connect(server, store)
    conn.data_received(enqueues(READ))
    # Answered before data_received returned: no task per request, no loop pass in between.
    assert not conn.running
    assert len(transport.writes) == 1
    [replies] = transport.writes
    assert [r.id for r in replies] == list(range(1, READ + 1))
    assert all(r.ok for r in replies)
    assert transport.journal_behind == [False]  # every record written before the reply
    assert (await store.stats()).queued == READ
    conn.connection_lost(None)


async def test_ops_that_wait_for_the_group_commit_answer_after_it_in_order(
    fsync_always: tuple[SidecarServer, LocalQueue],
) -> None:
    server, store = fsync_always
    conn, transport = connect(server, store)
    conn.data_received(enqueues(READ))
    assert not transport.writes  # each waits for the fsync of its loop pass
    assert len(conn.running) == READ
    replies: list[Reply] = []
    while len(replies) < READ:
        transport.written.clear()
        await asyncio.wait_for(transport.written.wait(), 10)
        replies = [r for write in transport.writes for r in write]
    assert [r.id for r in replies] == list(range(1, READ + 1))
    assert all(r.ok for r in replies)
    assert not any(transport.journal_behind)  # no reply before its records were synced
    conn.connection_lost(None)


async def test_an_op_suspended_after_its_eager_step_is_cancelled_with_its_connection(
    fsync_always: tuple[SidecarServer, LocalQueue],
) -> None:
    server, store = fsync_always
    conn, transport = connect(server, store)
    conn.data_received(enqueues(1))
    [task] = conn.running
    conn.connection_lost(None)  # the client went away while the op waited for the fsync
    await asyncio.wait_for(asyncio.wait([task]), 10)
    assert task.cancelled()
    assert not transport.writes
    # The commit itself is shared and shielded: the record still reaches the disk.
    journal = store._journal
    assert journal is not None
    await asyncio.wait_for(journal.flushed(), 10)
    assert (await store.status("q1")) is not None
