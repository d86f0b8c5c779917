"""What every handler shares: the dashboard's state, and pages rendered from templates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.web.sampler import Sampler
from sidecar.web.security import Guard
from sidecar.web.views import FILTERS, STATUSES


@dataclass(slots=True)
class WebState:
    """What every handler uses: settings, the daemon's client, the guard, the sampler."""

    settings: Settings
    client: AsyncClient
    guard: Guard
    sampler: Sampler
    templates: jinja2.Environment


def state(request: Request) -> WebState:
    web: WebState = request.app.state.web
    return web


def render(request: Request, name: str, http_status: int = 200, /, **context: Any) -> HTMLResponse:
    """A page from its template, with what every page needs (login state, the CSRF token)."""
    web = state(request)
    session = web.guard.session(request)
    context.setdefault("flash", None)
    html = web.templates.get_template(name).render(
        read_only=web.guard.read_only,
        can_act=web.guard.can_act(request),
        csrf=session.csrf if session is not None else "",
        statuses=STATUSES,
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=http_status)


def templates() -> jinja2.Environment:
    """The page templates, autoescaped: a reason or payload holding HTML shows as text."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sidecar.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    env.filters["q"] = lambda value: quote(str(value), safe="")
    return env
