"""Callback URLs that point inward, refused by the running gateway and the running deliverer.

tests/llm/test_callbacks.py checks the policy function by function, and the Gateway class
in-process for four URLs. Here the same cases go through the example service over HTTP (as
a caller would send them) and through `sidecar work`'s deliverer: each is a test of its own.

The gateway's provider is a closed port, so every request it accepts is queued (202) for the
worker, whose provider (the fake) is up: a URL the gateway let through is then delivered, or
refused, by the deliverer. Names resolve through tests/e2e/hosts_shim.py in both processes
(`rebind.test` and `hooks.test` to 127.0.0.1), so nothing depends on DNS or /etc/hosts.
LLM_CALLBACK_ALLOWED_HOSTS admits `hooks.test` only: 127.0.0.1 by itself stays refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sidecar.errors import NotFound
from tests.e2e.harness import DELIVERIES, REQUESTS, Fleet, chat_body, wait_until
from tests.support.daemon import short_tmpdir
from tests.support.fake_provider import FakeProvider
from tests.support.fake_receiver import FakeReceiver
from tests.support.llm_fakes import free_port

pytestmark = [pytest.mark.timeout(120)]

HOSTS = "rebind.test=127.0.0.1,hooks.test=127.0.0.1"


@dataclass
class Stack:
    fleet: Fleet
    http: httpx.Client
    provider: FakeProvider
    receiver: FakeReceiver  # on 127.0.0.1: where a forged callback would land
    inner: FakeReceiver  # on 127.0.0.2: an internal service a redirect points at

    def post(self, url: str, key: str) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json=chat_body(key),
                              headers={"X-Callback-URL": url, "Idempotency-Key": key})  # fmt: skip

    def status(self, qid: str, queue: str = REQUESTS) -> str | None:
        with self.fleet.client() as c:
            try:
                info = c.status(qid, queue=queue)
            except NotFound:
                return None
        return info.status

    def accepted(self) -> int:
        """How many requests the daemons' request queue has accepted (daemon 0's view)."""
        with self.fleet.client() as c:
            return c.stats().accepted


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    provider = FakeProvider(completion_tokens=5).start()
    receiver = FakeReceiver("whsec_" + "A" * 32)
    inner = FakeReceiver(host="127.0.0.2")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = {"LLM_CALLBACK_ALLOWED_HOSTS": "hooks.test", "LLM_WEBHOOK_RETRY_MAX_SECONDS": "1"}
    with (
        short_tmpdir() as tmp,
        receiver,
        inner,
        provider,
        Fleet(Path(tmp), daemons=1, concurrency=2, redis=False, llm=settings) as fleet,
    ):
        fleet.start(provider, workers=False)
        fleet.start_workers(hosts=HOSTS)
        base = fleet.start_gateway(hosts=HOSTS, LLM_BASE_URL=dead)
        with httpx.Client(base_url=base, timeout=15) as http:
            yield Stack(fleet, http, provider, receiver, inner)


# -- refused by the gateway: 400, before the provider is called or anything is queued ------------


@pytest.mark.parametrize(
    ("key", "url", "why"),
    [
        ("loopback", "http://127.0.0.1:{port}/results", "127.0.0.1 is a loopback address"),
        ("localhost", "http://localhost:{port}/results", "localhost is this host"),
        ("ipv6-loopback", "http://[::1]:{port}/results", "::1 is a loopback address"),
        ("metadata", "http://169.254.169.254/latest/meta-data/",
         "169.254.169.254 is a link-local address"),
        ("private", "http://10.0.0.1/results", "10.0.0.1 is a private address"),
        ("unspecified", "http://0.0.0.0:{port}/results", "0.0.0.0 is an unspecified address"),
        ("file", "file:///etc/passwd", "the scheme 'file://' is not allowed"),
    ],
)  # fmt: skip
def test_the_running_gateway_refuses(stack: Stack, key: str, url: str, why: str) -> None:
    url = url.format(port=stack.receiver.port)
    calls, accepted = len(stack.provider.snapshot()), stack.accepted()
    resp = stack.post(url, f"ssrf-{key}")
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "callback_url_refused"
    assert body["message"].startswith(f"callback URL '{url}' refused: ")
    assert why in body["message"]
    assert stack.accepted() == accepted  # nothing queued
    assert len(stack.provider.snapshot()) == calls and stack.receiver.snapshot() == []


# -- refused at delivery: what the gateway cannot judge without a lookup, or a redirect ------------


def test_a_name_that_resolves_to_127_0_0_1_is_refused(stack: Stack) -> None:
    url = stack.receiver.url(host="rebind.test")
    accepted = stack.accepted()
    resp = stack.post(url, "ssrf-rebind")
    if resp.status_code == 400:  # the gateway looked the name up
        assert "rebind.test resolves to 127.0.0.1, a loopback address" in resp.json()["message"]
        assert stack.accepted() == accepted
    else:
        assert resp.status_code == 202, resp.text
        qid = resp.json()["queue_id"]  # the gateway's, scoped from the Idempotency-Key
        try:
            wait_until(lambda: stack.status(qid, DELIVERIES) == "failed", 30,
                       "the delivery to rebind.test refused")  # fmt: skip
        except AssertionError as exc:
            seen = stack.status(qid, DELIVERIES), stack.status(qid)
            raise AssertionError(
                f"{exc}: (deliveries, requests) = {seen}; worker log:\n"
                + "\n".join(stack.fleet.lines(qid)[-10:])
            ) from None
        with stack.fleet.client() as c:
            info = c.status(qid, queue=DELIVERIES)
        assert "rebind.test resolves to 127.0.0.1, a loopback address" in (info.reason or "")
    assert stack.receiver.snapshot() == []  # listening on 127.0.0.1, never reached


def test_a_redirect_to_a_private_address_is_not_followed(stack: Stack) -> None:
    # hooks.test is allowed; it answers a redirect to an internal service, which is never
    # called; the delivery is retried (a redirect is no delivery) until its TTL.
    target = stack.inner.url("/admin")
    stack.receiver.answer(307, path="/hop", Location=target)
    resp = stack.post(stack.receiver.url("/hop", host="hooks.test"), "ssrf-redirect")
    assert resp.status_code == 202, resp.text
    qid = resp.json()["queue_id"]
    assert stack.receiver.wait_until(lambda ds: len(ds) >= 2, 30), "the delivery was not retried"
    with stack.fleet.client() as c:
        info = c.status(qid, queue=DELIVERIES)
    assert info.status in ("queued", "processing")
    assert f"redirect to '{target}', not followed" in (info.reason or ""), info.reason
    assert all(d.path == "/hop" for d in stack.receiver.snapshot())
    assert stack.inner.snapshot() == []
