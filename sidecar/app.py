"""Wiring and life cycle: build the daemon from Settings, then signals → start → serve → drain."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping

import structlog
import uvloop

from sidecar import __version__, systemd
from sidecar.config import Settings
from sidecar.errors import StartupError
from sidecar.metrics import DaemonMetrics, MetricsListener
from sidecar.observe import ConnectionCount, NullObserver, Observer
from sidecar.queue.base import QueueStore
from sidecar.queue.build import build_queues
from sidecar.queue.limit import Limiter, build_limiter
from sidecar.queue.local import JournalError, LocalQueue
from sidecar.server import Ops, ServerState, SidecarServer

log = structlog.get_logger("sidecar")

# The exit code of a daemon stopped by a second signal before its drain finished.
EXIT_FORCED = 1
# Bounds the look at what is left before a forced exit: "at once" must stay at once.
FORCED_EXIT_STATS_TIMEOUT_S = 0.5


async def status_line(queue: QueueStore) -> str:
    """The one-line STATUS= for systemctl status: health, mode, counts, why degraded."""
    report = await queue.health()
    stats = await queue.stats()
    line = (
        f"{report.status}: mode={report.mode} queued={stats.queued} "
        f"processing={stats.processing}"
    )
    return f"{line} ({'; '.join(report.reasons)})" if report.reasons else line


def exit_on_next_signal(
    loop: asyncio.AbstractEventLoop, server: SidecarServer, queue: QueueStore
) -> None:
    """Once the drain starts, a second SIGTERM/SIGINT exits at once."""
    forced: list[asyncio.Task[None]] = []  # holds the task so it is not collected mid-run

    def on_signal(signame: str) -> None:
        if not forced:
            forced.append(loop.create_task(_exit_now(signame, server, queue)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


async def _exit_now(signame: str, server: SidecarServer, queue: QueueStore) -> None:
    """Log what the drain leaves behind, then end the process without waiting for it."""
    left: dict[str, object] = {
        "connections": len(server.state.connections),
        "unanswered": server.state.unanswered(),
    }
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


async def start_metrics_listener(
    settings: Settings, metrics: DaemonMetrics
) -> MetricsListener | None:
    """The HTTP listener for scrapers when SIDECAR_METRICS_ADDR is set."""
    if settings.metrics_addr is None:
        return None
    listener = MetricsListener(metrics.render, *settings.metrics_addr)
    try:
        await listener.start()
    except OSError as exc:
        host, port = settings.metrics_addr
        raise StartupError(f"SIDECAR_METRICS_ADDR={host}:{port} cannot be bound: {exc}") from None
    return listener


async def no_metrics() -> bytes:
    """The metrics op's text of a server built without a renderer (tests): empty."""
    return b""


def build_server(
    settings: Settings,
    queue: QueueStore,
    *,
    observer: Observer | None = None,
    render_metrics: Callable[[], Awaitable[bytes]] = no_metrics,
    eager_ops: bool | None = None,
    outbox: Mapping[str, QueueStore] | None = None,
    limiter: Limiter | None = None,
) -> SidecarServer:
    """The server and its ops, sharing the state this function owns: the stopping event (the
    server's drain sets it, the ops' long polls end on it) and the open-connection count (the
    server keeps it, health reports it).

    eager_ops (default: the queue is the local store alone): the ops run their first step
    inside the server's read, without a task; only stores that never enter asyncio.timeout
    (which needs a task) may. The Redis path does.
    outbox: the named queues beside `queue` (the request queue), by name.
    """
    if eager_ops is None:
        stores = [queue, *(outbox or {}).values()]
        eager_ops = all(isinstance(store, LocalQueue) for store in stores)
    stopping = asyncio.Event()
    count = ConnectionCount()
    ops = Ops(
        settings, queue, stopping=stopping, connections=count, render_metrics=render_metrics,
        outbox=outbox, limiter=limiter,
    )  # fmt: skip
    state = ServerState(
        settings,
        ops,
        stopping=stopping,
        count=count,
        observer=observer or NullObserver(),
        eager_ops=eager_ops,
    )
    return SidecarServer(state)


async def run_daemon(settings: Settings, shutdown: asyncio.Event | None = None) -> int:
    """Serve until `shutdown` is set (by SIGTERM/SIGINT when none is given), then drain.

    Returns how many acknowledged requests could not be kept (0 after a clean stop).
    """
    loop = asyncio.get_running_loop()
    supervisor = systemd.Supervisor(
        systemd.Notifier.from_env(), watchdog_s=systemd.watchdog_interval_s()
    )
    if os.environ.get("SIDECAR_DEBUG_HOOKS") == "1":  # test-only, never a documented setting
        systemd.install_debug_hooks(loop, float(os.environ.get("SIDECAR_DEBUG_BLOCK_SECONDS", "3")))
    own_signals = shutdown is None
    if shutdown is None:
        shutdown = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.set)
    metrics = DaemonMetrics(version=__version__, high_watermark=settings.queue_high_watermark,
                      low_watermark=settings.queue_low_watermark)  # fmt: skip
    queues = build_queues(settings, hooks=metrics, sync=metrics.timed_sync(os.fdatasync))
    queue = queues.requests
    metrics.bind(queue, outbox=queues.outbox)
    try:
        await queues.start()
    except JournalError as exc:
        raise StartupError(str(exc)) from None
    server: SidecarServer | None = None
    scrape: MetricsListener | None = None
    # The drain of connections and the hand-over to Redis share one deadline.
    deadline = loop.time() + settings.drain_timeout_s
    try:
        listen_sock = systemd.inherited_socket(settings.socket_path)
        server = build_server(
            settings, queue, observer=metrics, render_metrics=metrics.render,
            outbox=queues.outbox, limiter=build_limiter(settings, queue, metrics),
        )  # fmt: skip
        await (server.start_inherited(listen_sock) if listen_sock else server.start())
        scrape = await start_metrics_listener(settings, metrics)
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
        deadline = loop.time() + settings.drain_timeout_s
        log.info("draining", connections=len(server.state.connections))
        if own_signals:
            exit_on_next_signal(loop, server, queue)
        supervisor.stopping(settings.drain_timeout_s)
        await server.drain(settings.drain_timeout_s)
        supervisor.close()  # the watchdog does not apply to a stopping service
    finally:
        if scrape is not None:
            await scrape.close()
        await queues.close(max(0.0, deadline - loop.time()))
    if own_signals:
        # Everything is kept or handed over: a signal from here on has nothing left to cut
        # short, and must turn a clean stop neither into the forced exit's code 1 nor, once
        # the loop is gone, into death by the signal's default action.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    unkept = queues.unkept_at_close
    if unkept:
        log.error(
            "stopped",
            unkept=unkept,
            detail="the local journal could not be written at stop: these acknowledged requests "
            "are lost, or come back in an older state (a finished one may be handed out again)",
        )
    else:
        log.info("stopped", unkept=0)
    return unkept


async def _close_queue(queue: QueueStore, timeout_s: float) -> None:
    """Close one store; a manager over two stores hands the backlog over within timeout_s
    (bench/metrics_cost.py closes the store it built with it)."""
    await queue.close(timeout_s)


def serve(settings: Settings) -> int:
    """Run the daemon on uvloop until a signal stops it; how many requests were not kept."""
    return uvloop.run(run_daemon(settings))
