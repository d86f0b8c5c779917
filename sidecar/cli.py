"""`sidecar`: run the daemon, probe it, inspect it, and operate on single requests."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import msgspec

from sidecar.client import Client, decode_payload
from sidecar.client.connection import TIMEOUT_ENV
from sidecar.config import ConfigError, Settings
from sidecar.config.docs import help_text
from sidecar.errors import SidecarError, SidecarUnavailable
from sidecar.operators import add_operator_commands
from sidecar.protocol import DEFAULT_QUEUE, StatsResult

EXIT_OK = 0
EXIT_ERROR = 1  # a command failed (or health: degraded)
EXIT_UNAVAILABLE = 2  # bad configuration, or the daemon is unreachable / unhealthy
CLI_TIMEOUT_S = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sidecar` command; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "work":
        return _work(args)
    if args.command == "web":
        return _web(args)
    # A probe answers sooner than a service call: 5 s unless the flag or the environment says.
    timeout = args.timeout or (None if os.environ.get(TIMEOUT_ENV) else CLI_TIMEOUT_S)
    try:
        with Client(args.socket, timeout_s=timeout) as client:
            return int(args.run(client, args))
    except ConfigError as err:  # a bad SIDECAR_CLIENT_* variable
        print(f"sidecar: configuration error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SidecarUnavailable as err:
        if args.command == "health" and args.json:
            print(json.dumps({"status": "unreachable", "reasons": [err.message]}))
        else:
            print(f"unreachable: {err.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SidecarError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return EXIT_ERROR


def _settings(args: argparse.Namespace) -> Settings | None:
    """The daemon's settings (with --socket applied), or None after printing what is wrong."""
    if args.socket:
        os.environ["SIDECAR_SOCKET"] = args.socket
    try:
        return Settings.from_env()
    except ConfigError as err:
        print(f"sidecar: configuration error: {err}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_UNAVAILABLE
    from sidecar.app import serve
    from sidecar.errors import StartupError, UnsafeSocketFolder
    from sidecar.logs import configure_logging

    configure_logging(settings.environment, settings.log_level)
    try:
        unkept = serve(settings)
    except ConfigError as err:  # found while building the daemon (an unreadable password file)
        print(f"sidecar: configuration error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except UnsafeSocketFolder as err:  # another user could take the socket: a setup problem
        print(f"sidecar: cannot start: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StartupError as err:
        print(f"sidecar: cannot start: {err}", file=sys.stderr)
        return EXIT_ERROR
    except SidecarError as err:
        print(f"sidecar: cannot start: {err.code}: {err.message}", file=sys.stderr)
        return EXIT_ERROR
    # Acknowledged requests that could not be kept: never report success.
    return EXIT_ERROR if unkept else EXIT_OK


def _work(args: argparse.Namespace) -> int:
    import asyncio

    settings = _settings(args)
    if settings is None:
        return EXIT_UNAVAILABLE
    try:
        # Imported here: the LLM side is an optional extra, and the daemon never needs it.
        from sidecar.llm.worker import serve_worker
    except ImportError as err:
        print(f"sidecar work needs the llm extra (pip install 'sidecar[llm]'): {err}",
              file=sys.stderr)  # fmt: skip
        return EXIT_UNAVAILABLE
    from sidecar.logs import configure_logging

    configure_logging(settings.environment, settings.log_level)
    try:
        asyncio.run(serve_worker(settings, concurrency=args.concurrency))
    except OSError as err:  # an unreadable LLM_API_KEY_FILE
        print(f"sidecar work: cannot start: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _web(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_UNAVAILABLE
    try:
        # Imported here: the dashboard is an optional extra, and the daemon never needs it.
        from sidecar.web import BindRefused, serve_web
    except ImportError as err:
        print(f"sidecar web needs the web extra (pip install 'sidecar[web]'): {err}",
              file=sys.stderr)  # fmt: skip
        return EXIT_UNAVAILABLE
    from sidecar.logs import configure_logging

    configure_logging(settings.environment, settings.log_level)
    try:
        serve_web(settings)
    except BindRefused as err:
        print(f"sidecar web: cannot start: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except OSError as err:  # the port is taken, or the host does not resolve
        print(f"sidecar web: cannot listen on {settings.web_host}:{settings.web_port}: {err}",
              file=sys.stderr)  # fmt: skip
        return EXIT_UNAVAILABLE
    return EXIT_OK


# -- commands ----------------------------------------------------------------------------------


def _health(client: Client, args: argparse.Namespace) -> int:
    h = client.health()
    if args.json:
        print(msgspec.json.encode(h).decode())
    else:
        why = f" ({'; '.join(h.reasons)})" if h.reasons else ""
        print(
            f"{h.status}: mode={h.mode} version={h.version} uptime={h.uptime_s:.0f}s "
            f"connections={h.connections}{why}"
        )
    return {"ok": EXIT_OK, "degraded": EXIT_ERROR}.get(h.status, EXIT_UNAVAILABLE)


def _stats(client: Client, args: argparse.Namespace) -> int:
    if args.watch:
        return watch_stats(client, args.interval, args.queue)
    stats = client.stats(queue=args.queue)
    if args.json:
        print(msgspec.json.encode(stats).decode())
        return EXIT_OK
    print(format_stats(stats))
    if args.queue == DEFAULT_QUEUE:
        # Results waiting for their caller are counted apart from requests: one line for them.
        outbox = [q for q in client.hello().queues if q != DEFAULT_QUEUE]
        parts = []
        for name in outbox:
            held = client.stats(queue=name)
            parts.append(f"{name} queued={held.queued} processing={held.processing}")
        if parts:
            print(f"outbox: {'; '.join(parts)} (sidecar stats --queue NAME for one)")
    return EXIT_OK


# The header comes back every this many lines, as vmstat's does, so columns stay readable.
WATCH_HEADER_EVERY = 20
WATCH_COLUMNS = (
    ("time", 8), ("mode", 14), ("queued", 7), ("proc", 6), ("enq/s", 8), ("done/s", 8),
    ("exp/s", 7), ("fail/s", 7), ("usage", 6), ("breaker", 7),
)  # fmt: skip


# How the services (`serve`, `work`) stop. They are services, not interactive tools: they
# handle SIGTERM and SIGINT themselves (as redis-server does), so an inherited SIGINT ignore
# does not make them unstoppable by either signal their supervisor or operator may send.
SERVICE_SIGNALS_HELP = (
    "SIGTERM or SIGINT (Ctrl-C) stops it: it {what}.\nIt handles both signals itself, also "
    "when started with SIGINT ignored\n(a background job of a script, `nohup sidecar ... &`)."
)
# How `stats --watch` stops (its --help).
WATCH_STOP_HELP = (
    "one line per interval (rates per second) until Ctrl-C or SIGTERM, either of which exits 0. "
    "Started with SIGINT ignored (a background job of a script, `nohup sidecar ... &`), it "
    "keeps ignoring Ctrl-C, as background jobs do; SIGTERM still stops it"
)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of `stats --watch`: ends the loop as Ctrl-C does."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raised once: a second SIGTERM while the first unwinds must not land in the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated


def watch_stats(client: Client, interval_s: float, queue: str = DEFAULT_QUEUE) -> int:
    """One line per interval until Ctrl-C or SIGTERM (exit 0); rates from successive replies.

    SIGINT keeps the disposition the process inherited: Python's KeyboardInterrupt when it
    was at its default, ignored when the parent ignored it (a background job must not die of
    the terminal's Ctrl-C). SIGTERM is handled here, so it stops the watch cleanly either way.
    """
    if not interval_s > 0:
        print("error: --interval must be a number of seconds > 0", file=sys.stderr)
        return EXIT_ERROR
    previous: tuple[float, StatsResult] | None = None
    lines = 0
    next_at = time.monotonic()
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        while True:
            stats, now = client.stats(queue=queue), time.monotonic()
            if lines % WATCH_HEADER_EVERY == 0:
                print(_watch_row([name for name, _ in WATCH_COLUMNS]), flush=True)
            print(_watch_line(stats, previous, now), flush=True)
            previous, lines = (now, stats), lines + 1
            next_at += interval_s
            time.sleep(max(0.0, next_at - time.monotonic()))
    except (KeyboardInterrupt, _Terminated):
        return EXIT_OK
    finally:
        if before is not None:  # None: a handler Python did not install; nothing to put back
            signal.signal(signal.SIGTERM, before)


def _watch_line(
    stats: StatsResult, previous: tuple[float, StatsResult] | None, now: float
) -> str:
    def rate(field: str) -> str:
        if previous is None:
            return "-"
        seconds, before = now - previous[0], previous[1]
        delta = getattr(stats, field) - getattr(before, field)
        return f"{max(0, delta) / seconds:.1f}" if seconds > 0 else "-"

    # Usage and breaker are the local queue's (its limits and watermarks); in Redis mode the
    # combined stats carry them under stores["local"].
    local = stats.stores.get("local", stats)
    return _watch_row([
        time.strftime("%H:%M:%S"), stats.mode or "local_only", str(stats.queued),
        str(stats.processing), rate("accepted"), rate("completed"), rate("expired"),
        rate("failed"), f"{local.usage:.0%}", "open" if local.breaker_open else "closed",
    ])  # fmt: skip


def _watch_row(cells: list[str]) -> str:
    return " ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, WATCH_COLUMNS, strict=True))
    ).rstrip()


def _metrics(client: Client, args: argparse.Namespace) -> int:
    sys.stdout.write(client.metrics().text)  # the exposition ends its own lines
    return EXIT_OK


def format_stats(stats: StatsResult) -> str:
    """A readable two-column table of the stats."""
    rows: list[tuple[str, Any]] = []
    for name in stats.__struct_fields__:
        value = getattr(stats, name)
        if name == "mode":  # the wire leaves it empty when no Redis is configured
            value = value or "local_only"
        elif name == "stores":  # each store's own table is in --json
            value = ", ".join(sorted(value)) or stats.store
        elif isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(str(v) for v in value) or "-"
        elif value is None:
            value = "-"
        rows.append((name, value))
    rows.append(("balanced", "yes" if stats.balanced else "NO"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _enqueue(client: Client, args: argparse.Namespace) -> int:
    raw = args.payload if args.payload not in (None, "-") else sys.stdin.read()
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        print(f"error: the payload is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_ERROR
    res = client.enqueue(
        payload,
        priority=args.priority,
        ttl_s=args.ttl_s,
        queue_id=args.queue_id,
        max_attempts=args.max_attempts,
    )
    print(res.queue_id)
    return EXIT_OK


def _status(client: Client, args: argparse.Namespace) -> int:
    print(msgspec.json.encode(client.status(args.queue_id)).decode())
    return EXIT_OK


def _dequeue(client: Client, args: argparse.Namespace) -> int:
    for job in client.dequeue(args.max, lease_s=args.lease_s, wait_s=args.wait_s):
        view = msgspec.structs.asdict(job)
        view["payload"] = decode_payload(job)
        print(msgspec.json.encode(view).decode())
    return EXIT_OK


def _complete(client: Client, args: argparse.Namespace) -> int:
    print(client.complete(args.queue_id, args.lease_id).status)
    return EXIT_OK


def _fail(client: Client, args: argparse.Namespace) -> int:
    info = client.fail(
        args.queue_id, args.lease_id, args.reason, retry=not args.no_retry, delay_s=args.delay_s,
        counts=not args.uncounted,
    )  # fmt: skip
    print(info.status)
    return EXIT_OK


def _cancel(client: Client, args: argparse.Namespace) -> int:
    print(client.cancel(args.queue_id).status)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    parser.add_argument("--socket", help="the daemon's socket (default: $SIDECAR_SOCKET)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait for a reply (default: {TIMEOUT_ENV}, else {CLI_TIMEOUT_S:g})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="run the daemon (configured by environment variables)",
        description="Run the daemon. Every setting is an environment variable, listed below.\n\n"
        + SERVICE_SIGNALS_HELP.format(what="drains, then exits; a second one cuts the drain short"),
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p = sub.add_parser(
        "work",
        help="run an LLM worker: queued requests -> provider -> callback",
        description="Run an LLM worker: queued requests -> provider -> callback.\n\n"
        + SERVICE_SIGNALS_HELP.format(what="finishes the requests in hand, then exits 0"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests handled at once (default: LLM_WORKER_CONCURRENCY)")
    sub.add_parser(
        "web",
        help="serve the operators' dashboard (the [web] extra)",
        description="Serve the operators' web dashboard, a client of the daemon's socket: "
        "SIDECAR_WEB_HOST (default 127.0.0.1), SIDECAR_WEB_PORT, SIDECAR_WEB_TOKEN (enables "
        "requeue, cancel and purge), SIDECAR_WEB_SHOW_PAYLOADS. See docs/web.md.\n\n"
        + SERVICE_SIGNALS_HELP.format(what="stops serving, then exits 0"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, func, text in (
        ("health", _health, "probe: exit 0 ok, 1 degraded, 2 unreachable or unhealthy"),
        ("stats", _stats, "queue counts, usage and breaker state"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
        p.set_defaults(run=func)
        if name == "stats":
            p.add_argument("--watch", action="store_true", help=WATCH_STOP_HELP)
            p.add_argument("--queue", default=DEFAULT_QUEUE,
                           help="the named queue: requests (default), deliveries or pickups")
            p.add_argument("--interval", type=float, default=1.0,
                           help="seconds between lines of --watch (default 1)")  # fmt: skip
    p = sub.add_parser("metrics", help="the daemon's metrics as Prometheus text")
    p.set_defaults(run=_metrics)
    add_operator_commands(sub)  # list, show, requeue, purge (docs/operations.md)
    p = sub.add_parser("enqueue", help="enqueue a JSON payload (argument or stdin); prints its id")
    p.add_argument("payload", nargs="?", help="the payload as JSON; '-' or none reads stdin")
    p.add_argument("--priority", type=int, help="0 (most urgent) to 9; default 5")
    p.add_argument("--ttl-s", type=float, help="seconds until it expires")
    p.add_argument("--queue-id", help="choose the id (enqueueing an existing id is a no-op)")
    p.add_argument("--max-attempts", type=int, help="deliveries before it fails")
    p.set_defaults(run=_enqueue)
    p = sub.add_parser("dequeue", help="lease requests; prints one JSON line per request")
    p.add_argument("--max", type=int, default=1, help="how many at most")
    p.add_argument("--lease-s", type=float, help="lease length in seconds")
    p.add_argument("--wait-s", type=float, default=0.0, help="wait this long for one to arrive")
    p.set_defaults(run=_dequeue)
    for name, func, text in (
        ("status", _status, "a request's status as JSON"),
        ("cancel", _cancel, "cancel a queued request"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("queue_id")
        p.set_defaults(run=func)
    p = sub.add_parser("complete", help="complete a leased request")
    p.add_argument("queue_id")
    p.add_argument("lease_id")
    p.set_defaults(run=_complete)
    p = sub.add_parser("fail", help="fail a leased request (retried while attempts remain)")
    p.add_argument("queue_id")
    p.add_argument("lease_id")
    p.add_argument("--reason", default="failed by operator")
    p.add_argument("--no-retry", action="store_true", help="fail it for good")
    p.add_argument("--delay-s", type=float, default=0.0, help="hand it out again after this")
    p.add_argument(
        "--uncounted", action="store_true",
        help="this delivery does not count against max_attempts (not the request's fault)",
    )  # fmt: skip
    p.set_defaults(run=_fail)
    return parser
