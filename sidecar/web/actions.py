"""The actions: log in and out, requeue, cancel, purge. Each is confirmed and guarded.

An action's form is first answered with a confirm page that repeats what it will do (and
changes nothing); only the confirm page's own form, with `confirm=yes`, acts. Every POST passes
Guard.check_action (token, CSRF, origin) before its input is read further. An action is on one
named queue (the form's `queue`, default `requests`): dead deliveries are requeued as requests are.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sidecar.models import MAX_RETENTION_S, PRIORITY_MAX, PRIORITY_MIN
from sidecar.protocol.messages import MAX_REQUEUE_LIMIT
from sidecar.web.context import DEFAULT_QUEUE, chosen_queue, in_queue, render, state
from sidecar.web.security import SESSION_COOKIE, SESSION_TTL_S, Refused, safe_next
from sidecar.web.views import PURGEABLE, REQUEUEABLE

log = structlog.get_logger("sidecar.web")

# A form here is a handful of short fields; anything bigger is not from the dashboard.
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 16


async def read_form(request: Request) -> dict[str, str]:
    """The URL-encoded form of a POST (first value of each field), bounded in size."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, "the form is too large")
    if not body:
        return {}
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refused(415, "send the form URL-encoded (application/x-www-form-urlencoded)")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(400, "the form cannot be read") from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


async def login(request: Request) -> Response:
    web = state(request)
    web.guard.check_origin(request)
    form = await read_form(request)
    target = safe_next(form.get("next"))
    try:
        session = web.guard.login(form.get("token", ""))
    except Refused as refused:
        return render(request, "login.html", refused.status, error=refused.message, next=target)
    response = RedirectResponse(_with_done(target, "login"), status_code=303)
    response.set_cookie(
        SESSION_COOKIE, session.sid, max_age=int(SESSION_TTL_S), path="/", httponly=True,
        samesite="strict", secure=_https(request),
    )  # fmt: skip
    return response


def _https(request: Request) -> bool:
    """Whether the browser reached us over HTTPS (directly, or through a TLS proxy)."""
    origin = request.headers.get("origin", "")
    return request.url.scheme == "https" or origin.startswith("https://")


async def logout(request: Request) -> Response:
    web = state(request)
    web.guard.check_origin(request)
    await read_form(request)
    web.guard.logout(request)
    response = RedirectResponse("/?done=logout", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def act(request: Request) -> Response:
    """requeue, cancel or purge: guarded, then confirmed, then done (and redirected)."""
    web = state(request)
    action = request.path_params["action"]
    if action not in ("requeue", "cancel", "purge"):
        raise Refused(404, "no such action")
    form = await read_form(request)
    web.guard.check_action(request, form)
    queue = await chosen_queue(web, form.get("queue"))
    fields, what = _ACTIONS[action](form)
    back = in_queue(
        f"/requests/{quote(fields['queue_id'], safe='')}"
        if "queue_id" in fields
        else f"/list/{fields['status']}",
        queue,
    )
    if form.get("confirm") != "yes":
        if queue != DEFAULT_QUEUE:
            fields["queue"] = queue
            what = f"In the {queue} queue: {what}"
        return render(request, "confirm.html", action=action, what=what, fields=fields, back=back)
    # The daemon logs the peer uid (this process); this says which operator's address asked.
    peer = request.client.host if request.client is not None else None
    log.info("web_action", action=action, peer=peer, queue=queue, **fields)
    client = web.client
    if action == "cancel":
        await client.cancel(fields["queue_id"], queue=queue)
        return _redirect(back, "cancelled")
    if action == "requeue" and "queue_id" in fields:
        res = await client.requeue(fields["queue_id"], queue=queue)
        return _redirect(back, "requeued", res.requeued)
    if action == "requeue":
        res = await client.requeue(
            status=fields["status"], priority=_priority(fields), limit=int(fields["limit"]),
            queue=queue,
        )  # fmt: skip
        return _redirect(back, "requeued", res.requeued)
    older = fields.get("older_than_hours")
    purged = await client.purge(
        fields["status"], older_than_s=float(older) * 3600 if older else None, queue=queue
    )
    return _redirect(back, "purged", purged.purged)


def _redirect(path: str, done: str, n: int | None = None) -> Response:
    return RedirectResponse(_with_done(path, done, n), status_code=303)


def _with_done(path: str, done: str, n: int | None = None) -> str:
    query = {"done": done} | ({"n": str(n)} if n is not None else {})
    return f"{path}{'&' if '?' in path else '?'}{urlencode(query)}"


# -- each action's fields, checked, and what its confirm page says ------------------------


def _queue_id(form: dict[str, str]) -> str:
    queue_id = form.get("queue_id", "")
    if not 0 < len(queue_id) <= 128 or not all("!" <= c <= "~" for c in queue_id):
        raise Refused(400, "queue_id must be 1 to 128 printable ASCII characters, no spaces")
    return queue_id


def _priority(fields: dict[str, str]) -> int | None:
    raw = fields.get("priority", "")
    return int(raw) if raw else None


def _cancel(form: dict[str, str]) -> tuple[dict[str, str], str]:
    queue_id = _queue_id(form)
    return {"queue_id": queue_id}, f"Cancel the queued request {queue_id}?"


def _requeue(form: dict[str, str]) -> tuple[dict[str, str], str]:
    if form.get("queue_id"):
        queue_id = _queue_id(form)
        return {"queue_id": queue_id}, f"Requeue the request {queue_id} (attempts reset)?"
    status = form.get("status", "failed")
    if status not in REQUEUEABLE:
        raise Refused(400, f"only {' and '.join(REQUEUEABLE)} requests can be requeued")
    raw_limit = form.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_REQUEUE_LIMIT:
        raise Refused(400, f"limit must be a whole number from 1 to {MAX_REQUEUE_LIMIT}")
    fields: dict[str, Any] = {"status": status, "limit": str(int(raw_limit))}
    priority = form.get("priority", "")
    if priority:
        if not priority.isdigit() or not PRIORITY_MIN <= int(priority) <= PRIORITY_MAX:
            raise Refused(400, f"priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}")
        fields["priority"] = str(int(priority))
    which = f" of priority {fields['priority']}" if "priority" in fields else ""
    return fields, f"Requeue up to {fields['limit']} {status} requests{which}, oldest first?"


def _purge(form: dict[str, str]) -> tuple[dict[str, str], str]:
    status = form.get("status", "")
    if status not in PURGEABLE:
        raise Refused(
            400, f"the dashboard purges only {', '.join(PURGEABLE)} records; "
            "queued, delayed or processing ones need `sidecar purge --force` on the host",
        )  # fmt: skip
    fields = {"status": status}
    older = form.get("older_than_hours", "").strip()
    if older:
        try:
            hours = float(older)
        except ValueError:
            hours = math.nan
        if not 0 <= hours <= MAX_RETENTION_S / 3600:
            raise Refused(400, "older than: a number of hours >= 0")
        fields["older_than_hours"] = f"{hours:g}"
        return fields, f"Purge the {status} records older than {hours:g} h? This cannot be undone."
    return fields, f"Purge all {status} records? This cannot be undone."


_ACTIONS = {"cancel": _cancel, "requeue": _requeue, "purge": _purge}
