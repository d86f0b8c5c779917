"""The callback-URL policy and its delivery: no request forgery against the internal network.

Each refused case of the issue is its own test; the deliveries go to real HTTP servers on
127.0.0.1 only (admitted through the allow-list), through a transport that fails the test if
a request is ever addressed anywhere but loopback. Names resolve through injected resolvers,
so no test depends on /etc/hosts or on DNS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sidecar.client import AsyncClient
from sidecar.config import ConfigError, Settings
from sidecar.errors import NotFound
from sidecar.llm.callbacks import (
    AllowList,
    CallbackRefused,
    CallbackSender,
    DeliveryOutcome,
    Verdict,
    check_callback_url,
    classify_response,
    deliver,
    parse_retry_after,
    resolve_checked,
    system_resolver,
)
from sidecar.llm.gateway import Gateway, LLMRequest
from sidecar.llm.providers import MockProvider
from tests.support.daemon import Daemon, running_daemon
from tests.support.llm_fakes import free_port

BODY = b'{"queue_id": "q1", "status": "completed", "response": {"text": "r\xc3\xa9ponse"}}'
LOOPBACK = AllowList.parse("127.0.0.0/8")

# -- a receiver on loopback, and a transport that refuses anything else ------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A delivery that timed out on purpose leaves the slow handler a closed socket; that
        # is the test working, not an error worth a traceback on the run's stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Receiver:
    """A threaded HTTP server on 127.0.0.1 answering `status` with `headers` to every POST."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver.seen.append(Seen(self.path, dict(self.headers.items()), body))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)  # a receiver slower than the timeout
                self.send_response(receiver.status)
                for k, v in receiver.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def url(self, host: str = "127.0.0.1", path: str = "/results") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


class LoopbackOnly(httpx.AsyncHTTPTransport):
    """httpx's own transport, recording each request's address; any non-loopback one fails."""

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.hosts.append(host)
        assert ipaddress.ip_address(host).is_loopback, f"a request went to {host}"
        return await super().handle_async_request(request)


def resolving(table: dict[str, Sequence[str]]) -> Any:
    """A resolver answering from `table` (and recording each lookup); unknown names fail."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return list(table[host])

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


async def send(
    url: str,
    *,
    allowed: AllowList | None = None,
    resolver: Any = None,
    timeout_s: float = 5.0,
) -> tuple[DeliveryOutcome, LoopbackOnly]:
    transport = LoopbackOnly()
    sender = CallbackSender(allowed or AllowList(), timeout_s, transport=transport)
    if resolver is not None:
        sender.resolver = resolver
    async with sender:
        outcome = await sender.deliver(url, BODY, {"webhook-id": "msg_q1"})
    return outcome, transport


def refused(url: str, allowed: AllowList | None = None) -> str:
    with pytest.raises(CallbackRefused) as err:
        check_callback_url(url, allowed)
    return str(err.value)


async def assert_delivery_refused(url: str, receiver: Receiver, *, contains: str) -> None:
    outcome, transport = await send(url)
    assert outcome.verdict is Verdict.STOP and outcome.stop
    assert contains in outcome.reason
    assert transport.hosts == [] and receiver.seen == []


# -- the cases of the issue, each its own test -----------------------------------------------------


async def test_127_0_0_1_is_refused(receiver: Receiver) -> None:
    url = receiver.url("127.0.0.1")
    assert refused(url) == (
        f"callback URL '{url}' refused: 127.0.0.1 is a loopback address; allow it with "
        "LLM_CALLBACK_ALLOWED_HOSTS"
    )
    await assert_delivery_refused(url, receiver, contains="127.0.0.1 is a loopback address")


async def test_localhost_is_refused(receiver: Receiver) -> None:
    url = receiver.url("localhost")
    assert "localhost is this host (a loopback address)" in refused(url)
    assert "refused" in refused("http://api.localhost/")
    await assert_delivery_refused(url, receiver, contains="localhost is this host")


async def test_localhost_resolved_by_the_system_resolver_is_refused() -> None:
    # The delivery's own check, past the gateway's: the system's getaddrinfo answers for
    # localhost (127.0.0.1 or ::1, as /etc/hosts says), and either one is refused.
    target = check_callback_url("http://localhost:9/", AllowList.parse("localhost"))
    target = dataclasses.replace(target, url="http://localhost:9/")
    with pytest.raises(
        CallbackRefused, match=r"localhost resolves to (127\.0\.0\.1|::1), a loopback"
    ):
        await resolve_checked(target, AllowList(), system_resolver)


async def test_ipv6_loopback_is_refused(receiver: Receiver) -> None:
    url = f"http://[::1]:{receiver.port}/results"
    assert "::1 is a loopback address" in refused(url)
    await assert_delivery_refused(url, receiver, contains="::1 is a loopback address")


async def test_the_metadata_address_169_254_169_254_is_refused(receiver: Receiver) -> None:
    url = "http://169.254.169.254/latest/meta-data/"
    assert "169.254.169.254 is a link-local address" in refused(url)
    await assert_delivery_refused(url, receiver, contains="link-local")


async def test_a_private_address_10_0_0_1_is_refused(receiver: Receiver) -> None:
    assert refused("http://10.0.0.1/x") == (
        "callback URL 'http://10.0.0.1/x' refused: 10.0.0.1 is a private address; allow it "
        "with LLM_CALLBACK_ALLOWED_HOSTS"
    )
    await assert_delivery_refused("http://10.0.0.1/x", receiver, contains="private address")


async def test_the_unspecified_address_0_0_0_0_is_refused(receiver: Receiver) -> None:
    url = f"http://0.0.0.0:{receiver.port}/"
    assert "0.0.0.0 is an unspecified address" in refused(url)
    await assert_delivery_refused(url, receiver, contains="unspecified")


async def test_a_name_that_resolves_to_127_0_0_1_is_refused(receiver: Receiver) -> None:
    url = receiver.url("rebind.example.com")
    check_callback_url(url)  # a name: the gateway cannot judge it without a lookup
    resolver = resolving({"rebind.example.com": ["127.0.0.1"]})
    outcome, transport = await send(url, resolver=resolver)
    assert outcome.stop
    assert outcome.reason == (
        f"callback URL '{url}' refused: rebind.example.com resolves to 127.0.0.1, a loopback "
        "address; allow it with LLM_CALLBACK_ALLOWED_HOSTS"
    )
    assert resolver.asked == ["rebind.example.com"]  # looked up once, then nothing sent
    assert transport.hosts == [] and receiver.seen == []


async def test_a_file_url_is_refused(receiver: Receiver) -> None:
    message = refused("file:///etc/passwd")
    assert "the scheme 'file://' is not allowed: only http:// and https://" in message
    await assert_delivery_refused("file:///etc/passwd", receiver, contains="'file://'")


async def test_a_redirect_to_a_private_address_is_not_followed(receiver: Receiver) -> None:
    receiver.status = 302
    receiver.headers = {"Location": "http://10.0.0.1/"}
    outcome, transport = await send(receiver.url(), allowed=AllowList.parse("127.0.0.1"))
    assert outcome.verdict is Verdict.RETRY and outcome.http_status == 302
    assert "redirect to 'http://10.0.0.1/', not followed" in outcome.reason
    assert len(receiver.seen) == 1  # one request, to the receiver; none to 10.0.0.1
    assert transport.hosts == ["127.0.0.1"]


# -- more refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "the scheme 'ftp://' is not allowed"),
        ("gopher://example.com:70/_x", "the scheme 'gopher://' is not allowed"),
        ("javascript:alert(1)", "the scheme 'javascript://' is not allowed"),
        ("example.com/x", "a URL without a scheme is not allowed"),
        ("http:///x", "it has no host"),
        ("http://user:pw@example.com/x", "user name or password"),
        ("http://example.com@10.0.0.1/", "user name or password"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://example.com:0/", "port 0"),
        ("http://exa mple.com/", "spaces or control characters"),
        ("http://example.com/\r\nX: y", "spaces or control characters"),
        ("http://bücher.example/", "punycode"),
        ("http://bad_host!.com/", "not a valid host name"),
        ("http://" + "a" * 2100 + ".com/", "longer than 2048"),
        ("http://[::ffff:127.0.0.1]/", "an IPv4-mapped address of 127.0.0.1, a loopback address"),
        ("http://[::ffff:10.1.2.3]/", "an IPv4-mapped address of 10.1.2.3, a private address"),
        ("http://[2002:7f00:1::1]/", "a 6to4 address of 127.0.0.1"),
        ("http://[64:ff9b::a9fe:a9fe]/", "a NAT64 address of 169.254.169.254"),
        ("http://[fe80::1]/", "a link-local address"),
        ("http://[fc00::1]/", "a private address"),
        ("http://[::]/", "an unspecified address"),
        ("http://127.1/", "127.0.0.1 is a loopback address"),
        ("http://2130706433/", "127.0.0.1 is a loopback address"),
        ("http://0x7f.0.0.1/", "127.0.0.1 is a loopback address"),
        ("http://0177.0.0.1./", "127.0.0.1 is a loopback address"),
        ("http://10.0.0.300/", "not a valid IPv4 address"),
        ("http://172.16.5.4/", "a private address"),
        ("http://192.168.1.1/", "a private address"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://224.0.0.1/", "a multicast address"),
        ("http://[ff02::1]/", "a multicast address"),
        ("http://240.0.0.1/", "a reserved address"),
        ("http://255.255.255.255/", "a reserved address"),
    ],
)
def test_the_static_check_refuses(url: str, why: str) -> None:
    assert why in refused(url)


def test_userinfo_is_not_echoed_in_the_message() -> None:
    message = refused("http://admin:hunter2@example.com/x")
    assert "hunter2" not in message and "***@example.com" in message


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/llm/results?token=abc",
        "http://93.184.216.34:8080/x",
        "https://[2606:4700::1111]/x",
        "HTTPS://Example.COM./Path",
    ],
)
def test_public_urls_pass_the_static_check(url: str) -> None:
    target = check_callback_url(url)
    assert target.scheme in ("http", "https") and target.host == target.host.lower()


def test_a_target_keeps_its_path_query_and_host_header() -> None:
    t = check_callback_url("https://Hooks.Example.com:8443/a/b?x=1&y=2#frag")
    assert (t.host, t.port, t.target, t.host_header) == (
        "hooks.example.com", 8443, "/a/b?x=1&y=2", "hooks.example.com:8443"
    )  # fmt: skip
    assert (
        t.url_for(ipaddress.ip_address("93.184.216.34")) == "https://93.184.216.34:8443/a/b?x=1&y=2"
    )
    six = check_callback_url("http://[2606:4700::1111]/")
    assert (six.host_header, six.target) == ("[2606:4700::1111]", "/")


async def test_any_internal_address_among_several_refuses_the_host(receiver: Receiver) -> None:
    # The public address comes first: a check of the first alone would let 10.0.0.1 through.
    resolver = resolving({"mixed.example.com": ["93.184.216.34", "10.0.0.1"]})
    outcome, transport = await send(receiver.url("mixed.example.com"), resolver=resolver)
    assert outcome.stop and "resolves to 10.0.0.1, a private address" in outcome.reason
    assert transport.hosts == []


async def test_an_ipv4_mapped_answer_from_the_resolver_is_refused(receiver: Receiver) -> None:
    resolver = resolving({"mapped.example.com": ["::ffff:169.254.169.254"]})
    outcome, _ = await send(receiver.url("mapped.example.com"), resolver=resolver)
    assert outcome.stop and "IPv4-mapped address of 169.254.169.254" in outcome.reason


# -- the allow-list -------------------------------------------------------------------------------


async def test_an_allowed_cidr_admits_a_loopback_receiver(receiver: Receiver) -> None:
    check_callback_url(receiver.url(), LOOPBACK)
    outcome, transport = await send(receiver.url(), allowed=LOOPBACK)
    assert outcome.delivered and outcome.http_status == 200 and outcome.address == "127.0.0.1"
    [seen] = receiver.seen
    assert seen.path == "/results" and seen.body == BODY
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["webhook-id"] == "msg_q1"
    assert transport.hosts == ["127.0.0.1"]


async def test_the_request_goes_to_the_checked_address_with_the_original_host(
    receiver: Receiver,
) -> None:
    # receiver.test exists only in this resolver: the delivery connects to the address it was
    # given and checked, and the receiver still sees the name it was called by.
    resolver = resolving({"receiver.test": ["127.0.0.1"]})
    url = receiver.url("receiver.test", "/hook?k=v")
    outcome, transport = await send(url, allowed=LOOPBACK, resolver=resolver)
    assert outcome.delivered, outcome.reason
    [seen] = receiver.seen
    assert seen.headers["Host"] == f"receiver.test:{receiver.port}"
    assert seen.path == "/hook?k=v"
    assert resolver.asked == ["receiver.test"] and transport.hosts == ["127.0.0.1"]


async def test_an_allowed_host_name_admits_whatever_it_resolves_to(receiver: Receiver) -> None:
    resolver = resolving({"hooks.internal": ["127.0.0.1"]})
    url = receiver.url("hooks.internal")
    outcome, _ = await send(url, allowed=AllowList.parse("hooks.internal"), resolver=resolver)
    assert outcome.delivered
    # Another name on the same address is not admitted by that entry.
    resolver = resolving({"other.internal": ["127.0.0.1"]})
    outcome, _ = await send(
        receiver.url("other.internal"), allowed=AllowList.parse("hooks.internal"),
        resolver=resolver,
    )  # fmt: skip
    assert outcome.stop and len(receiver.seen) == 1


def test_the_allow_list_admits_only_what_it_names() -> None:
    allowed = AllowList.parse("10.1.0.0/16, hooks.internal  ::1")
    check_callback_url("http://10.1.2.3/", allowed)
    check_callback_url("http://[::1]/", allowed)
    check_callback_url("http://[::ffff:10.1.2.3]/", allowed)
    check_callback_url("http://HOOKS.internal./", allowed)
    assert "10.2.0.1 is a private address" in refused("http://10.2.0.1/", allowed)
    assert "127.0.0.1 is a loopback address" in refused("http://127.0.0.1/", allowed)


@pytest.mark.parametrize("raw", ["10.0.0.0/33", "bad host!", "-leading.dash", "1.2.3.999"])
def test_a_bad_allow_list_names_the_setting(raw: str) -> None:
    with pytest.raises(ValueError, match="LLM_CALLBACK_ALLOWED_HOSTS is invalid"):
        AllowList.parse(raw)
    with pytest.raises(ConfigError, match="LLM_CALLBACK_ALLOWED_HOSTS"):
        Settings.from_env({"LLM_CALLBACK_ALLOWED_HOSTS": raw})


def test_the_settings_parse_the_allow_list_and_the_delivery_windows() -> None:
    s = Settings.from_env({"LLM_CALLBACK_ALLOWED_HOSTS": "Hooks.Internal., 10.0.0.1/8 [::1]",
                           "LLM_WEBHOOK_RETRY_MAX_SECONDS": "600",
                           "LLM_RESULT_TTL_HOURS": "0.5"})  # fmt: skip
    assert s.llm_callback_allowed_hosts == ("hooks.internal", "10.0.0.0/8", "::1")
    assert (s.llm_webhook_retry_max_s, s.llm_result_ttl_hours) == (600.0, 0.5)
    assert AllowList.parse(s.llm_callback_allowed_hosts).allows_name("hooks.internal")
    d = Settings.from_env({})
    assert d.llm_callback_allowed_hosts == () and d.llm_webhook_secret == ()
    assert (d.llm_webhook_retry_max_s, d.llm_result_ttl_hours) == (3600.0, 24.0)
    for env in ("LLM_WEBHOOK_RETRY_MAX_SECONDS", "LLM_RESULT_TTL_HOURS"):
        with pytest.raises(ConfigError, match=env):
            Settings.from_env({env: "0"})


# -- what the answer means ------------------------------------------------------------------------


async def test_410_gone_stops_for_good(receiver: Receiver) -> None:
    receiver.status = 410
    outcome, _ = await send(receiver.url(), allowed=LOOPBACK)
    assert outcome.verdict is Verdict.STOP and outcome.http_status == 410
    assert "410 Gone" in outcome.reason


async def test_429_with_retry_after_is_retried_after_that_delay(receiver: Receiver) -> None:
    receiver.status = 429
    receiver.headers = {"Retry-After": "7"}
    outcome, _ = await send(receiver.url(), allowed=LOOPBACK)
    assert outcome.retry and outcome.http_status == 429 and outcome.retry_after_s == 7
    assert "Retry-After 7 s" in outcome.reason


async def test_503_with_an_http_date_retry_after(receiver: Receiver) -> None:
    receiver.status = 503
    when = datetime.now(tz=UTC) + timedelta(seconds=120)
    receiver.headers = {"Retry-After": format_datetime(when, usegmt=True)}
    outcome, _ = await send(receiver.url(), allowed=LOOPBACK)
    assert outcome.retry and outcome.retry_after_s is not None
    assert 110 <= outcome.retry_after_s <= 121


async def test_a_500_is_retried(receiver: Receiver) -> None:
    receiver.status = 500
    outcome, _ = await send(receiver.url(), allowed=LOOPBACK)
    assert outcome.verdict is Verdict.RETRY and outcome.http_status == 500
    assert outcome.retry_after_s is None and outcome.reason == "callback answered 500"


@pytest.mark.parametrize(
    ("status", "headers", "verdict", "after"),
    [
        (200, {}, Verdict.DELIVERED, None),
        (204, {}, Verdict.DELIVERED, None),
        (301, {"location": "https://elsewhere/"}, Verdict.RETRY, None),
        (400, {}, Verdict.RETRY, None),
        (404, {}, Verdict.RETRY, None),
        (410, {}, Verdict.STOP, None),
        (429, {}, Verdict.RETRY, None),
        (429, {"retry-after": "soon"}, Verdict.RETRY, None),
        (503, {"retry-after": "30"}, Verdict.RETRY, 30.0),
        (500, {"retry-after": "30"}, Verdict.RETRY, None),  # only 429 and 503 carry a delay
    ],
)
def test_answers_are_classified(
    status: int, headers: dict[str, str], verdict: Verdict, after: float | None
) -> None:
    outcome = classify_response(status, headers)
    assert (outcome.verdict, outcome.retry_after_s) == (verdict, after)


def test_retry_after_reads_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 90, tz=UTC), usegmt=True)
    assert parse_retry_after(date, now) == 90
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0  # past: now
    assert parse_retry_after("15", now) == 15
    assert parse_retry_after("-1", now) is None and parse_retry_after(None) is None


async def test_a_refused_connection_is_retried() -> None:
    port = free_port()  # nobody listens there
    outcome, transport = await send(f"http://127.0.0.1:{port}/", allowed=LOOPBACK)
    assert outcome.retry and "could not connect to 127.0.0.1" in outcome.reason
    assert transport.hosts == ["127.0.0.1"]


async def test_a_timeout_is_retried(receiver: Receiver) -> None:
    receiver.delay_s = 1.0
    outcome, _ = await send(receiver.url(), allowed=LOOPBACK, timeout_s=0.2)
    # The bound on the whole exchange and httpx's read timeout end at about the same moment.
    assert outcome.retry
    assert "no answer within 0.2 s" in outcome.reason or "ReadTimeout" in outcome.reason


async def test_an_unresolvable_host_is_retried(receiver: Receiver) -> None:
    outcome, transport = await send(receiver.url("nowhere.test"), resolver=resolving({}))
    assert outcome.retry and "could not resolve nowhere.test" in outcome.reason
    assert transport.hosts == []


async def test_a_slow_resolver_is_bounded_by_the_timeout(receiver: Receiver) -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(10)
        return ["127.0.0.1"]

    outcome, _ = await send(receiver.url("slow.test"), resolver=slow, timeout_s=0.1)
    assert outcome.retry and "could not resolve slow.test" in outcome.reason


async def test_the_next_checked_address_is_tried_when_one_refuses(receiver: Receiver) -> None:
    # 127.0.0.2 is loopback too, but nobody listens there: nothing was sent, so the next
    # address (also checked) is tried.
    resolver = resolving({"two.test": ["127.0.0.2", "127.0.0.1"]})
    outcome, transport = await send(receiver.url("two.test"), allowed=LOOPBACK, resolver=resolver)
    assert outcome.delivered and outcome.address == "127.0.0.1"
    assert transport.hosts == ["127.0.0.2", "127.0.0.1"] and len(receiver.seen) == 1


async def test_https_pins_the_address_and_verifies_the_host_name() -> None:
    # No traffic: a mock transport shows what would be sent to the checked public address.
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200)

    resolver = resolving({"hooks.example.com": ["93.184.216.34"]})
    outcome = await deliver(
        "https://hooks.example.com/r?x=1", BODY, {"content-type": "application/json; v=1"},
        resolver=resolver, transport=httpx.MockTransport(answer),
    )  # fmt: skip
    assert outcome.delivered
    [request] = requests
    assert str(request.url) == "https://93.184.216.34/r?x=1"
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.headers["connection"] == "close"  # never pooled across host names
    assert request.headers.get_list("content-type") == ["application/json; v=1"]
    assert request.content == BODY


# -- the gateway: 400 before the provider or the queue ----------------------------------------


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.socket_path) as c:
        yield c


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/x", "http://127.0.0.1:9/", "file:///etc/passwd", "http://[::1]/"]
)
async def test_the_gateway_answers_400_before_calling_the_provider_or_queueing(
    client: AsyncClient, url: str
) -> None:
    provider = MockProvider()
    provider.down = True  # were the URL accepted, the request would be queued (202)
    gateway = Gateway(provider, client)
    result = await gateway.handle(
        LLMRequest(body={"messages": []}, callback_url=url, queue_id="cb-refused")
    )
    assert result.status == 400 and result.decision == "refused"
    assert result.body["error"] == "callback_url_refused"
    assert result.body["message"].startswith(f"callback URL '{url}' refused: ")
    assert provider.calls == 0
    with pytest.raises(NotFound):
        await client.status("cb-refused")
    assert (await client.stats()).queued == 0


async def test_the_gateway_queues_with_an_allowed_internal_callback(client: AsyncClient) -> None:
    provider = MockProvider()
    provider.down = True
    gateway = Gateway(provider, client, callback_allowed=AllowList.parse("10.0.0.0/8"))
    result = await gateway.handle(
        LLMRequest(body={"messages": []}, callback_url="http://10.0.0.1/x", queue_id="cb-ok")
    )
    assert result.status == 202 and provider.calls == 1
    assert (await client.status("cb-ok")).queue_id == "cb-ok"
    # A public name passes the static check; an empty header is no callback at all.
    for n, url in enumerate(["https://hooks.example.com/r", ""]):
        provider.down = False
        fresh = await gateway.handle(LLMRequest(body={"messages": []}, callback_url=url,
                                                queue_id=f"cb-{n}"))  # fmt: skip
        assert fresh.status == 200


async def test_the_example_service_answers_400_and_reads_the_allow_list(daemon: Daemon) -> None:
    from examples.llm_service.app import create_app

    settings = Settings.from_env({"SIDECAR_SOCKET": daemon.socket_path, "LLM_PROVIDER": "mock",
                                  "LLM_CALLBACK_ALLOWED_HOSTS": "192.168.0.0/16"})  # fmt: skip
    # In-process: configuring logs here would change every later test's log capture.
    app = create_app(settings, configure_logs=False)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as http,
    ):
        bad = await http.post("/v1/chat/completions", json=body,
                              headers={"X-Callback-URL": "http://169.254.169.254/"})  # fmt: skip
        assert bad.status_code == 400
        assert bad.json()["message"] == (
            "callback URL 'http://169.254.169.254/' refused: 169.254.169.254 is a link-local "
            "address; allow it with LLM_CALLBACK_ALLOWED_HOSTS"
        )
        ok = await http.post("/v1/chat/completions", json=body,
                             headers={"X-Callback-URL": "http://192.168.1.5/hook"})  # fmt: skip
        assert ok.status_code == 200


# -- a receiver that never finishes answering: the whole exchange is bounded ------------------


async def _drip_server(first: bytes, drip: bytes) -> tuple[asyncio.Server, list[int]]:
    """A raw TCP receiver that reads the request, writes `first`, then `drip` every 50 ms
    forever (httpx's read timeout restarts on each byte); records the connections it took."""
    taken: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(1)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(first)
            while True:
                writer.write(drip)
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), taken


@pytest.mark.parametrize(
    ("first", "drip"),
    [(b"", b"HTTP/1.1 102 Processing\r\n\r\n"), (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"x")],
    ids=["102-processing-forever", "header-bytes-trickled"],
)
async def test_a_receiver_that_drips_forever_is_cut_off_at_the_timeout(
    first: bytes, drip: bytes
) -> None:
    server, taken = await _drip_server(first, drip)
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        # Every read gets a byte well within 0.3 s: only a bound on the whole exchange ends
        # it. Without one the delivery never returns (the outer deadline fails the test).
        outcome, _ = await asyncio.wait_for(
            send(f"http://127.0.0.1:{port}/r", allowed=LOOPBACK, timeout_s=0.3), 20
        )
    assert outcome.retry and "no answer within 0.3 s" in outcome.reason
    assert outcome.address == "127.0.0.1" and taken == [1]
