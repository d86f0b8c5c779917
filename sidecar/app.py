"""Wiring and life cycle: build the daemon from Settings, then signals → start → serve → drain."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable

import structlog
import uvloop

from sidecar import __version__
from sidecar.config import Settings
from sidecar.handlers import Ops
from sidecar.queue.base import QueueManager
from sidecar.queue.local import LocalQueue
from sidecar.server import SidecarServer, StartupError
from sidecar.systemd import (
    ActivationError,
    Notifier,
    Supervisor,
    install_debug_hooks,
    listen_socket,
    watchdog_interval_s,
)

log = structlog.get_logger("sidecar")

# The exit code of a daemon stopped by a second signal before its drain finished.
EXIT_FORCED = 1
# Bounds the look at what is left before a forced exit: "at once" must stay at once.
FORCED_EXIT_STATS_TIMEOUT_S = 0.5


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
    supervisor = Supervisor(Notifier.from_env(), watchdog_s=watchdog_interval_s())
    queue: QueueManager | None = None
    server: SidecarServer | None = None
    if shutdown is None:
        shutdown = _stop_on_signals(loop, lambda: (server, queue))
    if os.environ.get("SIDECAR_DEBUG_HOOKS") == "1":  # test-only, never a documented setting
        install_debug_hooks(loop, float(os.environ.get("SIDECAR_DEBUG_BLOCK_SECONDS", "3")))
    try:
        listen_sock = listen_socket()
    except ActivationError as exc:
        raise StartupError(str(exc)) from exc
    if listen_sock is not None and listen_sock.getsockname() != settings.socket_path:
        # Clients and `sidecar health` find the daemon through SIDECAR_SOCKET.
        log.warning(
            "socket_path_mismatch",
            inherited=listen_sock.getsockname(),
            socket=settings.socket_path,
        )
    queue = await build_queue(settings)
    await queue.start()
    try:
        ops = Ops(settings, queue, connections=lambda: len(server.connections) if server else 0)
        server = SidecarServer(ops, listen_sock=listen_sock)
        await server.start()
        report = await queue.health()
        log.info(
            "serving",
            socket=settings.socket_path,
            mode=report.mode,
            version=__version__,
            redis=settings.redacted_redis_url(),
            socket_activated=listen_sock is not None,
        )
        supervisor.ready(await status_line(queue))
        supervisor.start_status(lambda: status_line(queue))
        await shutdown.wait()
        supervisor.stopping(settings.drain_timeout_s)
        log.info("draining", connections=len(server.connections))
        await server.drain(settings.drain_timeout_s)
    finally:
        supervisor.close()
        await queue.close()
    log.info("stopped")


async def status_line(queue: QueueManager) -> str:
    """The one-line STATUS= for systemctl status: health, mode, counts, why degraded."""
    report = await queue.health()
    stats = await queue.stats()
    line = (
        f"{report.status}: mode={report.mode} queued={stats.queued} "
        f"processing={stats.processing}"
    )
    return f"{line} ({'; '.join(report.reasons)})" if report.reasons else line


def _stop_on_signals(
    loop: asyncio.AbstractEventLoop,
    parts: Callable[[], tuple[SidecarServer | None, QueueManager | None]],
) -> asyncio.Event:
    """The first SIGTERM/SIGINT starts the drain; a second one exits at once."""
    shutdown = asyncio.Event()
    forced: list[asyncio.Task[None]] = []  # holds the task so it is not collected mid-run

    def on_signal(signame: str) -> None:
        if not shutdown.is_set():
            shutdown.set()
        elif not forced:
            forced.append(loop.create_task(_exit_now(signame, *parts())))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    return shutdown


async def _exit_now(signame: str, server: SidecarServer | None, queue: QueueManager | None) -> None:
    """Log what the drain leaves behind, then end the process without waiting for it."""
    left: dict[str, object] = {}
    if server is not None:
        left["connections"] = len(server.connections)
        left["unanswered"] = sum(len(c.inbox) for c in server.connections)
    if queue is not None:
        try:
            stats = await asyncio.wait_for(queue.stats(), FORCED_EXIT_STATS_TIMEOUT_S)
        except Exception as exc:  # a store that cannot answer now must not delay the exit
            left["store_error"] = type(exc).__name__
        else:
            local = stats.stores.get("local", stats)
            left["local_queued"] = local.queued
            left["local_processing"] = local.processing
    log.warning("forced_exit", signal=signame, **left)
    sys.stderr.flush()
    # os._exit, not an exception: the operator asked not to wait for the drain or the
    # hand-over, and unwinding would run them; the log line above says what they left.
    os._exit(EXIT_FORCED)


def serve(settings: Settings) -> None:
    """Run the daemon on uvloop until a signal stops it."""
    uvloop.run(run_daemon(settings))
