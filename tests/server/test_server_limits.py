"""What a client can make the daemon hold: time inside a frame, idle slots, buffered bytes.

Bytes are measured with the server's own counters (in process), not with RSS timings.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from sidecar.app import build_server
from sidecar.client import AsyncClient, item
from sidecar.config import ConfigError, Settings
from sidecar.errors import BadFrame
from sidecar.protocol import FrameReader, Reply, encode_frame
from sidecar.queue.build import build_local_queue
from sidecar.server import SidecarServer
from tests.support.daemon import running_daemon, short_tmpdir
from tests.support.helpers import live, read_replies_async

HALF_FRAME = (100).to_bytes(4, "big") + b"\x82" * 10  # a 100-byte frame, 10 bytes of it sent


def read_replies(sock: socket.socket) -> list[Reply]:
    """Every frame the daemon sends until it closes the connection (bounded by a timeout)."""
    sock.settimeout(15)
    frames = FrameReader(1 << 24)
    replies: list[Reply] = []
    while data := sock.recv(65536):
        replies += [msgspec.msgpack.decode(b, type=Reply) for b in frames.feed(data)]
    return replies


@pytest.mark.slow
def test_half_frames_lose_their_slots_and_a_new_client_is_served() -> None:
    limit = 5
    with running_daemon(
        SIDECAR_MAX_CONNECTIONS=str(limit), SIDECAR_FRAME_TIMEOUT_SECONDS="0.5"
    ) as d:
        holders = []
        for _ in range(limit):  # fill every slot with a frame that never completes
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            s.sendall(HALF_FRAME)
            holders.append(s)
        for s in holders:
            [reply] = read_replies(s)  # the error, then the daemon closes the connection
            s.close()
            assert reply.id is None and reply.error is not None
            assert reply.error.code == BadFrame.code
            assert reply.error.message == "frame not completed within 0.5s (14 bytes of it read)"
            assert reply.error.details == {"partial_bytes": 14, "frame_timeout_s": 0.5}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.socket_path)
            s.sendall(encode_frame({"op": "health", "id": 1}))
            s.shutdown(socket.SHUT_WR)
            [reply] = read_replies(s)
        assert reply.ok and reply.id == 1  # a new client is served


@pytest.mark.slow
async def test_a_client_that_never_reads_its_replies_loses_its_slot() -> None:
    with running_daemon(SIDECAR_MAX_CONNECTIONS="1", SIDECAR_FRAME_TIMEOUT_SECONDS="0.5") as d:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as greedy:
            greedy.connect(d.socket_path)
            # About 600 KB of replies, never read, back up the daemon's writes; the 100 KB of
            # requests fit in the socket's buffer, so this send never blocks.
            greedy.sendall(b"".join(encode_frame({"op": "health", "id": i}) for i in range(6_000)))
            await until(lambda: bool(d.events("connection_write_timeout")), "the daemon gives up")
        async with AsyncClient(d.socket_path) as c:  # the slot is free again
            assert (await c.health()).status == "ok"


@pytest.mark.slow
async def test_idle_connections_close_but_long_polls_and_clients_carry_on() -> None:
    with running_daemon(SIDECAR_IDLE_TIMEOUT_SECONDS="0.5") as d:
        async with AsyncClient(d.socket_path) as shared, AsyncClient(d.socket_path) as poller:
            assert (await shared.health()).status == "ok"
            # A long poll longer than the idle timeout is not idleness: it gets its answer.
            assert await poller.dequeue(1, wait_s=1.5) == []
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
                idle.connect(d.socket_path)
                assert read_replies(idle) == []  # closed without a word
            # The shared client's connection was closed too; its next call reconnects.
            assert (await shared.health()).status == "ok"
        await until(lambda: len(d.events("connection_idle_closed")) >= 2, "both are logged")


# -- bytes held, in process --------------------------------------------------------------------


@pytest.fixture
async def small_server() -> AsyncIterator[SidecarServer]:
    with short_tmpdir() as tmp:
        settings = Settings.from_env(
            {
                "SIDECAR_SOCKET": str(tmp / "s.sock"),
                "SIDECAR_MAX_FRAME_BYTES": "65536",
                "SIDECAR_MAX_BUFFERED_MB": "0.25",
                "SIDECAR_MAX_WAIT_SECONDS": "60",
            }
        )
        server = build_server(settings, build_local_queue(settings))
        await server.start()
        try:
            yield server
        finally:
            await server.drain(2.0)


async def until(check: Callable[[], bool], what: str, bound_s: float = 10.0) -> None:
    """Wait for a condition of the server's state, checked every few ms, failing after bound_s."""
    for _ in range(int(bound_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting until {what}")


def padded_health(request_id: int, body_bytes: int) -> bytes:
    """A health request framed to exactly body_bytes (the daemon ignores the unknown field)."""
    base = len(encode_frame({"op": "health", "id": request_id, "pad": ""})) - 4
    pad = "x" * (body_bytes - base - 2)  # str8 header: 2 bytes for lengths 32..255, 3 above
    frame = encode_frame({"op": "health", "id": request_id, "pad": pad})
    if len(frame) - 4 != body_bytes:
        pad = pad[: body_bytes - base - 3]
        frame = encode_frame({"op": "health", "id": request_id, "pad": pad})
    assert len(frame) - 4 == body_bytes
    return frame


@pytest.mark.slow
async def test_partial_frames_stay_within_the_budget_until_the_frame_timeout_frees_them(
    small_server: SidecarServer,
) -> None:
    server = small_server
    budget = server.state.max_buffered  # 256 KiB
    n, first, piece = 20, 30_000, 2_000
    frames = [padded_health(i, 40_000) for i in range(n)]
    conns = [await asyncio.open_unix_connection(server.path) for _ in range(n)]
    try:
        for at in range(0, first, piece):
            # One piece per connection per round, read before the next: each read adds at
            # most a piece, so the bound below does not depend on how the kernel batches.
            for (_, writer), frame in zip(conns, frames, strict=True):
                writer.write(frame[at : at + piece])
                await writer.drain()
            sent = at + piece

            def settled(sent: int = sent) -> bool:
                return len(live(server)) == n and all(
                    c.reading_paused or c.held == sent for c in live(server)
                )

            await until(settled, "every connection is paused or has been read")
        assert 20 * first > 2 * budget  # what the clients sent is far over the budget
        assert budget <= server.state.buffered <= budget + n * piece
        assert server.state.budget_paused

        # A paused connection does not even notice its peer leave; the frame timeout is what
        # frees a stalled frame. Shortened here, past the filling, to see it drain.
        server.state.frame_timeout_s = 0.1
        await until(lambda: not live(server), "the stalled frames are refused")
        assert server.state.buffered == 0 and not server.state.budget_paused
        for reader, _ in conns:
            # The bad_frame error, or a reset: the kernel resets a connection closed with
            # input unread (protocol.md, section 5).
            try:
                [reply] = await read_replies_async(reader, 1)
            except ConnectionResetError:
                continue
            assert reply.error is not None and reply.error.code == "bad_frame"
    finally:
        for _, writer in conns:
            writer.close()
    async with AsyncClient(server.path) as c:  # and the daemon serves a new client
        assert (await c.health()).status == "ok"


async def test_a_full_budget_pauses_new_requests_until_it_drains(
    small_server: SidecarServer,
) -> None:
    server = small_server
    pollers = [await asyncio.open_unix_connection(server.path) for _ in range(5)]
    victim_reader, victim = await asyncio.open_unix_connection(server.path)
    try:
        for _, writer in pollers:  # a long poll, then 70 KB of requests waiting behind it
            writer.write(encode_frame({"op": "dequeue", "id": 0, "max_items": 1, "wait_s": 60}))
            writer.write(b"".join(padded_health(i + 1, 1_000) for i in range(70)))
        await until(
            lambda: server.state.buffered >= server.state.max_buffered,
            "the pollers fill the budget",
        )
        victim.write(encode_frame({"op": "health", "id": 7}))
        await until(
            lambda: len(server.state.budget_paused) >= 1, "a reader is paused for the budget"
        )
        assert server.state.buffered <= server.state.max_buffered + 5 * 70_000
        await until(lambda: all(c.reading_paused for c in live(server)), "every reader is paused")
        async with AsyncClient(server.path) as producer:  # work: the polls answer, bytes drain
            await producer.enqueue_many([item(n) for n in range(5)])
        for reader, _ in pollers:
            replies = await read_replies_async(reader, 71)
            assert [r.id for r in replies] == list(range(71)) and all(r.ok for r in replies)
        [reply] = await read_replies_async(victim_reader, 1)
        assert reply.ok and reply.id == 7  # resumed once the budget drained
    finally:
        for _, writer in [*pollers, (victim_reader, victim)]:
            writer.close()
    await until(lambda: server.state.buffered == 0, "the bytes are released")


async def test_requests_behind_a_long_poll_are_bounded_in_bytes(
    small_server: SidecarServer,
) -> None:
    server = small_server
    n, size = 2_000, 1_000
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(encode_frame({"op": "dequeue", "id": 0, "max_items": 1, "wait_s": 60}))
    flood = b"".join(padded_health(i + 1, size) for i in range(n))  # 2 MB of requests

    async def send() -> None:
        writer.write(flood)
        await writer.drain()

    sending = asyncio.create_task(send())
    try:
        await flood_bounded(server, reader, sending, n, size)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    await until(lambda: server.state.buffered == 0, "the bytes are released")


async def flood_bounded(
    server: SidecarServer,
    reader: asyncio.StreamReader,
    sending: asyncio.Task[None],
    n: int,
    size: int,
) -> None:
    await until(lambda: any(c.reading_paused for c in live(server)), "the connection is paused")
    [conn] = live(server)
    assert conn.inbox_bytes <= server.state.max_inbox_bytes + 256 * 1024  # one read past the bound
    assert conn.held < n * size // 4
    assert not sending.done()  # the rest waits in the socket, not in the daemon

    async with AsyncClient(server.path) as producer:  # work arrives: the poll answers
        await producer.enqueue("wake up")
    replies = await read_replies_async(reader, n + 1)
    await sending
    assert [r.id for r in replies] == list(range(n + 1)) and all(r.ok for r in replies)


def test_limit_settings_parse_and_name_bad_values() -> None:
    s = Settings.from_env(
        {
            "SIDECAR_ALLOWED_UIDS": "0, 1000",
            "SIDECAR_ALLOWED_GIDS": "27",
            "SIDECAR_SOCKET_GROUP": "root",
            "SIDECAR_FRAME_TIMEOUT_SECONDS": "2.5",
            "SIDECAR_IDLE_TIMEOUT_SECONDS": "600",
            "SIDECAR_MAX_BUFFERED_MB": "16",
        }
    )
    assert (s.allowed_uids, s.allowed_gids, s.socket_group) == ((0, 1000), (27,), 0)
    assert (s.frame_timeout_s, s.idle_timeout_s, s.max_buffered_bytes) == (2.5, 600, 16 << 20)
    bad = {
        "SIDECAR_ALLOWED_UIDS": "root",
        "SIDECAR_SOCKET_GROUP": "no-such-group-here",
        "SIDECAR_FRAME_TIMEOUT_SECONDS": "0",
        "SIDECAR_IDLE_TIMEOUT_SECONDS": "-1",
    }
    with pytest.raises(ConfigError) as info:
        Settings.from_env(bad)
    assert sorted(line.split("=")[0] for line in str(info.value).splitlines()) == sorted(bad)
    with pytest.raises(ConfigError, match="expected at least one whole frame"):
        Settings.from_env({"SIDECAR_MAX_BUFFERED_MB": "1", "SIDECAR_MAX_FRAME_BYTES": "8388608"})
