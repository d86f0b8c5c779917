"""A fleet of real processes for the end-to-end scenarios, and the books they keep.

    with Fleet(tmp, daemons=2, workers_per_daemon=2, concurrency=8, redis=True,
               llm={"LLM_PROVIDER_RPM": "600"}) as fleet:
        fleet.start(provider)                     # redis-server, daemons, `sidecar work`s
        ids = fleet.enqueue(200, callback_url=receiver.url())   # acknowledged queue_ids
        wait_until(lambda: fleet.count_status(ids) == {"completed": 200}, 60, "drained")

Every part is a real process on a real socket: redis-server (tests/support/redis_server.py),
the daemons (tests/support/daemon.py, journaled under `tmp`), `sidecar work` processes and
the example gateway under uvicorn (tests/support/llm_fakes.py), all talking to the fakes
over loopback HTTP. Each wait has a deadline and names what it waited for.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from sidecar.client import Client, item
from sidecar.errors import NotFound
from sidecar.protocol import RequestInfo
from tests.support.daemon import Daemon, daemon_env
from tests.support.fake_provider import FakeProvider
from tests.support.llm_fakes import Proc, free_port
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-e2e-fleet-0123456789"
MODEL = "fake-gpt"
REQUESTS, DELIVERIES, PICKUPS = "requests", "deliveries", "pickups"
# Every request asks for this many completion tokens; the fake answers them all.
MAX_TOKENS = 80
# Eighty characters: twenty prompt tokens by the fake's count, a hundred tokens a request in all.
PROMPT_PAD = "x" * 70


def chat_body(tag: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """A chat request whose last message names it (`tag`, e.g. its queue_id), so the fake
    provider's record tells which request each call was for."""
    content = f"{tag} {PROMPT_PAD}"[: max(len(tag), 80)]
    return {"model": MODEL, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip


def tag_of(content: str) -> str:
    return content.split(" ", 1)[0]


def llm_settings(provider: FakeProvider, **over: str) -> dict[str, str]:
    """The LLM_* settings every process of the fleet shares (the fake provider, short waits)."""
    env = {
        "LLM_PROVIDER": "openai",
        "LLM_BASE_URL": provider.base_url,
        "LLM_MODEL": MODEL,
        "LLM_API_KEY": API_KEY,
        "LLM_CONNECT_TIMEOUT_SECONDS": "1",
        "LLM_READ_TIMEOUT_SECONDS": "5",
        "LLM_WORKER_POLL_SECONDS": "1",
        "LLM_BREAKER_FAILURES": "3",
        "LLM_BREAKER_RESET_SECONDS": "1",
        "LLM_RETRY_BACKOFF_BASE_SECONDS": "0.1",
        "LLM_RETRY_BACKOFF_MAX_SECONDS": "0.4",
        "LLM_DEFAULT_MAX_TOKENS": str(MAX_TOKENS),
        # The receivers of these tests listen on loopback, refused by default.
        "LLM_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "LLM_WEBHOOK_RETRY_MAX_SECONDS": "2",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.update(over)
    return env


def _launcher(hosts: str | None) -> list[str]:
    """How a fleet process's module is run: plainly, or under the hosts shim."""
    if hosts is None:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "tests.e2e.hosts_shim"]


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 0.2,
    show: Callable[[], object] | None = None,
) -> float:
    """Poll `predicate` until it holds; AssertionError naming `what` (and what `show` returns
    then) at the deadline. Returns the time (monotonic) it first held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            seen = "" if show is None else f": {show()}"
            raise AssertionError(f"not {what} within {timeout_s} s{seen}")
        time.sleep(interval_s)  # a bounded poll of a condition, not a wait for it to happen


class Fleet:
    """redis-server (optional), `daemons` daemons, `workers_per_daemon` workers on each."""

    def __init__(
        self,
        tmp: Path,
        *,
        daemons: int = 1,
        workers_per_daemon: int = 1,
        concurrency: int = 8,
        redis: bool = True,
        daemon_over: dict[str, str] | None = None,
        llm: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.n_daemons = daemons
        self.workers_per_daemon = workers_per_daemon
        self.concurrency = concurrency
        self.use_redis = redis
        self.daemon_over = daemon_over or {}
        self.llm_over = llm or {}
        self.redis: RedisServer | None = None
        self.daemons: list[Daemon] = []
        self.workers: list[Proc] = []
        self.gateways: list[tuple[Proc, int]] = []
        self.provider: FakeProvider | None = None

    # -- processes ----------------------------------------------------------------------------

    def start(self, provider: FakeProvider, *, workers: bool = True) -> Fleet:
        self.provider = provider
        if self.use_redis:
            self.redis = RedisServer().start()
        for n in range(self.n_daemons):
            sock = str(self.tmp / f"d{n}.sock")
            over = {"QUEUE_MAX_SIZE": "20000", "QUEUE_LEASE_SECONDS": "30", **self.daemon_over}
            if self.redis is not None:
                over["REDIS_URL"] = self.redis.url
            self.daemons.append(Daemon(sock, daemon_env(sock, **over)).start())
        if workers:
            self.start_workers()
        return self

    def env_for(self, daemon: Daemon, **over: str) -> dict[str, str]:
        """A worker's or gateway's environment: its daemon's socket and the LLM settings."""
        assert self.provider is not None
        base = {k: v for k, v in daemon.env.items() if not k.startswith("SIDECAR_STATE")}
        return {**base, **llm_settings(self.provider, **self.llm_over), **over}

    def start_workers(self, *, hosts: str | None = None, **over: str) -> list[Proc]:
        """`workers_per_daemon` `sidecar work` on each daemon, started together; with `hosts`
        ("name=address,..."), through tests/e2e/hosts_shim.py, which resolves those names."""
        started = []
        for daemon in self.daemons:
            for _ in range(self.workers_per_daemon):
                argv = [*_launcher(hosts), "sidecar", "work", "--concurrency",
                        str(self.concurrency)]  # fmt: skip
                env = self.env_for(daemon, **over)
                if hosts is not None:
                    env["E2E_HOSTS"] = hosts
                started.append(Proc(argv, env))
        for proc in started:
            proc.wait_for_line("llm_worker_started", timeout=60)
        self.workers.extend(started)
        return started

    def start_gateway(self, daemon_index: int = 0, *, hosts: str | None = None,
                      **over: str) -> str:  # fmt: skip
        """The example service under uvicorn on `daemon_index`'s daemon; returns its base URL.
        `hosts` as for start_workers (uvicorn then runs asyncio's loop, whose lookups the
        shim sees)."""
        port = free_port()
        argv = [*_launcher(hosts), "uvicorn", "examples.llm_service.app:app",
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
        if hosts is not None:
            argv += ["--loop", "asyncio"]
        env = self.env_for(self.daemons[daemon_index], **over)
        if hosts is not None:
            env["E2E_HOSTS"] = hosts
        app = Proc(argv, env)
        self.gateways.append((app, port))
        app.wait_for_line("Application startup complete", timeout=60)
        return f"http://127.0.0.1:{port}"

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.workers.clear()

    def stop(self) -> None:
        self.stop_workers()
        for app, _ in self.gateways:
            app.stop()
        self.gateways.clear()
        for daemon in self.daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        if self.redis is not None:
            self.redis.cleanup()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def lines(self, text: str) -> list[str]:
        """The workers' log lines that contain `text`."""
        return [line for w in self.workers for line in w.lines if text in line]

    # -- the books ----------------------------------------------------------------------------

    def client(self, daemon_index: int = 0) -> Client:
        return Client(self.daemons[daemon_index].socket_path)

    def enqueue(
        self,
        count: int,
        *,
        prefix: str = "e2e",
        callback_url: str | Callable[[int], str | None] | None = None,
        max_attempts: int = 3,
        batch: int = 100,
    ) -> list[str]:
        """Enqueue `count` requests as the gateway does (its payload), spread over the
        daemons; returns the queue_ids the daemons acknowledged."""
        acknowledged: list[str] = []
        clients = [self.client(n) for n in range(len(self.daemons))]
        try:
            for start in range(0, count, batch):
                items = []
                for n in range(start, min(count, start + batch)):
                    qid = f"{prefix}-{n:05d}"
                    url = callback_url(n) if callable(callback_url) else callback_url
                    payload = {"request": chat_body(qid), "callback_url": url}
                    items.append(item(payload, queue_id=qid, max_attempts=max_attempts))
                done = clients[(start // batch) % len(clients)].enqueue_many(items)
                acknowledged.extend(d.queue_id for d in done)
        finally:
            for c in clients:
                c.close()
        return acknowledged

    def infos(self, ids: Iterable[str], queue: str = REQUESTS) -> dict[str, RequestInfo | None]:
        """Each queue_id's record in `queue` (None: not found), read through daemon 0."""
        out: dict[str, RequestInfo | None] = {}
        with self.client() as c:
            for qid in ids:
                try:
                    out[qid] = c.status(qid, queue=queue)
                except NotFound:
                    out[qid] = None
        return out

    def count_status(self, ids: Iterable[str], queue: str = REQUESTS) -> dict[str, int]:
        """How many of `ids` are in each status ("missing" for those not found)."""
        infos = self.infos(ids, queue)
        return dict(Counter(i.status if i else "missing" for i in infos.values()))


def provider_calls_by_tag(provider: FakeProvider, status: int = 200) -> Counter[str]:
    """How many calls the fake answered `status` for each request (by its tag)."""
    return Counter(tag_of(c.tag) for c in provider.snapshot() if c.status == status)


def post_chat(http: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body, headers=headers)


def missing(expected: Sequence[str], found: Iterable[str]) -> list[str]:
    """What was acknowledged and is not found: the lost ones."""
    seen = set(found)
    return [q for q in expected if q not in seen]
