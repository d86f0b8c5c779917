"""What every handler shares: the dashboard's state, the chosen queue, and pages rendered
from templates."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.models import QueueName
from sidecar.web.sampler import Sampler
from sidecar.web.security import Guard, Refused
from sidecar.web.views import FILTERS, STATUSES


@dataclass(slots=True)
class WebState:
    """What every handler uses: settings, the daemon's client, the guard, the sampler."""

    settings: Settings
    client: AsyncClient
    guard: Guard
    sampler: Sampler
    templates: jinja2.Environment
    # The named queues the daemon serves (its hello), asked again when a page names another.
    queues: tuple[str, ...] = field(default=())


DEFAULT_QUEUE = QueueName.REQUESTS.value
# A queue name in a URL or a form: short, plain; anything else is refused before the daemon.
_QUEUE_NAME = re.compile(r"[a-z0-9_-]{1,64}")


def state(request: Request) -> WebState:
    web: WebState = request.app.state.web
    return web


async def known_queues(web: WebState) -> tuple[str, ...]:
    """The daemon's named queues, the default first (asked once, then kept)."""
    if not web.queues:
        named = (await web.client.hello()).queues
        web.queues = (DEFAULT_QUEUE, *[q for q in named if q != DEFAULT_QUEUE])
    return web.queues


async def chosen_queue(web: WebState, raw: str | None) -> str:
    """The queue a page or an action names (`queue=`, default `requests`), checked against
    the daemon's hello; Refused(404) for one it does not serve."""
    name = raw or DEFAULT_QUEUE
    if name in await known_queues(web):
        return name
    if _QUEUE_NAME.fullmatch(name):  # the daemon may have restarted with other queues
        web.queues = ()
        if name in await known_queues(web):
            return name
    raise Refused(404, f"unknown queue; this daemon serves {', '.join(web.queues)}")


def in_queue(path: str, queue: str) -> str:
    """A dashboard path that keeps the chosen queue (the default one needs no parameter)."""
    if queue == DEFAULT_QUEUE:
        return path
    return f"{path}{'&' if '?' in path else '?'}queue={quote(queue, safe='')}"


def render(request: Request, name: str, http_status: int = 200, /, **context: Any) -> HTMLResponse:
    """A page from its template, with what every page needs (login state, the CSRF token)."""
    web = state(request)
    session = web.guard.session(request)
    context.setdefault("flash", None)
    context.setdefault("queue", DEFAULT_QUEUE)
    html = web.templates.get_template(name).render(
        read_only=web.guard.read_only,
        can_act=web.guard.can_act(request),
        csrf=session.csrf if session is not None else "",
        statuses=STATUSES,
        queues=web.queues,
        default_queue=DEFAULT_QUEUE,
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
    env.filters["in_queue"] = in_queue
    return env
