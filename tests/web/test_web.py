"""Every route of the dashboard against a real daemon, and each of its security rules."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

import pytest
from starlette.testclient import TestClient  # imported first by conftest.py, which quiets it

from sidecar.client import Client
from sidecar.config import Settings
from sidecar.errors import NotFound
from sidecar.web import BindRefused, check_bind, create_app
from sidecar.web.app import CSP
from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.support.redis_server import RedisServer
from tests.web.conftest import (
    BASE,
    ORIGIN,
    TOKEN,
    completed_request,
    csrf_of,
    failed_request,
    login,
)

Web = Callable[..., TestClient]


def error_of(html: str) -> str:
    found = re.search(r'id="error-message">(.*?)</p>', html, re.S)
    assert found is not None, html
    return found.group(1)


# -- pages ------------------------------------------------------------------------------------


def test_every_page_answers_with_the_security_headers(web: Web, sidecar: Client) -> None:
    failed = failed_request(sidecar)
    client = web()
    for path in ("/", "/api/overview", "/list/queued", "/list/failed", f"/requests/{failed}",
                 "/login", "/static/app.css", "/static/app.js", "/list/nope"):  # fmt: skip
        res = client.get(path)
        assert res.headers["content-security-policy"] == CSP, path
        assert "default-src 'none'" in CSP and "script-src 'self'" in CSP
        assert "frame-ancestors 'none'" in CSP and "base-uri 'none'" in CSP
        assert res.headers["x-content-type-options"] == "nosniff", path
        assert res.headers["referrer-policy"] == "same-origin", path
    # Nothing inline that the policy would block: no inline script, no style attribute.
    for path in ("/", "/list/failed", f"/requests/{failed}", "/login"):
        html = client.get(path).text
        assert "<script>" not in html and " style=" not in html and "javascript:" not in html


def test_overview_shows_mode_counts_usage_breaker_and_health(web: Web, sidecar: Client) -> None:
    for i in range(3):
        sidecar.enqueue({"n": i})
    failed_request(sidecar)
    completed_request(sidecar)
    html = web().get("/").text
    assert "local_only" in html
    assert re.search(r'data-count="queued">3<', html)
    assert re.search(r'data-count="failed">1<', html)
    assert re.search(r'data-count="completed">1<', html)
    assert re.search(r'data-count="dead_letters">1<', html)
    assert 'id="usage-meter"' in html and "breaker" in html
    assert 'data-live="health">ok<' in html


def test_the_overview_json_follows_enqueues(web: Web, sidecar: Client) -> None:
    client = web()
    before = client.get("/api/overview").json()
    assert before["counts"]["queued"] == 0 and before["mode"] == "local_only"
    for i in range(7):
        sidecar.enqueue({"n": i})
    after = client.get("/api/overview").json()
    assert after["counts"]["queued"] == 7
    assert set(after) == {"mode", "health", "counts", "queues", "usage", "items", "breaker_open",
                          "rates"}  # fmt: skip


def test_rates_come_from_samples_taken_in_the_web_process(web: Web, sidecar: Client) -> None:
    # One sample at start, then only those taken here: each pair straddles what it measures.
    client = web(SIDECAR_WEB_SAMPLE_SECONDS="3600")
    app_state = client.app.state.web  # type: ignore[attr-defined]
    sampler = app_state.sampler
    for i in range(20):
        sidecar.enqueue({"n": i})
    # Two samples around the enqueues give a rate; taken directly, not waited for.
    client.portal.call(sampler.sample)  # type: ignore[union-attr]
    sidecar.enqueue({"n": "last"})
    client.portal.call(sampler.sample)  # type: ignore[union-attr]
    [accepted] = [s for s in sampler.series() if s.name == "accepted"]
    assert accepted.rates and accepted.rates[-1] > 0 and accepted.points
    html = client.get("/").text
    assert '<svg class="spark accepted"' in html and "<polyline points=" in html


def test_a_list_pages_through_every_queued_request_with_its_cursor(
    web: Web, sidecar: Client
) -> None:
    ids = [sidecar.enqueue({"n": i}).queue_id for i in range(120)]
    client = web()
    seen: list[str] = []
    url: str | None = "/list/queued?limit=50"
    pages = 0
    while url is not None:
        html = client.get(url).text
        pages += 1
        seen += re.findall(r'<a href="/requests/([0-9a-f]+)">', html)
        nxt = re.search(r'href="([^"]+)" id="next-page"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert pages == 3
    assert seen == ids  # oldest first, each once


def test_a_list_filters_by_priority_and_orders_newest_first(web: Web, sidecar: Client) -> None:
    urgent = [sidecar.enqueue({"n": i}, priority=0).queue_id for i in range(3)]
    for i in range(3):
        sidecar.enqueue({"n": i}, priority=7)
    client = web()
    html = client.get("/list/queued?priority=0").text
    assert re.findall(r'<a href="/requests/([0-9a-f]+)">', html) == urgent
    html = client.get("/list/queued?priority=0&order=newest").text
    assert re.findall(r'<a href="/requests/([0-9a-f]+)">', html) == urgent[::-1]


@pytest.mark.parametrize(
    ("url", "status", "says"),
    [
        ("/list/bogus", 404, "unknown status"),
        ("/list/queued?priority=42", 400, "priority must be one of"),
        ("/list/queued?order=sideways", 400, "order must be one of"),
        ("/list/queued?limit=7", 400, "limit must be one of"),
        ("/list/queued?cursor=not-a-cursor", 400, "bad_cursor"),
        ("/requests/no-such-request", 404, "not_found"),
        ("/list/failed?queue=nope", 404, "unknown queue; this daemon serves requests, deliveries"),
        ("/list/failed?queue=%3Cb%3E", 404, "unknown queue"),
        ("/requests/abc?queue=nope", 404, "unknown queue"),
    ],
)
def test_bad_input_in_a_page_gets_a_clear_error(web: Web, url: str, status: int, says: str) -> None:
    res = web().get(url)
    assert res.status_code == status
    assert says in error_of(res.text)


def test_a_request_page_shows_metadata_reason_and_attempts(web: Web, sidecar: Client) -> None:
    queue_id = failed_request(sidecar, reason="provider answered 400")
    html = web().get(f"/requests/{queue_id}").text
    assert queue_id in html and "provider answered 400" in html
    assert "1 of 1" in html  # attempts of max_attempts
    assert 'id="status">failed<' in html


def test_payloads_are_hidden_by_default(web: Web, sidecar: Client) -> None:
    queue_id = sidecar.enqueue({"prompt": "secret-prompt-text"}).queue_id
    html = web().get(f"/requests/{queue_id}").text
    assert "secret-prompt-text" not in html
    assert "SIDECAR_WEB_SHOW_PAYLOADS" in html


def test_payloads_show_when_allowed_and_only_to_an_operator_with_the_token(
    web: Web, sidecar: Client
) -> None:
    queue_id = sidecar.enqueue({"prompt": "visible-prompt"}).queue_id
    # Without a token nobody logs in, so nobody sees payloads (`sidecar web` refuses to start
    # so configured; an app built anyway still hides them).
    read_only = web(SIDECAR_WEB_SHOW_PAYLOADS="true")
    html = read_only.get(f"/requests/{queue_id}").text
    assert "visible-prompt" not in html
    assert "needs SIDECAR_WEB_TOKEN and a login" in html
    guarded = web(SIDECAR_WEB_SHOW_PAYLOADS="true", SIDECAR_WEB_TOKEN=TOKEN)
    assert "visible-prompt" not in guarded.get(f"/requests/{queue_id}").text
    login(guarded)
    assert "visible-prompt" in guarded.get(f"/requests/{queue_id}").text


def test_html_in_a_reason_or_a_payload_renders_as_text(web: Web, sidecar: Client) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    queue_id = sidecar.enqueue({"prompt": evil}, max_attempts=1).queue_id
    [job] = sidecar.dequeue(1)
    sidecar.fail(job.queue_id, job.lease_id, evil, retry=False)
    client = web(SIDECAR_WEB_SHOW_PAYLOADS="true", SIDECAR_WEB_TOKEN=TOKEN)
    login(client)
    page = client.get(f"/requests/{queue_id}").text
    assert 'id="payload"' in page  # the payload is shown, escaped
    for html in (page, client.get("/list/failed").text):
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(" in html


# -- the named queues (requests, and the outbox: deliveries, pickups) ---------------------------


def dead_delivery(client: Client, reason: str = "callback answered 500") -> str:
    """A result whose delivery to its callback failed for good: a dead letter of `deliveries`."""
    queue_id = client.enqueue({"result": "r"}, max_attempts=1, priority=0,
                              queue="deliveries").queue_id  # fmt: skip
    [job] = client.dequeue(1, queue="deliveries")
    assert job.queue_id == queue_id
    client.fail(job.queue_id, job.lease_id, reason, retry=False, queue="deliveries")
    return queue_id


def test_the_overview_shows_the_outbox_queues_counts(web: Web, sidecar: Client) -> None:
    dead = [dead_delivery(sidecar) for _ in range(2)]
    for i in range(3):
        sidecar.enqueue({"result": i}, queue="deliveries")
    for i in range(4):
        sidecar.enqueue({"result": i}, queue="pickups")
    sidecar.enqueue({"prompt": "p"})
    client = web()
    html = client.get("/").text
    assert re.search(r'data-queue-count="deliveries:queued">3<', html)
    assert re.search(r'data-queue-count="deliveries:dead_letters">2<', html)
    assert re.search(r'data-queue-count="pickups:queued">4<', html)
    assert re.search(r'data-count="queued">1<', html)  # the requests queue's own count
    assert re.search(r'data-count="dead_letters">0<', html)
    assert 'href="/list/failed?queue=deliveries"' in html
    queues = client.get("/api/overview").json()["queues"]
    assert queues["deliveries"] == {"queued": 3, "processing": 0, "dead_letters": 2}
    assert queues["pickups"]["queued"] == 4 and set(queues) == {"deliveries", "pickups"}
    # The nav offers every queue the daemon names.
    for name in ("requests", "deliveries", "pickups"):
        assert re.search(rf'id="queues".*>{name}</a>', html, re.S)
    assert dead


def test_an_outbox_queue_is_listed_shown_and_its_dead_letters_requeued(
    web: Web, sidecar: Client
) -> None:
    dead = dead_delivery(sidecar)
    in_requests = failed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    csrf = login(client)
    listed = client.get("/list/failed?queue=deliveries").text
    ids = re.findall(r'<a href="/requests/([0-9a-f]+)\?queue=deliveries">', listed)
    assert ids == [dead]  # only the deliveries queue's, each linked in its queue
    assert 'name="queue" value="deliveries"' in listed  # the bulk forms keep the queue
    assert 'href="/list/queued?queue=deliveries"' in listed  # so do the nav's status links
    assert re.findall(r'<a href="/requests/([0-9a-f]+)">', client.get("/list/failed").text) == [
        in_requests
    ]
    page = client.get(f"/requests/{dead}?queue=deliveries").text
    assert 'id="status">failed<' in page and "callback answered 500" in page
    assert client.get(f"/requests/{dead}").status_code == 404  # not in the requests queue
    # Requeue it from its page: the confirm page carries the queue; then it is queued again.
    form = {"csrf": csrf, "queue_id": dead, "queue": "deliveries"}
    confirm = client.post("/actions/requeue", data=form, headers=ORIGIN)
    assert confirm.status_code == 200 and "In the deliveries queue" in confirm.text
    assert 'name="queue" value="deliveries"' in confirm.text
    assert sidecar.status(dead, queue="deliveries").status == "failed"
    done = client.post("/actions/requeue", data=form | {"confirm": "yes"}, headers=ORIGIN)
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/requests/{dead}?queue=deliveries&done=requeued")
    assert sidecar.status(dead, queue="deliveries").status == "queued"
    assert sidecar.status(in_requests).status == "failed"  # the other queue is untouched


def test_bulk_requeue_and_purge_act_on_the_named_queue_only(web: Web, sidecar: Client) -> None:
    dead = [dead_delivery(sidecar) for _ in range(2)]
    in_requests = failed_request(sidecar)
    picked = sidecar.enqueue({"result": "x"}, queue="pickups", priority=0).queue_id
    [job] = sidecar.dequeue(1, queue="pickups")
    sidecar.complete(job.queue_id, job.lease_id, queue="pickups")
    done_request = completed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    csrf = login(client)
    res = client.post(
        "/actions/requeue",
        headers=ORIGIN,
        data={
            "csrf": csrf,
            "status": "failed",
            "limit": "10",
            "queue": "deliveries",
            "confirm": "yes",
        },
    )
    assert res.status_code == 303, res.text
    assert res.headers["location"] == "/list/failed?queue=deliveries&done=requeued&n=2"
    assert [sidecar.status(q, queue="deliveries").status for q in dead] == ["queued", "queued"]
    assert sidecar.status(in_requests).status == "failed"
    res = client.post(
        "/actions/purge",
        headers=ORIGIN,
        data={"csrf": csrf, "status": "completed", "queue": "pickups", "confirm": "yes"},
    )
    assert res.status_code == 303, res.text
    with pytest.raises(NotFound):
        sidecar.status(picked, queue="pickups")
    assert sidecar.status(done_request).status == "completed"


def test_an_action_on_an_unknown_queue_is_refused_and_changes_nothing(
    web: Web, sidecar: Client
) -> None:
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    csrf = login(client)
    for queue in ("nope", "x" * 500):
        res = client.post(
            "/actions/requeue",
            headers=ORIGIN,
            data={"csrf": csrf, "queue_id": queue_id, "queue": queue, "confirm": "yes"},
        )
        assert res.status_code == 404
        assert "unknown queue; this daemon serves requests, deliveries, pickups" in error_of(
            res.text
        )
    assert sidecar.status(queue_id).status == "failed"
    assert client.get("/list/failed").status_code == 200  # the dashboard carries on


# -- read-only without a token -----------------------------------------------------------------


@pytest.mark.parametrize("action", ["requeue", "cancel", "purge"])
def test_without_a_token_every_action_answers_403_and_changes_nothing(
    web: Web, sidecar: Client, action: str
) -> None:
    failed = failed_request(sidecar)
    queued = sidecar.enqueue({"n": 1}).queue_id
    completed = completed_request(sidecar)
    form = {"queue_id": failed if action == "requeue" else queued, "status": "completed",
            "confirm": "yes"}  # fmt: skip
    res = web().post(f"/actions/{action}", data=form, headers=ORIGIN)
    assert res.status_code == 403
    assert "read-only" in error_of(res.text)
    assert sidecar.status(failed).status == "failed"
    assert sidecar.status(queued).status == "queued"
    assert sidecar.status(completed).status == "completed"


def test_binding_beyond_loopback_without_a_token_is_refused() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.com"):
        with pytest.raises(BindRefused, match="SIDECAR_WEB_TOKEN"):
            check_bind(host, None)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)


def test_sidecar_web_exits_2_when_told_to_bind_0_0_0_0_without_a_token() -> None:
    with short_tmpdir() as tmp:
        env = daemon_env(str(tmp / "d.sock"), SIDECAR_WEB_HOST="0.0.0.0", SIDECAR_WEB_PORT="0")
        env.pop("SIDECAR_WEB_TOKEN", None)
        run = subprocess.run([sys.executable, "-m", "sidecar", "web"], env=env,
                             capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "SIDECAR_WEB_HOST=0.0.0.0 is not a loopback address" in run.stderr
    assert "SIDECAR_WEB_TOKEN" in run.stderr


def test_sidecar_web_exits_2_when_told_to_show_payloads_without_a_token() -> None:
    with short_tmpdir() as tmp:
        env = daemon_env(str(tmp / "d.sock"), SIDECAR_WEB_SHOW_PAYLOADS="true",
                         SIDECAR_WEB_PORT="0")  # fmt: skip
        env.pop("SIDECAR_WEB_TOKEN", None)
        run = subprocess.run([sys.executable, "-m", "sidecar", "web"], env=env,
                             capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "SIDECAR_WEB_SHOW_PAYLOADS=true needs SIDECAR_WEB_TOKEN" in run.stderr


def test_a_foreign_host_header_is_refused_on_loopback(web: Web) -> None:
    client = web()
    res = client.get("/", headers={"Host": "attacker.example"})
    assert res.status_code == 400
    assert res.headers["content-security-policy"] == CSP
    assert "SIDECAR_WEB_ALLOWED_HOSTS" in res.text and "attacker" not in res.text
    assert client.get("/", headers={"Host": "localhost:8089"}).status_code == 200


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.10"])
def test_bound_beyond_loopback_with_a_token_a_foreign_host_is_still_refused(
    web: Web, sidecar: Client, bind: str
) -> None:
    """DNS rebinding: a page of attacker.example whose name now resolves to this host is
    refused on every route and every method, before any login or action is looked at."""
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_HOST=bind, SIDECAR_WEB_TOKEN=TOKEN)
    rebound = {"Host": "attacker.example:8089"}
    for path in ("/", "/api/overview", "/list/failed", f"/requests/{queue_id}", "/login"):
        assert client.get(path, headers=rebound).status_code == 400, path
    res = client.post("/actions/requeue", data={"queue_id": queue_id, "confirm": "yes"},
                      headers=rebound | {"Authorization": f"Bearer {TOKEN}",
                                         "Origin": "http://attacker.example:8089"})  # fmt: skip
    assert res.status_code == 400
    assert sidecar.status(queue_id).status == "failed"
    assert client.get("/", headers={"Host": "localhost:8089"}).status_code == 200


def test_allowed_hosts_name_what_the_dashboard_answers_to(web: Web, sidecar: Client) -> None:
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_HOST="0.0.0.0", SIDECAR_WEB_TOKEN=TOKEN,
                 SIDECAR_WEB_ALLOWED_HOSTS="dash.example.com,10.1.0.0/16")  # fmt: skip
    assert client.get("/", headers={"Host": "dash.example.com"}).status_code == 200
    assert client.get("/", headers={"Host": "10.1.7.7:8089"}).status_code == 200
    assert client.get("/", headers={"Host": "evil.example.com"}).status_code == 400
    # An operator on the allowed name acts as usual (its Origin names the same host).
    own = {"Host": "dash.example.com", "Origin": "https://dash.example.com"}
    res = client.post("/login", data={"token": TOKEN}, headers=own)
    assert res.status_code == 303
    own["Cookie"] = res.headers["set-cookie"].partition(";")[0]
    csrf = csrf_of(client.get("/", headers=own).text)
    done = client.post("/actions/requeue", headers=own,
                       data={"csrf": csrf, "queue_id": queue_id, "confirm": "yes"})  # fmt: skip
    assert done.status_code == 303
    assert sidecar.status(queue_id).status == "queued"


# -- with the token ------------------------------------------------------------------------


def test_login_sets_an_httponly_samesite_strict_cookie(web: Web) -> None:
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    res = client.post("/login", data={"token": TOKEN, "next": "/list/failed"}, headers=ORIGIN)
    assert res.status_code == 303
    assert res.headers["location"].startswith("/list/failed")
    cookie = res.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie


def test_login_never_redirects_to_another_site(web: Web) -> None:
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        res = client.post("/login", data={"token": TOKEN, "next": target}, headers=ORIGIN)
        assert res.headers["location"].startswith("/?"), target


def test_a_wrong_token_does_not_log_in(web: Web) -> None:
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    res = client.post("/login", data={"token": "x" * 31}, headers=ORIGIN)
    assert res.status_code == 401
    assert "wrong token" in error_of(res.text)
    assert "set-cookie" not in res.headers


def test_requeue_by_id_is_confirmed_then_done(web: Web, sidecar: Client) -> None:
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    csrf = login(client)
    form = {"csrf": csrf, "queue_id": queue_id}
    confirm = client.post("/actions/requeue", data=form, headers=ORIGIN)
    assert confirm.status_code == 200 and 'id="confirm"' in confirm.text
    assert sidecar.status(queue_id).status == "failed"  # the confirm page changes nothing
    done = client.post("/actions/requeue", data=form | {"confirm": "yes"}, headers=ORIGIN)
    assert done.status_code == 303
    info = sidecar.status(queue_id)
    assert info.status == "queued" and info.attempts == 0
    assert "Requeued 1 request" in client.get(done.headers["location"]).text


def test_requeue_by_filter_cancel_and_purge(web: Web, sidecar: Client) -> None:
    failed = [failed_request(sidecar) for _ in range(3)]
    queued = sidecar.enqueue({"n": 1}).queue_id
    completed = [completed_request(sidecar) for _ in range(2)]
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    csrf = login(client)

    def act(action: str, **form: str) -> None:
        res = client.post(f"/actions/{action}", data={"csrf": csrf, "confirm": "yes", **form},
                          headers=ORIGIN)  # fmt: skip
        assert res.status_code == 303, res.text

    act("requeue", status="failed", limit="2")
    assert sorted(sidecar.status(q).status for q in failed) == ["failed", "queued", "queued"]
    act("cancel", queue_id=queued)
    assert sidecar.status(queued).reason == "cancelled"
    act("purge", status="completed")
    for queue_id in completed:
        with pytest.raises(NotFound):
            sidecar.status(queue_id)
    assert sidecar.status(queued).status == "failed"  # a cancelled one is not completed


def test_the_dashboard_does_not_purge_queued_requests(web: Web, sidecar: Client) -> None:
    queued = sidecar.enqueue({"n": 1}).queue_id
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    csrf = login(client)
    res = client.post("/actions/purge", data={"csrf": csrf, "status": "queued", "confirm": "yes"},
                      headers=ORIGIN)  # fmt: skip
    assert res.status_code == 400
    assert "sidecar purge --force" in error_of(res.text)
    assert sidecar.status(queued).status == "queued"


def test_a_script_may_act_with_the_token_as_a_bearer_header(web: Web, sidecar: Client) -> None:
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    wrong = client.post("/actions/requeue", data={"queue_id": queue_id, "confirm": "yes"},
                        headers={"Authorization": "Bearer " + "y" * 30})  # fmt: skip
    assert wrong.status_code == 401
    assert sidecar.status(queue_id).status == "failed"
    right = client.post("/actions/requeue", data={"queue_id": queue_id, "confirm": "yes"},
                        headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert right.status_code == 303
    assert sidecar.status(queue_id).status == "queued"


@pytest.mark.parametrize(
    ("case", "status", "says"),
    [
        ("not logged in", 401, "log in"),
        ("no csrf", 403, "CSRF"),
        ("wrong csrf", 403, "CSRF"),
        ("csrf of another session", 403, "CSRF"),
        ("foreign origin", 403, "cross-origin"),
        ("foreign referer", 403, "cross-origin"),
        ("no origin", 403, "names no origin"),
        ("cross-site fetch", 403, "cross-site"),
    ],
)
def test_an_action_without_a_valid_token_csrf_or_origin_is_refused_and_changes_nothing(
    web: Web, sidecar: Client, case: str, status: int, says: str
) -> None:
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    form = {"queue_id": queue_id, "confirm": "yes"}
    headers = dict(ORIGIN)
    if case != "not logged in":
        form["csrf"] = login(client)
    if case == "no csrf":
        del form["csrf"]
    elif case == "wrong csrf":
        form["csrf"] = "A" * 43
    elif case == "csrf of another session":
        other = web(SIDECAR_WEB_TOKEN=TOKEN)
        form["csrf"] = login(other)
    elif case == "foreign origin":
        headers = {"Origin": "http://evil.example"}
    elif case == "foreign referer":
        headers = {"Referer": "http://evil.example/page"}
    elif case == "no origin":
        headers = {}
    elif case == "cross-site fetch":
        headers |= {"Sec-Fetch-Site": "cross-site"}
    res = client.post("/actions/requeue", data=form, headers=headers)
    assert res.status_code == status
    assert says in error_of(res.text)
    assert sidecar.status(queue_id).status == "failed"


def test_neither_the_token_nor_a_redis_password_appears_in_a_page(web: Web) -> None:
    with short_tmpdir() as tmp:
        sock = str(tmp / "r.sock")
        # Redis configured but away: the daemon serves from its local store and says why.
        env = daemon_env(sock, REDIS_URL="redis://:hunter2-redis-pass@127.0.0.1:1/0")
        daemon = Daemon(sock, env).start()
        try:
            settings = Settings.from_env({"SIDECAR_SOCKET": sock, "SIDECAR_WEB_TOKEN": TOKEN,
                                          "REDIS_URL": env["REDIS_URL"]})  # fmt: skip
            app = create_app(settings)
            with TestClient(app, base_url=BASE, follow_redirects=False) as client:
                login(client)
                pages = [client.get(p).text for p in ("/", "/api/overview", "/list/queued",
                                                      "/login", "/list/failed")]  # fmt: skip
        finally:
            daemon.stop()
    for html in pages:
        assert TOKEN not in html
        assert "hunter2" not in html


def test_an_unreachable_daemon_is_a_503_page(web: Web, daemon: Daemon) -> None:
    client = web()
    daemon.stop()
    res = client.get("/")
    assert res.status_code == 503
    assert "unreachable" in res.text
    assert csrf_of is not None


def test_behind_a_tls_proxy_an_https_origin_of_the_same_host_may_act(
    web: Web, sidecar: Client
) -> None:
    """The proxy speaks http to the dashboard while the browser is on https: the origin's host
    and port must match, its scheme may differ, and the cookie is marked Secure."""
    queue_id = failed_request(sidecar)
    client = web(SIDECAR_WEB_TOKEN=TOKEN)
    browser = {"Origin": "https://127.0.0.1:8089"}
    res = client.post("/login", data={"token": TOKEN}, headers=browser)
    assert res.status_code == 303
    cookie = res.headers["set-cookie"]
    assert "secure" in cookie.lower()
    # What the browser sends back over https (httpx keeps a Secure cookie from plain http).
    browser["Cookie"] = cookie.partition(";")[0]
    csrf = csrf_of(client.get("/", headers={"Cookie": browser["Cookie"]}).text)
    form = {"csrf": csrf, "queue_id": queue_id, "confirm": "yes"}
    done = client.post("/actions/requeue", data=form, headers=browser)
    assert done.status_code == 303
    assert sidecar.status(queue_id).status == "queued"


def test_with_redis_the_pages_name_each_store_and_never_its_password() -> None:
    password = "redis-pass-9f2c71d0"
    with RedisServer(password=password) as server, short_tmpdir() as tmp:
        sock = str(tmp / "r.sock")
        url = f"unix://:{password}@{server.socket_path}"
        daemon = Daemon(sock, daemon_env(sock, REDIS_URL=url)).start()
        try:
            with Client(sock) as sidecar:
                queue_id = failed_request(sidecar, reason="in redis")
                settings = Settings.from_env({"SIDECAR_SOCKET": sock, "REDIS_URL": url,
                                              "SIDECAR_WEB_TOKEN": TOKEN})  # fmt: skip
                with TestClient(create_app(settings), base_url=BASE,
                                follow_redirects=False) as client:  # fmt: skip
                    login(client)
                    overview = client.get("/").text
                    listed = client.get("/list/failed").text
                    page = client.get(f"/requests/{queue_id}").text
                    others = [client.get(p).text for p in ("/api/overview", "/list/queued")]
        finally:
            daemon.stop()
    assert re.search(r'data-live="mode">[a-z_]+<', overview)
    assert "<th>redis</th>" in overview and "<th>local</th>" in overview
    assert queue_id in listed and "<td>redis</td>" in listed
    assert re.search(r"<th>store</th><td>redis</td>", page)
    for html in (overview, listed, page, *others):
        assert password not in html and TOKEN not in html
