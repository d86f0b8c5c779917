"""The optional HTTP listener for scrapers: `GET /metrics` on the daemon's own event loop.

Not prometheus_client's thread server: rendering reads the stores, which live on the loop.
Deliberately tiny and bounded: one request per connection (`Connection: close`), a cap on the
request head's size, a read timeout, and a cap on connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from sidecar.metrics.registry import CONTENT_TYPE

log = structlog.get_logger("sidecar.metrics")

# A scraper's request head is a few hundred bytes; 8 KiB leaves room for long headers.
MAX_HEAD_BYTES = 8192
# A scraper sends its request at once; a connection silent this long is dropped.
READ_TIMEOUT_S = 5.0
# Prometheus scrapes one target with one connection; a few spare for curl and a second scraper.
MAX_CONNECTIONS = 8
PATH = "/metrics"

Render = Callable[[], Awaitable[bytes]]


class MetricsListener:
    """Serves the exposition over HTTP/1.1 on host:port (port 0: any free port)."""

    def __init__(
        self,
        render: Render,
        host: str,
        port: int,
        *,
        max_head_bytes: int = MAX_HEAD_BYTES,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._render = render
        self.host = host
        self.port = port
        self._max_head = max_head_bytes
        self._timeout = read_timeout_s
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        # The open connections' tasks and writers: close() ends them by aborting the transport
        # (a cancelled connection task would be reported by asyncio's stream callback).
        self._active: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        """Bind and listen; the bound port is in self.port afterwards."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=self._max_head
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics_listening", host=self.host, port=self.port, path=PATH)

    async def close(self) -> None:
        """Stop listening and end the connections still open."""
        if self._server is None:
            return
        self._server.close()
        for writer in self._active.values():
            writer.transport.abort()
        await asyncio.gather(*self._active, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._active) >= self._max_connections:
            # Dropped at once, unread: a reply would cost a read of the head first.
            log.warning("metrics_connection_refused", reason="max_connections")
            writer.transport.abort()
            return
        self._active[task] = writer
        try:
            status, body, content_type = await self._answer(reader)
        finally:
            del self._active[task]  # the reply's write is bounded by its own timeout
        await self._reply(writer, status, body, content_type)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        """Read one request head and decide the reply: (status, body, content type)."""
        try:
            async with asyncio.timeout(self._timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return 431, b"request head too large\n", "text/plain"
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return 408, b"incomplete request\n", "text/plain"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"bad request line\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != PATH.encode():
            return 404, b"not found: the metrics are at /metrics\n", "text/plain"
        if method != b"GET":
            return 405, b"only GET\n", "text/plain"
        try:
            return 200, await self._render(), CONTENT_TYPE
        except Exception:  # a bug in a collector must not end the listener
            log.exception("metrics_render_failed")
            return 500, b"metrics could not be rendered; see the daemon's log\n", "text/plain"

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
    ) -> None:
        reason = _REASONS.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        )
        if status == 405:
            head += "Allow: GET\r\n"
        try:
            writer.write(head.encode() + b"\r\n" + body)
            async with asyncio.timeout(self._timeout):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the scraper went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await writer.wait_closed()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
