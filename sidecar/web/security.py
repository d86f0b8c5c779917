"""Who may do what: the bind rule, the token, login sessions, CSRF and the Origin/Host checks.

Reading needs nothing (the dashboard binds loopback unless a token is set); payloads need a
login, so they need a token. Every request's Host must be one the dashboard answers to. An action
(requeue, cancel, purge) needs SIDECAR_WEB_TOKEN: a logged-in session (an HttpOnly,
SameSite=Strict cookie) with the session's CSRF token in the form, or the token itself as
`Authorization: Bearer`. Every POST must come from this origin (Origin, else Referer).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

SESSION_COOKIE = "sidecar_session"
# A login lasts a working day; the process keeps at most this many (the oldest go first).
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 256
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class Refused(Exception):
    """A request the dashboard refuses: its HTTP status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BindRefused(Exception):
    """`sidecar web` refuses to start: it would listen beyond loopback, or show payloads,
    without a token."""


def is_loopback(host: str) -> bool:
    """Whether host names this machine only (a loopback address or localhost)."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (anyone on the network could read)."""
    if token is None and not is_loopback(host):
        raise BindRefused(
            f"SIDECAR_WEB_HOST={host} is not a loopback address: set SIDECAR_WEB_TOKEN to serve "
            "the dashboard beyond this machine, or bind 127.0.0.1 (the default)"
        )


def check_payloads(show_payloads: bool, token: str | None) -> None:
    """Refuse to show payloads without a token: with no login, anyone who reaches the port
    (any local user through 127.0.0.1) would read every prompt."""
    if show_payloads and token is None:
        raise BindRefused(
            "SIDECAR_WEB_SHOW_PAYLOADS=true needs SIDECAR_WEB_TOKEN: payloads are shown only to "
            "operators logged in with the token; set the token, or leave payloads hidden"
        )


WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "*"})


class HostRule:
    """The names the dashboard answers to in the Host header: loopback names and addresses,
    plus the configured names, addresses and networks (by default the bind address)."""

    def __init__(self, bind_host: str, allowed: tuple[str, ...] = ()) -> None:
        bind = bind_host.strip("[]").lower().removesuffix(".")
        entries = allowed or ((bind,) if bind not in WILDCARD_BINDS else ())
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry)

    def allows(self, host_header: str) -> bool:
        try:
            host = urlsplit(f"//{host_header}").hostname or ""
        except ValueError:  # an unbalanced IPv6 bracket: not a host
            return False
        host = host.removesuffix(".")
        if not host:
            return False
        if is_loopback(host) or host in self.names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


@dataclass(slots=True)
class Session:
    """One login: its id (the cookie), its CSRF token (in every form) and when it ends."""

    sid: str
    csrf: str
    expires_at: float


class Guard:
    """The security rules of one dashboard process."""

    def __init__(self, token: str | None, host: str, allowed_hosts: tuple[str, ...] = ()) -> None:
        self._token = token.encode() if token is not None else None
        # Only known Host headers are served, bound anywhere: a page of another site whose
        # name resolves to this host (DNS rebinding) cannot read the dashboard.
        self.hosts = HostRule(host, allowed_hosts)
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    @property
    def read_only(self) -> bool:
        return self._token is None

    def token_matches(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(), self._token)

    # -- sessions --------------------------------------------------------------------------

    def login(self, given: str) -> Session:
        """A new session for the right token; Refused(401) otherwise."""
        if self._token is None:
            raise Refused(403, "read-only dashboard: SIDECAR_WEB_TOKEN is not set")
        if not self.token_matches(given):
            raise Refused(401, "wrong token")
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
            del self._sessions[sid]
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + SESSION_TTL_S)
        self._sessions[session.sid] = session
        return session

    def logout(self, request: Request) -> None:
        session = self.session(request)
        if session is not None:
            self._sessions.pop(session.sid, None)

    def session(self, request: Request) -> Session | None:
        """The request's live session, if its cookie names one."""
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or self._token is None:
            return None
        session = self._sessions.get(sid)
        if session is None or session.expires_at <= time.monotonic():
            return None
        return session

    def can_act(self, request: Request) -> bool:
        """Whether this request may see the action buttons (and payloads when shown)."""
        return self.session(request) is not None or self._bearer(request)

    def _bearer(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    # -- checks ----------------------------------------------------------------------------

    def check_host(self, host_header: str) -> None:
        """Refuse a Host the dashboard does not answer to (DNS rebinding)."""
        if not self.hosts.allows(host_header):
            # The header is not echoed: the page says which setting to change instead.
            raise Refused(
                400, "this dashboard does not answer to that Host: it answers to localhost and "
                "the names in SIDECAR_WEB_ALLOWED_HOSTS (default: the address it is bound to)",
            )  # fmt: skip

    def check_origin(self, request: Request) -> None:
        """A POST must come from a page of this dashboard: Origin (or Referer) names it."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise Refused(403, "cross-site request refused")
        # Host and port must match; the scheme may not (behind a proxy that terminates TLS
        # the browser says https while this server sees http).
        own = request.headers.get("host", "").lower()
        origin = request.headers.get("origin") or request.headers.get("referer")
        if origin is None:
            if self._bearer(request):  # a script with the token: no browser, no CSRF
                return
            raise Refused(403, "the request names no origin (Origin or Referer)")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != own or not own:
            raise Refused(403, "cross-origin request refused")

    def check_action(self, request: Request, form: dict[str, str]) -> None:
        """Everything an action needs, in order; Refused says which rule failed. Changes nothing."""
        if self._token is None:
            raise Refused(403, "read-only dashboard: set SIDECAR_WEB_TOKEN to enable actions")
        if request.headers.get("authorization", "").lower().startswith("bearer "):
            if not self._bearer(request):
                raise Refused(401, "wrong token")
            self.check_origin(request)
            return
        self.check_origin(request)
        session = self.session(request)
        if session is None:
            raise Refused(401, "log in with the dashboard's token first")
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            raise Refused(403, "the form's CSRF token is missing or wrong: reload the page")


def safe_next(target: str | None) -> str:
    """Where to go after login: a path of this dashboard only (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
