"""The dashboard against a real daemon: a daemon subprocess per test, the app in a TestClient."""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Starlette warns at import that it prefers httpx2 to httpx; httpx is what the project has.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from sidecar.client import Client
from sidecar.config import Settings
from sidecar.web import create_app
from tests.support.daemon import Daemon, daemon_env, short_tmpdir

TOKEN = "web-test-token-0123456789abcdef"
# Screenshots the browser tests saved in this run; their folder is printed at the end.
SAVED: list[Path] = []
BASE = "http://127.0.0.1:8089"
ORIGIN = {"Origin": BASE}


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with short_tmpdir() as tmp:
        sock = str(tmp / "d.sock")
        running = Daemon(sock, daemon_env(sock)).start()
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def sidecar(daemon: Daemon) -> Iterator[Client]:
    """A blocking client of the test's daemon, to set up and check what the dashboard shows."""
    with Client(daemon.socket_path) as client:
        yield client


@pytest.fixture
def web(daemon: Daemon) -> Iterator[Callable[..., TestClient]]:
    """web(**env) -> a TestClient of the dashboard for the test's daemon (closed at teardown)."""
    opened: list[TestClient] = []

    def make(**env: str) -> TestClient:
        settings = Settings.from_env({"SIDECAR_SOCKET": daemon.socket_path, **env})
        client = TestClient(create_app(settings), base_url=BASE, follow_redirects=False)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field in the page"
    return found.group(1)


def login(client: TestClient, token: str = TOKEN) -> str:
    """Log in with the token; the session's CSRF token (read from a page, as a browser would)."""
    res = client.post("/login", data={"token": token, "next": "/"}, headers=ORIGIN)
    assert res.status_code == 303, res.text
    return csrf_of(client.get("/").text)


def failed_request(client: Client, reason: str = "provider said no", payload: object = None) -> str:
    """A request that failed for good (a dead letter): enqueued, taken, failed without retry."""
    # Priority 0: taken before whatever else the test queued (at the default priority).
    payload = {"prompt": "hello"} if payload is None else payload
    queue_id = client.enqueue(payload, max_attempts=1, priority=0).queue_id
    [job] = client.dequeue(1)
    assert job.queue_id == queue_id
    client.fail(job.queue_id, job.lease_id, reason, retry=False)
    return queue_id


def completed_request(client: Client) -> str:
    queue_id = client.enqueue({"prompt": "done"}, priority=0).queue_id
    [job] = client.dequeue(1)
    assert job.queue_id == queue_id
    client.complete(job.queue_id, job.lease_id)
    return queue_id


def screenshot_path(name: str) -> Path:
    """Where the browser tests save a screenshot: $SCREENSHOTS_DIR, else a fixed folder in
    the temporary directory (printed in the run's summary)."""
    folder = Path(os.environ.get("SCREENSHOTS_DIR")
                  or Path(tempfile.gettempdir()) / "sidecar-screenshots")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    SAVED.append(path)
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in SAVED:
        if path.exists():
            terminalreporter.write_line(f"dashboard screenshot: {path}")
