"""Callback URLs: which ones may be called, and a delivery that cannot reach the internal network.

A caller names where its result goes (`X-Callback-URL`); unchecked, that is a request forgery
(SSRF) waiting to happen: `http://169.254.169.254/` is a cloud's metadata service,
`http://127.0.0.1:6379/` the local Redis. So:

- `check_callback_url(url, allowed)` is the gateway's check, before anything is queued: http
  or https only, a host, no user:password@, and a host that is an IP literal (or `localhost`)
  must be a public address;
- `CallbackSender.deliver` (or `deliver`, one-shot) resolves the host itself, refuses it if
  any address it resolves to is loopback, private, link-local, unspecified, multicast,
  reserved or otherwise not public (IPv4-mapped, 6to4, Teredo and NAT64 IPv6 addresses are
  judged by the IPv4 address they carry), then connects to the address it checked, with the
  URL's host as `Host` and as the TLS server name: no second lookup, so no DNS rebinding.
  Redirects are never followed (a 3xx is a failed delivery), proxies and cookies are not used;
- `LLM_CALLBACK_ALLOWED_HOSTS` (an `AllowList`) admits receivers on the internal network:
  a host name admits that host whatever it resolves to, an IP address or CIDR the addresses in
  it.

The answer is classified into a `DeliveryOutcome`: delivered (2xx), stop for good (410 Gone,
or refused by the policy), or retry (after `Retry-After` when a 429 or 503 sends one).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import httpx

from sidecar.config.parse import host_list

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses the host resolves to (as getaddrinfo gives them).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

SETTING = "LLM_CALLBACK_ALLOWED_HOSTS"
MAX_URL_LENGTH = 2048
USER_AGENT = "sidecar-webhooks/1"

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: internal, not global
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix: IPv4 in the low bits
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class CallbackRefused(ValueError):
    """A callback URL the policy refuses; the message says which URL, what and why."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"callback URL {_shown(url)!r} refused: {reason}")


def _shown(url: str) -> str:
    """The URL for a message: at most 200 characters, any user:password@ replaced."""
    shown = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
    return shown if len(shown) <= 200 else shown[:200] + "..."


@dataclass(frozen=True)
class AllowList:
    """Receivers admitted although internal: host names (exact, case-insensitive) and CIDRs."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str] = (), *, setting: str = SETTING) -> AllowList:
        """From the setting's text (comma- or space-separated) or its parsed list."""
        raw = entries if isinstance(entries, str) else " ".join(entries)
        if not raw.strip():
            return cls()
        try:
            parsed = host_list(raw)
        except ValueError as exc:
            raise ValueError(f"{setting} is invalid: {exc}") from None
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in parsed:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        """Whether the host name is listed (a listed name admits all its addresses)."""
        return host.lower().removesuffix(".") in self.names

    def allows_address(self, address: IPAddress) -> bool:
        """Whether the address is in a listed network (an IPv4-mapped one by its IPv4)."""
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(
            a.version == net.version and a in net for a in candidates for net in self.networks
        )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped address", address.ipv4_mapped
    if address.sixtofour is not None:
        return "a 6to4 address", address.sixtofour
    if address.teredo is not None:
        return "a Teredo address", address.teredo[1]
    if address in _NAT64:
        return "a NAT64 address", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def non_public_reason(address: IPAddress) -> str | None:
    """Why the address is not a public one ("a loopback address", ...), or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            kind, inner = embedded
            why = non_public_reason(inner)
            if why is not None:
                return f"{kind} of {inner}, {why}"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL that passed the static check, taken apart for the delivery."""

    url: str
    scheme: str  # http or https
    host: str  # lower case; an IPv6 literal without its brackets
    port: int
    target: str  # path and query, "/" when empty
    address: IPAddress | None  # the host, when it is an IP literal

    @property
    def host_header(self) -> str:
        """The `Host` the receiver expects: the URL's host, with its port unless the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, address: IPAddress) -> str:
        """The URL that reaches this target at one checked address."""
        host = f"[{address.compressed}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.target}"


def _literal(host: str) -> IPAddress | None:
    """The host as an IP address when it is one, including IPv4's shorthand and hex forms
    (127.1, 0x7f.0.0.1, 2130706433), which resolvers read as addresses too."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    last = host.removesuffix(".").rpartition(".")[2]
    if _NUMERIC_LABEL.fullmatch(last):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.removesuffix(".")))
        except OSError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    return None


def _refused_address(host: str, address: IPAddress, why: str) -> str:
    what = f"{address} is" if host == address.compressed else f"{host} resolves to {address},"
    return f"{what} {why}; allow it with {SETTING}"


def check_callback_url(url: str, allowed: AllowList | None = None) -> CallbackTarget:
    """The gateway's check of a callback URL, without any lookup; CallbackRefused if it fails.

    Refused: a scheme other than http and https, no host, a user or password in the URL, a
    port out of range, a host that is not a valid name, and a host that is an IP literal (or
    `localhost`) that is not public unless `allowed` admits it. A host name is checked again,
    with its addresses, at each delivery.
    """
    allowed = allowed or AllowList()
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(url, f"it is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise CallbackRefused(url, "it contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(url, f"it is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        what = f"the scheme {scheme + '://'!r}" if scheme else "a URL without a scheme"
        raise CallbackRefused(url, f"{what} is not allowed: only http:// and https://")
    if "@" in parts.netloc:
        raise CallbackRefused(url, "a user name or password in the URL (user@host) is not allowed")
    host = (parts.hostname or "").removesuffix(".")
    if not host:
        raise CallbackRefused(url, "it has no host")
    if port == 0:
        raise CallbackRefused(url, "port 0 is not a port a receiver listens on")
    if not host.isascii():
        raise CallbackRefused(url, "the host name is not ASCII: give its punycode (xn--) form")
    try:
        address = _literal(host)
    except ValueError as exc:
        raise CallbackRefused(url, str(exc)) from None
    if address is None and (len(host) > 253 or not _HOST_NAME.fullmatch(host)):
        raise CallbackRefused(url, f"{host!r} is not a valid host name")
    target = CallbackTarget(
        url=url,
        scheme=scheme,
        host=address.compressed if address is not None else host,
        port=port or (443 if scheme == "https" else 80),
        target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        address=address,
    )
    if allowed.allows_name(target.host):
        return target
    if address is not None:
        why = non_public_reason(address)
        if why is not None and not allowed.allows_address(address):
            raise CallbackRefused(url, _refused_address(target.host, address, why))
    elif host == "localhost" or host.endswith(".localhost"):
        raise CallbackRefused(
            url, f"{host} is this host (a loopback address); allow it with {SETTING}"
        )
    return target


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system's resolver (getaddrinfo, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve_checked(
    target: CallbackTarget, allowed: AllowList, resolver: Resolver = system_resolver
) -> list[IPAddress]:
    """The addresses to connect to, every one checked; CallbackRefused if any is not public
    (and not allowed). A failed lookup raises OSError."""
    if target.address is not None:
        addresses: list[IPAddress] = [target.address]
    else:
        found = await resolver(target.host, target.port)
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
        if not addresses:
            raise OSError(f"{target.host} resolves to no address")
    if allowed.allows_name(target.host):
        return addresses
    for address in addresses:
        why = non_public_reason(address)
        if why is not None and not allowed.allows_address(address):
            raise CallbackRefused(target.url, _refused_address(target.host, address, why))
    return addresses


class Verdict(enum.StrEnum):
    """What the caller does next with a delivery."""

    DELIVERED = "delivered"  # a 2xx: done
    RETRY = "retry"  # try again later (after retry_after_s when the receiver gave one)
    STOP = "stop"  # never again: 410 Gone, or the policy refused the URL


@dataclass(frozen=True, kw_only=True)
class DeliveryOutcome:
    """How one delivery attempt ended, and why, in words fit for a log line."""

    verdict: Verdict
    reason: str
    http_status: int | None = None
    retry_after_s: float | None = None
    address: str | None = None  # the address the request went to, when it went anywhere

    @property
    def delivered(self) -> bool:
        return self.verdict is Verdict.DELIVERED

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY

    @property
    def stop(self) -> bool:
        return self.verdict is Verdict.STOP


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent
    or unreadable; never negative."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_response(
    status: int, headers: Mapping[str, str], *, address: str | None = None
) -> DeliveryOutcome:
    """The outcome of a receiver's answer: 2xx delivered, 410 stop, anything else retry."""
    if 200 <= status < 300:
        return DeliveryOutcome(verdict=Verdict.DELIVERED, reason=f"callback answered {status}",
                               http_status=status, address=address)  # fmt: skip
    if status == 410:
        return DeliveryOutcome(
            verdict=Verdict.STOP, http_status=status, address=address,
            reason="callback answered 410 Gone: the receiver wants no more deliveries",
        )  # fmt: skip
    if 300 <= status < 400:
        location = headers.get("location") or headers.get("Location") or ""
        to = f" to {_shown(location)!r}" if location else ""
        return DeliveryOutcome(
            verdict=Verdict.RETRY, http_status=status, address=address,
            reason=f"callback answered {status}, a redirect{to}, not followed: a callback URL "
                   "must answer itself (redirects are never followed)",
        )  # fmt: skip
    retry_after = None
    if status in (429, 503):
        retry_after = parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))
    reason = f"callback answered {status}"
    if retry_after is not None:
        reason += f" with Retry-After {retry_after:g} s"
    return DeliveryOutcome(verdict=Verdict.RETRY, reason=reason, http_status=status,
                           retry_after_s=retry_after, address=address)  # fmt: skip


def _refusal(exc: CallbackRefused) -> DeliveryOutcome:
    return DeliveryOutcome(verdict=Verdict.STOP, reason=str(exc))


@dataclass
class CallbackSender:
    """POSTs results to callback URLs under the policy; one httpx client for all deliveries.

    `resolver` (host, port -> addresses) and `transport` (an httpx transport) are for tests
    and special set-ups; by default the system resolver and httpx's own transport are used.
    """

    allowed: AllowList = field(default_factory=AllowList)
    timeout_s: float = 5.0
    resolver: Resolver = system_resolver
    transport: httpx.AsyncBaseTransport | None = None
    _http: httpx.AsyncClient = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=self.timeout_s,
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the checked address is the peer
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),  # none kept
            transport=self.transport,
        )

    async def deliver(
        self, url: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> DeliveryOutcome:
        """POST `body` (the exact bytes signed) to `url` at an address checked now.

        Never raises for the receiver's or the network's faults: the outcome says delivered,
        retry (with the receiver's Retry-After if any) or stop (410, or refused by the policy).
        """
        try:
            target = check_callback_url(url, self.allowed)
        except CallbackRefused as exc:
            return _refusal(exc)
        try:
            async with asyncio.timeout(self.timeout_s):
                addresses = await resolve_checked(target, self.allowed, self.resolver)
        except CallbackRefused as exc:
            return _refusal(exc)
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            return DeliveryOutcome(
                verdict=Verdict.RETRY,
                reason=f"could not resolve {target.host}: {exc or type(exc).__name__}",
            )
        request_headers = httpx.Headers({"Content-Type": "application/json",
                                         "User-Agent": USER_AGENT})  # fmt: skip
        request_headers.update(headers or {})  # case-insensitive: the caller's win
        request_headers["Host"] = target.host_header
        extensions: dict[str, Any] = {}
        if target.scheme == "https":
            # A pooled TLS connection is keyed by address, not by name: one per delivery, so
            # a connection verified for one host name never carries another's request.
            request_headers["Connection"] = "close"
            if target.address is None:
                extensions["sni_hostname"] = target.host  # SNI and certificate check
        failure = ""
        for address in addresses:
            request = self._http.build_request(
                "POST", target.url_for(address), content=body, headers=request_headers,
                extensions=extensions,
            )  # fmt: skip
            try:
                # httpx's timeouts bound each read, not the exchange: a receiver that sends
                # `102 Processing` every few seconds, or trickles its headers a byte at a time,
                # would hold this delivery (and its lease, which the keeper extends) forever.
                async with asyncio.timeout(self.timeout_s):
                    response = await self._http.send(request, stream=True,
                                                     follow_redirects=False)  # fmt: skip
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = f"could not connect to {target.host} at {address}: {_error(exc)}"
                continue  # nothing was sent: the next checked address may answer
            except httpx.HTTPError as exc:
                return DeliveryOutcome(
                    verdict=Verdict.RETRY, address=str(address),
                    reason=f"delivery to {target.host} at {address} failed: {_error(exc)}",
                )  # fmt: skip
            except TimeoutError:
                return DeliveryOutcome(
                    verdict=Verdict.RETRY, address=str(address),
                    reason=f"delivery to {target.host} at {address} failed: no answer within "
                           f"{self.timeout_s:g} s (the whole exchange is bounded)",
                )  # fmt: skip
            try:
                return classify_response(response.status_code, response.headers,
                                         address=str(address))  # fmt: skip
            finally:
                await response.aclose()  # the body is not read: a receiver's answer is its status
        return DeliveryOutcome(verdict=Verdict.RETRY, reason=failure)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> CallbackSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def deliver(
    url: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    allowed: AllowList | None = None,
    timeout_s: float = 5.0,
    resolver: Resolver = system_resolver,
    transport: httpx.AsyncBaseTransport | None = None,
) -> DeliveryOutcome:
    """One delivery with a client of its own; see `CallbackSender.deliver`."""
    async with CallbackSender(allowed or AllowList(), timeout_s, resolver, transport) as sender:
        return await sender.deliver(url, body, headers)
