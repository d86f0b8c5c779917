"""The operators' dashboard (`sidecar web`, the `[web]` extra): a client of the daemon.

app.py       the Starlette app: routes, security headers and the Host check, errors
context.py   the state every handler shares; pages rendered from templates/
pages.py     the pages that read: overview (and its JSON), lists by status, a request
actions.py   log in and out; requeue, cancel, purge (each confirmed)
security.py  the bind rule, the token, sessions, CSRF, the Origin check
sampler.py   rates over the last minutes, sampled from stats in this process
views.py     how times, sizes and payloads look
serve.py     `sidecar web`: checks, then uvicorn
static/      the stylesheet and the one small script; templates/: the pages
"""

from __future__ import annotations

from sidecar.web.app import create_app
from sidecar.web.security import BindRefused, check_bind
from sidecar.web.serve import serve_web

__all__ = ["BindRefused", "check_bind", "create_app", "serve_web"]
