"""The LLM side's two flows end to end (fresh 200, queued 202), through real processes only.

The daemon (on a real redis-server), the example app under uvicorn over loopback HTTP, a
`sidecar work` worker, a fake OpenAI-compatible provider the test takes down and brings back,
and a callback sink. Every request sent is counted as fresh, queued or refused-with-an-answer,
and every queued one must reach the sink: lost 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.client import Client
from tests.support.daemon import Daemon, daemon_env, running_daemon, short_tmpdir
from tests.support.llm_fakes import (
    API_KEY,
    API_VERSION,
    CallbackSink,
    FakeProvider,
    Proc,
    free_port,
    llm_env,
    start_app,
    start_worker,
)
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

GOOD = {"model": "fake-gpt", "messages": [{"role": "user", "content": "PROMPT-TEXT-e2e"}]}
BAD = {"model": "bad-model", "messages": [{"role": "user", "content": "PROMPT-TEXT-e2e"}]}


class Books:
    """What the caller saw, by decision: sent = fresh + queued + refused."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.sent = 0
        self.fresh = 0
        self.queued: list[str] = []
        self.refused: list[int] = []

    def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        self.sent += 1
        resp = self.http.post("/v1/chat/completions", json=body, headers=headers)
        if resp.status_code == 200:
            self.fresh += 1
        elif resp.status_code == 202:
            self.queued.append(resp.json()["queue_id"])
        else:
            self.refused.append(resp.status_code)
        return resp


@pytest.fixture
def parts() -> Iterator[tuple[RedisServer, Daemon, Path]]:
    with (
        short_tmpdir() as tmp,
        RedisServer(appendonly=True) as redis,  # a restart keeps what it held
        running_daemon(REDIS_URL=redis.url, QUEUE_MAX_SIZE="5", QUEUE_LEASE_SECONDS="30",
                       QUEUE_RETRY_AFTER_SECONDS="7") as daemon,  # fmt: skip
    ):
        yield redis, daemon, tmp


def test_fresh_queued_refused_and_nothing_lost(parts: tuple[RedisServer, Daemon, Path]) -> None:
    redis, daemon, tmp = parts
    provider, sink = FakeProvider(), CallbackSink()
    provider.start()
    sink.start()
    record_dir = tmp / "llm_response_logs"
    env = llm_env(daemon_env(daemon.socket_path), provider.port, record_dir)
    port = free_port()
    app = start_app(env, port)
    worker: Proc | None = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            books = Books(http)
            worker = _run_flows(books, redis, daemon, provider, sink, env)
    finally:
        if worker is not None:
            worker.stop()
        app.stop()
        provider.stop()
        sink.stop()
    _check_logs(app, worker)
    _check_recordings(record_dir, provider)


def _run_flows(
    books: Books,
    redis: RedisServer,
    daemon: Daemon,
    provider: FakeProvider,
    sink: CallbackSink,
    env: dict[str, str],
) -> Proc:
    cb = {"X-Callback-URL": sink.url}
    # Provider up: a fresh 200; a request the provider rejects gets its 400, nothing queued.
    assert books.post(GOOD).status_code == 200
    bad = books.post(BAD, **cb)
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    with Client(daemon.socket_path) as c:
        assert c.stats().accepted == 0
    # Provider down: 202 with a queue_id, status queued; a retried POST is the same request.
    provider.stop()
    for n in range(3):
        resp = books.post(GOOD, **cb, **{"Idempotency-Key": f"e2e-{n}"})
        assert resp.status_code == 202, resp.text
    again = books.http.post("/v1/chat/completions", json=GOOD,
                            headers={**cb, "Idempotency-Key": "e2e-0"})  # fmt: skip
    # The queue_id is derived from the key and the request (never the key itself).
    assert again.status_code == 202 and again.json()["queue_id"] == books.queued[-3]
    assert books.queued[-3].startswith("idem-") and len(set(books.queued[-3:])) == 3
    for qid in books.queued:
        assert books.http.get(f"/v1/requests/{qid}").json()["status"] == "queued"
    # Redis down too: still 202, from the local queue, until its limit answers 503.
    redis.stop()
    while not books.refused or books.refused[-1] != 503:
        resp = books.post(GOOD, **cb)
        assert resp.status_code in (202, 503), resp.text
        assert books.sent < 20, "the local queue never answered queue_full"
    assert resp.headers["Retry-After"] == "7" and resp.json() == {"error": "queue_full"}
    with Client(daemon.socket_path) as c:
        assert c.stats().mode == "local_fallback"
    # A worker while the provider is still down: it retries with a delay, losing nothing.
    worker = start_worker(env)
    worker.wait_for_line("llm_retried", timeout=60)
    # Everything comes back: the worker completes each request and the sink gets each result.
    redis.start()
    provider.start()
    if not sink.wait_for(len(books.queued), timeout=120):
        missing = set(books.queued) - {b["queue_id"] for b in sink.bodies}
        raise AssertionError(f"no result for {missing}:\n" + "\n".join(worker.lines[-30:]))
    worker.wait_for_line("llm_completed", count=len(books.queued), timeout=30)
    delivered = {b["queue_id"]: b for b in sink.bodies}
    assert set(delivered) == set(books.queued)  # lost 0
    assert all(b["status"] == "completed" for b in delivered.values())
    assert all(b["response"]["choices"][0]["message"]["content"] == "fake answer"
               for b in delivered.values())  # fmt: skip
    for qid in books.queued:
        # Completed, and its result went to the callback: nothing waits to be picked up.
        done = books.http.get(f"/v1/requests/{qid}")
        assert done.status_code == 404 and "sent to the callback" in done.json()["message"]
    # The sidecar away: 503, never a silent drop (the provider is down again first).
    provider.stop()
    daemon.stop()
    gone = books.post(GOOD, **cb)
    assert gone.status_code == 503 and gone.json() == {"error": "sidecar_unavailable"}
    assert books.sent == books.fresh + len(books.queued) + len(books.refused)
    assert (books.fresh, books.refused.count(400), books.refused.count(503)) == (1, 1, 2)
    assert len(books.queued) >= 4, books.queued
    return worker


def _check_logs(app: Proc, worker: Proc | None) -> None:
    assert worker is not None
    # One line per decision, with the queue_id; never the prompt or the response text.
    decisions = (
        (app, ("llm_fresh", "llm_queued", "llm_refused")),
        (worker, ("llm_retried", "llm_completed", "llm_callback_delivered")),
    )
    for proc, events in decisions:
        for event in events:
            lines = [line for line in proc.lines if event in line]
            assert lines, event
            assert all("queue_id=" in line for line in lines), lines
        assert not [line for line in proc.lines if "PROMPT-TEXT" in line or "fake answer" in line]


def _check_recordings(record_dir: Path, provider: FakeProvider) -> None:
    files = [p for p in record_dir.iterdir() if p.suffix == ".json" and p.name != "versions.json"]
    records = [json.loads(p.read_text()) for p in files]
    answered = [r for r in records if r["status"] is not None]
    # One file per provider call: every request the fake provider answered has its record.
    assert len(answered) == provider.received and provider.unauthorised == 0
    assert {r["status"] for r in answered} == {200, 400}
    for r in answered:
        assert r["api_version"]["headers"] == {"openai-version": API_VERSION}
        assert r["api_version"]["model"] in ("fake-gpt-2026-01-01", None)
        assert r["provider"] == "openai" and r["latency_s"] >= 0 and r["time"]
    for p in record_dir.iterdir():
        text = p.read_text()
        assert API_KEY not in text and "Bearer" not in text, p
    index = json.loads((record_dir / "versions.json").read_text())
    assert any(v["headers"] == {"openai-version": API_VERSION} for v in index["versions"].values())
    assert oct(os.stat(record_dir).st_mode & 0o777) == oct(0o700)


def test_production_with_queueing_off_answers_503_and_records_nothing() -> None:
    """LLM_QUEUE_ENABLED=false answers 503 instead of queueing; the recorder flag is refused."""
    provider = FakeProvider()
    provider.start()
    with short_tmpdir() as tmp, running_daemon() as daemon:
        record_dir = tmp / "llm_response_logs"
        env = llm_env(daemon_env(daemon.socket_path), provider.port, record_dir,
                      ENVIRONMENT="production", LLM_QUEUE_ENABLED="false")  # fmt: skip
        port = free_port()
        app = start_app(env, port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                assert http.post("/v1/chat/completions", json=GOOD).status_code == 200
                provider.stop()
                down = http.post("/v1/chat/completions", json=GOOD)
                assert down.status_code == 503 and "Retry-After" in down.headers
                assert down.json() == {"error": "provider_unavailable"}
        finally:
            app.stop()
            provider.stop()
        with Client(daemon.socket_path) as c:
            assert c.stats().accepted == 0  # nothing queued
        assert provider.received == 1
        assert not record_dir.exists()
        assert app.count("llm_recorder_refused") == 1
