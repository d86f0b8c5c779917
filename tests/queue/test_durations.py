"""Every duration is bounded at the protocol: finite, in range, with maxima every store can hold.

Issue 7, item 1: in Redis mode a `ttl_s` or `lease_s` of about 9.2e15 s or more overflowed in
the scripts and deleted acknowledged requests. Such values never reach a store now: the wire
types refuse them with `invalid_message` naming the field, and the settings refuse them at start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sidecar.client import Client
from sidecar.config import ConfigError, Settings
from sidecar.models import MAX_LEASE_S, MAX_RETENTION_S, MAX_TTL_S, MAX_WAIT_S
from tests.server.test_bad_input import Raw, error_of
from tests.support.daemon import Daemon, running_daemon, serve_expecting_refusal
from tests.support.redis_server import RedisServer

INF = float("inf")
NAN = float("nan")
# 1e16 s is where the Redis scripts' millisecond arithmetic went negative (issue 7, item 1).
HUGE = 1e16


@pytest.fixture(scope="module", params=["local", "redis"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    if request.param == "local":
        with running_daemon() as d:
            yield d
    else:
        with RedisServer() as server, running_daemon(REDIS_URL=server.url) as d:
            yield d


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[Raw]:
    conn = Raw(daemon.socket_path)
    yield conn
    conn.close()


def enqueue(queue_id: str, **item: object) -> dict[str, object]:
    return {"op": "enqueue", "id": 1, "items": [{"payload": "p", "queue_id": queue_id, **item}]}


BAD_REQUESTS = [
    ("ttl-inf", enqueue("t1", ttl_s=INF), "$.items[0].ttl_s"),
    ("ttl-nan", enqueue("t2", ttl_s=NAN), "$.items[0].ttl_s"),
    ("ttl-huge", enqueue("t3", ttl_s=HUGE), "$.items[0].ttl_s"),
    ("ttl-over-max", enqueue("t4", ttl_s=MAX_TTL_S * 1.001), "$.items[0].ttl_s"),
    ("ttl-zero", enqueue("t5", ttl_s=0.0), "$.items[0].ttl_s"),
    ("ttl-negative-zero", enqueue("t6", ttl_s=-0.0), "$.items[0].ttl_s"),
    ("lease-inf", {"op": "dequeue", "id": 1, "max_items": 5, "lease_s": INF}, "$.lease_s"),
    ("lease-huge", {"op": "dequeue", "id": 1, "max_items": 5, "lease_s": HUGE}, "$.lease_s"),
    ("lease-nan", {"op": "dequeue", "id": 1, "lease_s": NAN}, "$.lease_s"),
    ("lease-over-max", {"op": "dequeue", "id": 1, "lease_s": MAX_LEASE_S + 1}, "$.lease_s"),
    ("wait-inf", {"op": "dequeue", "id": 1, "wait_s": INF}, "$.wait_s"),
    ("wait-nan", {"op": "dequeue", "id": 1, "wait_s": NAN}, "$.wait_s"),
    ("wait-over-max", {"op": "dequeue", "id": 1, "wait_s": MAX_WAIT_S + 1}, "$.wait_s"),
    ("wait-negative", {"op": "dequeue", "id": 1, "wait_s": -1.0}, "$.wait_s"),
    (
        "extend-huge",
        {"op": "extend", "id": 1, "queue_id": "x", "lease_id": "y", "lease_s": HUGE},
        "$.lease_s",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "field"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_out_of_range_durations_are_refused_and_nothing_is_lost(
    daemon: Daemon, raw: Raw, body: dict[str, object], field: str
) -> None:
    """Five requests of other producers survive a dequeue with lease 1e16."""
    with Client(daemon.socket_path) as producer:
        kept = [producer.enqueue({"n": n}, priority=0).queue_id for n in range(5)]
        before = producer.stats()
        raw.msg(body)
        reply = raw.reply()
        assert error_of(reply) == (1, "invalid_message")
        assert field in reply["error"]["message"]
        assert "hello" in reply["error"]["message"]  # points at where the maxima are reported
        after = producer.stats()
        assert (after.accepted, after.queued, after.processing) == (
            before.accepted,
            before.queued,
            before.processing,
        )
        assert [producer.status(q).status for q in kept] == ["queued"] * 5
        for q in kept:
            producer.cancel(q)
        assert producer.stats().balanced


def test_the_maxima_themselves_are_accepted_and_kept(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        hello = c.hello()
        assert (hello.limits.max_ttl_s, hello.limits.max_lease_s) == (MAX_TTL_S, MAX_LEASE_S)
        queued = c.enqueue("edge", ttl_s=MAX_TTL_S, priority=0)
        assert queued.expires_at - MAX_TTL_S == pytest.approx(c.status(queued.queue_id).created_at)
        [job] = c.dequeue(max_items=1, lease_s=MAX_LEASE_S)
        assert job.queue_id == queued.queue_id
        assert job.lease_expires_at > job.created_at + MAX_LEASE_S - 60
        info = c.extend(job.queue_id, job.lease_id, lease_s=MAX_LEASE_S)
        assert info.status == "processing"
        assert c.status(job.queue_id).status == "processing"  # not deleted by its own expiry
        assert c.complete(job.queue_id, job.lease_id).status == "completed"


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("QUEUE_REQUEST_TTL_HOURS", str(MAX_TTL_S / 3600 + 1), "<= 720"),
        ("QUEUE_REQUEST_TTL_HOURS", "inf", "<= 720"),
        ("QUEUE_LEASE_SECONDS", str(MAX_LEASE_S + 1), "<= 86400"),
        ("QUEUE_LEASE_SECONDS", "1e16", "<= 86400"),
        ("SIDECAR_MAX_WAIT_SECONDS", str(MAX_WAIT_S + 1), "<= 86400"),
        ("QUEUE_RETENTION_HOURS", str(MAX_RETENTION_S / 3600 + 1), "<= 8760"),
    ],
)
def test_settings_past_the_maxima_are_refused(name: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert f"{name}={value!r} is invalid" in str(info.value)
    assert accepted in str(info.value)


def test_settings_at_the_maxima_are_accepted() -> None:
    s = Settings.from_env(
        {
            "QUEUE_REQUEST_TTL_HOURS": str(MAX_TTL_S / 3600),
            "QUEUE_LEASE_SECONDS": str(MAX_LEASE_S),
            "SIDECAR_MAX_WAIT_SECONDS": str(MAX_WAIT_S),
            "QUEUE_RETENTION_HOURS": str(MAX_RETENTION_S / 3600),
        }
    )
    assert (s.request_ttl_s, s.queue_lease_s, s.max_wait_s) == (MAX_TTL_S, MAX_LEASE_S, MAX_WAIT_S)


@pytest.mark.slow
def test_daemon_refuses_to_start_with_a_lease_past_the_maximum() -> None:
    env = dict(os.environ, QUEUE_LEASE_SECONDS="1e16", SIDECAR_SOCKET="/tmp/never-bound-2.sock")
    proc = serve_expecting_refusal(env)
    assert proc.returncode == 2
    assert "QUEUE_LEASE_SECONDS='1e16' is invalid" in proc.stderr
    assert not os.path.exists("/tmp/never-bound-2.sock")


@pytest.mark.parametrize(
    "delay_s", [-1.0, INF, NAN, HUGE, MAX_TTL_S * 1.001], ids=["neg", "inf", "nan", "huge", "over"]
)
def test_a_bad_fail_delay_is_refused_and_the_lease_stays(
    daemon: Daemon, raw: Raw, delay_s: float
) -> None:
    with Client(daemon.socket_path) as worker:
        qid = worker.enqueue({"n": 1}).queue_id
        [job] = worker.dequeue(max_items=1)
        raw.msg({"op": "fail", "id": 1, "queue_id": qid, "lease_id": job.lease_id,
                 "reason": "r", "delay_s": delay_s})  # fmt: skip
        reply = raw.reply()
        assert error_of(reply) == (1, "invalid_message")
        assert "$.delay_s" in reply["error"]["message"]
        # A rejected command never changes state: the lease still settles, the books balance.
        assert worker.status(qid).status == "processing"
        held = worker.fail(qid, job.lease_id, "later", delay_s=MAX_TTL_S)
        assert held.status == "queued"
        assert worker.dequeue(max_items=1) == []
        worker.cancel(qid)
        assert worker.stats().balanced
