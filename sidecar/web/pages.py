"""The pages that only read: overview (and its JSON for the live refresh), lists, a request.

Lists and request pages are of one named queue (`?queue=`, default `requests`); the overview
shows the requests queue and the counts of the outbox queues.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar.errors import Forbidden
from sidecar.models import PRIORITY_MAX, PRIORITY_MIN
from sidecar.protocol import StatsResult
from sidecar.web.context import (
    DEFAULT_QUEUE,
    WebState,
    chosen_queue,
    known_queues,
    render,
    state,
)
from sidecar.web.security import Refused, safe_next
from sidecar.web.views import (
    ORDERS,
    PAGE_SIZES,
    PURGEABLE,
    REQUEUEABLE,
    STATUSES,
    payload_text,
)

# The counts the overview shows, each linked to its list (dead letters are failed + expired).
COUNTED = ("queued", "processing", "completed", "failed", "expired")
# An outbox queue's counts on the overview: waiting, being delivered, dead letters.
OUTBOX_COUNTED = ("queued", "processing", "dead_letters")
# What an action's redirect may say on the next page (`?done=`): fixed texts, never echoed input.
DONE = {
    "requeued": "Requeued {n} request(s).",
    "cancelled": "Cancelled.",
    "purged": "Purged {n} record(s).",
    "login": "Logged in.",
    "logout": "Logged out.",
}


def flash(request: Request) -> str | None:
    text = DONE.get(request.query_params.get("done", ""))
    if text is None:
        return None
    n = request.query_params.get("n", "")
    return text.format(n=int(n) if n.isdigit() else "?")


async def _snapshot(web: WebState) -> dict[str, Any]:
    outboxes = [q for q in await known_queues(web) if q != DEFAULT_QUEUE]
    stats, health, *outbox_stats = await asyncio.gather(
        web.client.stats(), web.client.health(), *[web.client.stats(queue=q) for q in outboxes]
    )
    local = stats.stores.get("local", stats)
    stores = stats.stores or {stats.store: stats}
    return {
        "stats": stats,
        "health": health,
        "mode": stats.mode or "local_only",
        "counts": {name: int(getattr(stats, name)) for name in COUNTED},
        "outbox": {
            queue: {name: int(getattr(s, name)) for name in OUTBOX_COUNTED}
            for queue, s in zip(outboxes, outbox_stats, strict=True)
        },
        "local": local,
        "stores": dict(sorted(stores.items())),
        "high": web.settings.queue_high_watermark,
        "low": web.settings.queue_low_watermark,
    }


async def overview(request: Request) -> Response:
    web = state(request)
    view = await _snapshot(web)
    return render(
        request, "overview.html", **view, series=web.sampler.series(),
        window_s=web.sampler.window_s, sample_error=web.sampler.error, flash=flash(request),
    )  # fmt: skip


async def overview_json(request: Request) -> Response:
    """What the overview's script refreshes in place: counts, usage, breaker, health."""
    web = state(request)
    view = await _snapshot(web)
    stats: StatsResult = view["stats"]
    local: StatsResult = view["local"]
    return JSONResponse({
        "mode": view["mode"],
        "health": view["health"].status,
        "counts": view["counts"] | {"dead_letters": stats.dead_letters},
        "queues": view["outbox"],
        "usage": local.usage,
        "items": local.items,
        "breaker_open": local.breaker_open,
        "rates": {s.name: s.last_minute for s in web.sampler.series()},
    })  # fmt: skip


def _choice(request: Request, name: str, options: tuple[Any, ...], default: Any) -> Any:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    for option in options:
        if raw == str(option):
            return option
    shown = ", ".join(str(o) for o in options)
    raise Refused(400, f"{name} must be one of {shown}")


PRIORITIES = tuple(range(PRIORITY_MIN, PRIORITY_MAX + 1))


async def listing(request: Request) -> Response:
    """One page of one status of one queue, filtered by priority, oldest or newest first."""
    web = state(request)
    queue = await chosen_queue(web, request.query_params.get("queue"))
    status = request.path_params["status"]
    if status not in STATUSES:
        raise Refused(404, f"unknown status; the lists are {', '.join(STATUSES)}")
    priority = _choice(request, "priority", PRIORITIES, None)
    order = _choice(request, "order", ORDERS, "oldest")
    limit = _choice(request, "limit", PAGE_SIZES, 50)
    cursor = request.query_params.get("cursor") or None
    page_no = request.query_params.get("page", "1")
    page = await web.client.list(
        status, queue=queue, priority=priority, order=order, limit=limit, cursor=cursor
    )
    return render(
        request, "list.html", queue=queue, status=status, items=page.items,
        next_cursor=page.next_cursor,
        priority=priority, priorities=PRIORITIES, order=order, orders=ORDERS, limit=limit,
        page_sizes=PAGE_SIZES, page_no=int(page_no) if page_no.isdigit() else 1,
        first_page=cursor is None, purgeable=status in PURGEABLE,
        requeueable=status in REQUEUEABLE, flash=flash(request),
    )  # fmt: skip


async def request_page(request: Request) -> Response:
    """A request's metadata, reason, attempts and times; its payload only where allowed."""
    web = state(request)
    queue = await chosen_queue(web, request.query_params.get("queue"))
    queue_id = request.path_params["queue_id"]
    # Payloads may hold personal data: shown only when the setting says so and only to an
    # operator with the token (without one, anyone reaching the port, any local user, would).
    show = web.settings.web_show_payloads and web.guard.can_act(request)
    payload: str | None = None
    note: str | None = None
    if show:
        try:
            info = await web.client.status(queue_id, payload=True, queue=queue)
        except Forbidden:
            info = await web.client.status(queue_id, queue=queue)
            note = "The daemon does not hand out payloads (SIDECAR_OPS_PAYLOADS=false)."
        else:
            if isinstance(info.payload, msgspec.Raw):
                payload = payload_text(bytes(info.payload))
            else:
                note = "The payload is no longer kept (a finished record keeps only metadata)."
    else:
        info = await web.client.status(queue_id, queue=queue)
        if not web.settings.web_show_payloads:
            note = "Payloads are hidden (SIDECAR_WEB_SHOW_PAYLOADS is not true)."
        elif web.guard.read_only:
            note = "Payloads are hidden: showing them needs SIDECAR_WEB_TOKEN and a login."
        else:
            note = "Log in to see the payload."
    return render(
        request, "request.html", queue=queue, info=info, payload=payload, payload_note=note,
        requeueable=info.status in REQUEUEABLE, cancellable=info.status == "queued",
        flash=flash(request),
    )  # fmt: skip


async def login_form(request: Request) -> Response:
    target = safe_next(request.query_params.get("next"))
    return render(request, "login.html", error=None, next=target)
