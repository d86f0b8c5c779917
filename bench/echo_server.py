"""The ceiling for the local mode: a server with the daemon's framing and no queue work.

It reads frames exactly as the daemon does (sidecar.protocol.FrameReader, the 4-byte prefix),
reads only `id` and `op` from each request, and answers with an OkReply carrying a canned
result of the right shape (and size: a dequeue reply carries a job with a payload as large as
the bench's), so the same client code runs against it and against the daemon. What it costs is
framing, syscalls and the event loop: the most any server of this protocol could do here.

Run: `python -m bench.echo_server SOCKET_PATH`; prints `ready` on stdout once it listens and
stops on SIGTERM or SIGINT. bench/relay.py answers as it does, each request once Redis has run
a command for it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from typing import cast

import msgspec
import uvloop

from bench.payload import llm_request
from sidecar.protocol import (
    DECODE_ERRORS,
    Completed,
    CompleteManyResult,
    DequeueResult,
    EnqueuedItem,
    EnqueueResult,
    FrameReader,
    Job,
    OkReply,
    RequestInfo,
    append_frame,
)

READY_LINE = "ready"
# The daemon's default frame limit; the echo never sees a frame near it.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class Envelope(msgspec.Struct):
    """The fields the echo reads; msgspec skips the rest without building it. An enqueue's (or
    a complete_many's) items are counted (not decoded): a batch gets one result item per item,
    as the daemon's."""

    id: int | None = None
    op: str = ""
    items: list[msgspec.Raw] | None = None


_envelope = msgspec.msgpack.Decoder(Envelope)


def read_envelope(body: bytes) -> Envelope:
    """What the echo reads of a request frame; an empty one for a frame it cannot decode."""
    try:
        return _envelope.decode(body)
    except DECODE_ERRORS:
        return Envelope()


_encode = msgspec.msgpack.encode


def canned_results() -> CannedResults:
    """A pre-encoded result per op, shaped like the daemon's, so the client decodes it alike."""
    now = time.time()
    info = RequestInfo(
        queue_id="q-echo",
        status="completed",
        priority=5,
        attempts=1,
        max_attempts=3,
        created_at=now,
        expires_at=now + 3600,
        updated_at=now,
        size_bytes=1024,
    )
    enqueued = EnqueuedItem(
        queue_id="q-echo", status="queued", created=True, priority=5, expires_at=now + 3600
    )
    job = Job(
        queue_id="q-echo",
        lease_id="lease-echo",
        lease_expires_at=now + 60,
        payload=msgspec.Raw(_encode(llm_request())),
        priority=5,
        attempts=1,
        max_attempts=3,
        created_at=now,
        expires_at=now + 3600,
    )
    singles = {
        "enqueue": msgspec.Raw(_encode(EnqueueResult(items=[enqueued]))),
        "dequeue": msgspec.Raw(_encode(DequeueResult(items=[job]))),
        "complete": msgspec.Raw(_encode(info)),
        "fail": msgspec.Raw(_encode(info)),
        "extend": msgspec.Raw(_encode(info)),
    }
    return CannedResults(singles, enqueued, Completed(completed=info))


class CannedResults(dict[str, msgspec.Raw]):
    """The pre-encoded result of each op; a batch's (`enqueue/n`, `complete_many/n`: one result
    item per item, as the daemon's) is encoded the first time its size is asked for, and kept.
    AsyncClient sends the single enqueues and completes of one loop pass as one request
    (sidecar/client/fold.py)."""

    def __init__(
        self, singles: dict[str, msgspec.Raw], enqueued: EnqueuedItem, completed: Completed
    ) -> None:
        super().__init__(singles)
        self._enqueued, self._completed = enqueued, completed

    def __missing__(self, key: str) -> msgspec.Raw:
        op, _, count = key.partition("/")
        n = int(count)
        result = (
            EnqueueResult(items=[self._enqueued] * n)
            if op == "enqueue"
            else CompleteManyResult(results=[self._completed] * n, items=[])
        )
        raw = self[key] = msgspec.Raw(_encode(result))
        return raw


class EchoConnection(asyncio.Protocol):
    """Answers every frame of one read with one write, as the daemon does."""

    def __init__(self, results: CannedResults) -> None:
        self.results = results
        self.reader = FrameReader(MAX_FRAME_BYTES)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        out = bytearray()
        for body in self.reader.feed(data):
            append_frame(out, self.reply(body))
        if self.reader.error is not None:
            self.transport.close()
        if out:
            self.transport.write(out)

    def reply(self, body: bytes) -> OkReply:
        """The canned answer to one request frame."""
        return self.answer(read_envelope(body))

    def answer(self, env: Envelope) -> OkReply:
        """The canned answer to one request, read as far as its envelope."""
        op, n = env.op, len(env.items or ())
        if env.items is not None and (op == "complete_many" or (op == "enqueue" and n > 1)):
            result: msgspec.Raw | None = self.results[f"{op}/{n}"]
        else:
            result = self.results.get(op)
        return OkReply(id=env.id, result=result)


async def serve(path: str, factory: Callable[[], asyncio.Protocol] | None = None) -> None:
    """Listen on path until SIGTERM or SIGINT, with an EchoConnection per client unless a
    factory is given (bench/relay.py)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if factory is None:
        results = canned_results()
        factory = lambda: EchoConnection(results)  # noqa: E731
    server = await loop.create_unix_server(factory, path, backlog=1024)
    print(READY_LINE, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.echo_server SOCKET_PATH")
    uvloop.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
