"""`sidecar web`: refuse unsafe settings, then serve the dashboard with uvicorn until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from sidecar.config import Settings
from sidecar.web.app import create_app
from sidecar.web.security import WILDCARD_BINDS, check_bind, check_payloads

log = structlog.get_logger("sidecar.web")


class _Server(uvicorn.Server):
    """uvicorn's server, stopped as the other services are: SIGTERM or SIGINT drains, then the
    process exits 0 (uvicorn would re-raise the signal and die of it); a second one cuts the
    drain short. Handlers set with the loop also override an inherited SIGINT ignore."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so the real port can be logged."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family if host != "localhost" else 0,
                               socket.SOCK_STREAM)  # fmt: skip
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve_web(settings: Settings) -> None:
    """Serve the dashboard; BindRefused (no token beyond loopback, or payloads shown without
    one) or OSError before serving."""
    check_bind(settings.web_host, settings.web_token)
    check_payloads(settings.web_show_payloads, settings.web_token)
    if settings.web_host.strip("[]") in WILDCARD_BINDS and not settings.web_allowed_hosts:
        # Not refused (an SSH tunnel to localhost still works), but other names answer 400.
        log.warning("web_allowed_hosts_unset", host=settings.web_host,
                    answers_to="localhost only", setting="SIDECAR_WEB_ALLOWED_HOSTS")  # fmt: skip
    sock = listen(settings.web_host, settings.web_port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        server_header=False,
        # Served directly, never behind a proxy it should trust: X-Forwarded-* are ignored.
        proxy_headers=False,
        lifespan="on",
    )
    server = _Server(config)
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "web_serving", url=f"http://{shown}:{port}/", socket=settings.socket_path,
        read_only=settings.web_token is None, payloads=settings.web_show_payloads,
        allowed_hosts=list(settings.web_allowed_hosts),
    )  # fmt: skip
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
