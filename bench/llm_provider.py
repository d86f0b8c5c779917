"""A minimal OpenAI-compatible provider for the LLM bench: fixed answer, HTTP/1.1 keep-alive.

Usage: `python -m bench.llm_provider PORT`; prints `ready` on stdout once it listens. As little
work per request as possible, so the bench measures the gateway rather than this server.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "model": "bench-model",
    "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "bench answer"}}],
}).encode()  # fmt: skip
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nopenai-version: 2020-10-01\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


class Provider(asyncio.Protocol):
    """Answers every complete request (headers + Content-Length body) with RESPONSE."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, only duck-typed as one.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Provider, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
