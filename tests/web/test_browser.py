"""The dashboard in a real browser: Debian's chromium driven by Playwright, against a real
`sidecar web` and a real daemon, each a subprocess.

Chromium is /usr/bin/chromium (tests/run installs Debian's package where it is missing); these
tests fail, never skip, without it. They save screenshots of the overview and of a request page
in $SCREENSHOTS_DIR (default: sidecar-screenshots in the temporary folder), printed at the
end of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from sidecar.client import Client, item
from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.web.conftest import TOKEN, completed_request, failed_request, screenshot_path

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 20.0
WAIT_MS = 10_000


@dataclass
class WebProcess:
    """`python -m sidecar web` on a free port; url once it listens."""

    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(15)
        if self.reader is not None:
            self.reader.join(15)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


def start_web(socket_path: str, **env: str) -> WebProcess:
    full = daemon_env(socket_path, SIDECAR_WEB_PORT="0", SIDECAR_WEB_SAMPLE_SECONDS="0.3", **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "web"], env=full, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    web = WebProcess(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            web.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "web_serving":
                web.url = event["url"].rstrip("/")
                ready.set()
        ready.set()

    web.reader = threading.Thread(target=read, daemon=True)
    web.reader.start()
    if not ready.wait(START_TIMEOUT_S) or not web.url:
        web.stop()
        raise AssertionError("sidecar web did not start:\n" + "\n".join(web.lines))
    return web


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (tests/run does)")
    # Chromium refuses to run as root with its sandbox; /dev/shm may be small in containers.
    args = ["--disable-dev-shm-usage", *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield launched
        launched.close()


@dataclass
class Setup:
    daemon: Daemon
    web: WebProcess
    client: Client
    page: Page
    console: list[str]


@pytest.fixture
def setup(browser: Browser) -> Iterator[Setup]:
    """A daemon, `sidecar web` with a token, a client of the daemon, and a fresh browser page."""
    with short_tmpdir() as tmp:
        sock = str(tmp / "d.sock")
        daemon = Daemon(sock, daemon_env(sock)).start()
        web = start_web(sock, SIDECAR_WEB_TOKEN=TOKEN, SIDECAR_WEB_SHOW_PAYLOADS="true")
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        console: list[str] = []

        def on_console(msg: ConsoleMessage) -> None:
            if msg.type in ("error", "warning"):
                console.append(msg.text)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: console.append(f"page error: {exc}"))
        try:
            with Client(sock) as client:
                yield Setup(daemon, web, client, page, console)
            # No script blocked, no style refused, no error: the CSP and the page agree.
            assert not [m for m in console if "Content Security Policy" in m], console
            assert console == [], console
        finally:
            context.close()
            try:
                code = web.stop()
            finally:
                daemon.stop()
        assert code == 0, "\n".join(web.lines)  # SIGTERM: a clean exit


def log_in(s: Setup) -> None:
    s.page.goto(s.web.url + "/login")
    s.page.fill('input[name="token"]', TOKEN)
    s.page.click('button[type="submit"]')
    expect(s.page.locator(".flash")).to_have_text("Logged in.", timeout=WAIT_MS)


def test_the_overview_counts_move_after_enqueues(setup: Setup) -> None:
    s = setup
    s.page.goto(s.web.url + "/")
    queued = s.page.locator('[data-count="queued"]')
    expect(queued).to_have_text("0")
    s.client.enqueue_many([item({"prompt": f"p{i}"}) for i in range(25)])
    # The page's script refreshes the counts in place: no reload.
    expect(queued).to_have_text("25", timeout=WAIT_MS)
    jobs = s.client.dequeue(5)
    for job in jobs:
        s.client.complete(job.queue_id, job.lease_id)
    expect(s.page.locator('[data-count="completed"]')).to_have_text("5", timeout=WAIT_MS)
    expect(queued).to_have_text("20", timeout=WAIT_MS)
    # The outbox queues' counts refresh in place too.
    deliveries = s.page.locator('[data-queue-count="deliveries:queued"]')
    expect(deliveries).to_have_text("0")
    for i in range(3):
        s.client.enqueue({"result": i}, queue="deliveries")
    s.client.enqueue({"result": "r"}, queue="pickups")
    expect(deliveries).to_have_text("3", timeout=WAIT_MS)
    expect(s.page.locator('[data-queue-count="pickups:queued"]')).to_have_text("1", timeout=WAIT_MS)

    # Some traffic for the rates, then the overview with its lines, for the screenshot.
    for burst in range(8):
        s.client.enqueue_many([item({"prompt": f"b{burst}-{i}"}) for i in range(10 + 6 * burst)])
        for job in s.client.dequeue(8 + burst):
            s.client.complete(job.queue_id, job.lease_id)
        failed_request(s.client, reason="provider answered 400: invalid model")
        time.sleep(0.35)  # one sample apart: shapes the picture, asserts nothing
    # The lines are drawn by the server from the web process's samples: reload until the
    # accepted line has the bursts' samples in it (a deadline, not a count of reloads).
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        s.page.reload()
        line = s.page.locator("svg.spark.accepted polyline")
        points = (line.get_attribute("points") or "").split() if line.count() else []
        if len(points) >= 8 or time.monotonic() > deadline:
            break
    assert len(points) >= 8, points
    expect(s.page.locator("svg.spark")).to_have_count(4)
    expect(s.page.locator('[data-live="health"]')).to_have_text("ok")
    s.page.screenshot(path=str(screenshot_path("overview.png")), full_page=True)


def test_paging_through_1000_queued_requests(setup: Setup) -> None:
    s = setup
    ids: list[str] = []
    for start in range(0, 1000, 250):
        done = s.client.enqueue_many([item({"n": i}) for i in range(start, start + 250)])
        ids += [d.queue_id for d in done]
    s.page.goto(s.web.url + "/list/queued?limit=100")
    seen: list[str] = []
    pages = 0
    while True:
        pages += 1
        expect(s.page.locator("h1")).to_contain_text(f"page {pages}")
        seen += s.page.locator("#items td.id a").all_inner_texts()
        following = s.page.locator("#next-page")
        if following.count() == 0:
            break
        following.click()
    assert pages == 10
    assert seen == ids  # every one once, oldest first


def test_open_a_failed_request_and_requeue_it(setup: Setup) -> None:
    s = setup
    reason = "provider answered 400: context_length_exceeded (max 128000 tokens)"
    payload = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You summarise support tickets."},
            {"role": "user", "content": "Summarise ticket #4312: printer offline since Monday"},
        ],
        "max_tokens": 512,
        "callback_url": "https://service.internal/llm/results",
    }
    queue_id = failed_request(s.client, reason=reason, payload=payload)
    log_in(s)
    s.page.goto(s.web.url + "/list/failed")
    s.page.click(f'a[href="/requests/{queue_id}"]')
    expect(s.page.locator("#status")).to_have_text("failed")
    expect(s.page.locator("#reason")).to_have_text(reason)
    expect(s.page.locator("#payload")).to_contain_text('"model": "gpt-4o-mini"')
    s.page.screenshot(path=str(screenshot_path("request.png")), full_page=True)
    s.page.click("#requeue")
    expect(s.page.locator(".confirm-what")).to_contain_text(f"Requeue the request {queue_id}")
    assert s.client.status(queue_id).status == "failed"  # not before the confirm
    s.page.click("#confirm")
    expect(s.page.locator(".flash")).to_have_text("Requeued 1 request(s).", timeout=WAIT_MS)
    expect(s.page.locator("#status")).to_have_text("queued")
    info = s.client.status(queue_id)
    assert info.status == "queued" and info.attempts == 0


def test_purge_the_completed_ones(setup: Setup) -> None:
    s = setup
    for _ in range(3):
        completed_request(s.client)
    kept = s.client.enqueue({"n": "stays"}).queue_id
    log_in(s)
    s.page.goto(s.web.url + "/list/completed")
    expect(s.page.locator("#items tbody tr")).to_have_count(3)
    s.page.click("#purge")
    expect(s.page.locator(".confirm-what")).to_have_text(
        "Purge all completed records? This cannot be undone."
    )
    s.page.click("#confirm")
    expect(s.page.locator(".flash")).to_have_text("Purged 3 record(s).", timeout=WAIT_MS)
    expect(s.page.locator(".empty")).to_have_text("No completed requests.")
    assert s.client.status(kept).status == "queued"


def test_an_action_without_the_token_is_refused(setup: Setup) -> None:
    s = setup
    evil = '<img src=x id=injected onerror="document.title=1"><b>bold</b>'
    queue_id = failed_request(s.client, reason=evil)
    s.page.goto(f"{s.web.url}/requests/{queue_id}")
    # A reason holding HTML shows as text: no element made from it.
    expect(s.page.locator("#reason")).to_have_text(evil)
    assert s.page.locator("#injected").count() == 0
    expect(s.page.locator(".actions")).to_contain_text("Log in to requeue it.")
    assert s.page.locator("#requeue").count() == 0
    # A form posted from the dashboard's own page, without having logged in.
    s.page.evaluate(
        """(queueId) => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = "/actions/requeue";
            for (const [name, value] of [["queue_id", queueId], ["confirm", "yes"]]) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = name; input.value = value;
                form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
        }""",
        queue_id,
    )
    expect(s.page.locator("#error-message")).to_have_text(
        "log in with the dashboard's token first", timeout=WAIT_MS
    )
    assert s.client.status(queue_id).status == "failed"
    # The refusal is a 401 page; the browser logs it as a failed resource, which is expected.
    s.console[:] = [m for m in s.console if "401" not in m]
