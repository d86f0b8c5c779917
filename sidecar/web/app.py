"""The dashboard's Starlette app: routes, the security middleware, the shared state, errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import NotFound, SidecarError, SidecarUnavailable
from sidecar.web import actions, pages
from sidecar.web.context import WebState, render, templates
from sidecar.web.sampler import Sampler
from sidecar.web.security import Guard, Refused

# Scripts, styles and images only from the dashboard itself; fetch() only to itself (the
# overview's refresh); no frames, no <base>, forms only back to the dashboard.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    # Pages may show payloads and reasons: never kept by a shared cache or the browser's.
    "cache-control": "no-store",
}
# Six minutes of history at the default of one sample every 5 s (SIDECAR_WEB_SAMPLE_SECONDS).
SAMPLES_KEPT = 72

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Protect:
    """Every response gets the security headers; a foreign Host is refused before routing."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.guard.check_host(Headers(scope=scope).get("host", ""))
        except Refused as refused:
            response = PlainTextResponse(refused.message, refused.status, SECURITY_HEADERS)
            await response(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_secured)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return render(request, "error.html", exc.status, title="Refused", message=exc.message)


async def _daemon_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SidecarError)
    if isinstance(exc, SidecarUnavailable):
        status, title = 503, "The daemon is unreachable"
    elif isinstance(exc, NotFound):
        status, title = 404, "Not found"
    else:
        status, title = (503 if exc.code == "shutting_down" else 400), "The daemon refused"
    return render(request, "error.html", status, title=title, code=exc.code, message=exc.message)


def create_app(
    settings: Settings,
    *,
    client: AsyncClient | None = None,
) -> Starlette:
    """The dashboard for the daemon at settings.socket_path (or the given client)."""
    daemon = client if client is not None else AsyncClient(settings.socket_path)
    guard = Guard(settings.web_token, settings.web_host, settings.web_allowed_hosts)
    web = WebState(
        settings, daemon, guard, Sampler(daemon.stats, settings.web_sample_s, SAMPLES_KEPT),
        templates(),
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(web.sampler.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await daemon.close()

    routes = [
        Route("/", pages.overview),
        Route("/api/overview", pages.overview_json),
        Route("/list/{status}", pages.listing),
        Route("/requests/{queue_id:path}", pages.request_page),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", actions.login, methods=["POST"]),
        Route("/logout", actions.logout, methods=["POST"]),
        Route("/actions/{action}", actions.act, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("sidecar.web", "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Refused: _refused, SidecarError: _daemon_error},
    )
    app.state.web = web
    app.add_middleware(Protect, guard=guard)
    return app
