"""Wiring and life cycle: build the daemon from Settings, then signals → start → serve → drain."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import structlog
import uvloop

from sidecar import __version__
from sidecar.config import Settings
from sidecar.handlers import Ops
from sidecar.queue.base import QueueManager
from sidecar.queue.local import LocalQueue
from sidecar.server import SidecarServer

log = structlog.get_logger("sidecar")


def build_local_queue(settings: Settings, clock: Callable[[], float] = time.time) -> LocalQueue:
    """The bounded in-memory store sized by the QUEUE_* settings."""
    return LocalQueue(
        max_items=settings.queue_max_size,
        max_bytes=settings.queue_max_memory_bytes,
        high_watermark=settings.queue_high_watermark,
        low_watermark=settings.queue_low_watermark,
        retention_s=settings.retention_s,
        retry_after_s=settings.queue_retry_after_s,
        max_retained=settings.queue_max_retained,
        clock=clock,
    )


async def build_queue(settings: Settings) -> QueueManager:
    """The one place that decides which store serves: the only wiring in the daemon."""
    if settings.redis_url is None:
        log.warning(
            "local_queue_only",
            detail="REDIS_URL is not set: requests live in this process's memory and are lost "
            "if it stops",
        )
        return build_local_queue(settings)
    from sidecar.queue.redis import build_redis_queue
    from sidecar.queue.resilient import ResilientQueue

    # The resilient manager starts Redis itself, so a daemon whose Redis is down at boot
    # still starts, on the local queue, and moves to Redis when it answers.
    return ResilientQueue(build_redis_queue(settings), build_local_queue(settings))


async def run_daemon(settings: Settings, shutdown: asyncio.Event | None = None) -> None:
    """Serve until `shutdown` is set (by SIGTERM/SIGINT when none is given), then drain."""
    loop = asyncio.get_running_loop()
    if shutdown is None:
        shutdown = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.set)
    queue = await build_queue(settings)
    await queue.start()
    server: SidecarServer | None = None
    try:
        ops = Ops(settings, queue, connections=lambda: len(server.connections) if server else 0)
        server = SidecarServer(ops)
        await server.start()
        report = await queue.health()
        log.info(
            "serving",
            socket=settings.socket_path,
            mode=report.mode,
            version=__version__,
            redis=settings.redacted_redis_url(),
        )
        await shutdown.wait()
        log.info("draining", connections=len(server.connections))
        await server.drain(settings.drain_timeout_s)
    finally:
        await queue.close()
    log.info("stopped")


def serve(settings: Settings) -> None:
    """Run the daemon on uvloop until a signal stops it."""
    uvloop.run(run_daemon(settings))
