"""A stateful property test: random sequences of every op, checked against a plain model.

Hypothesis drives the ops layer (`Ops`, the same code the daemon runs for each request) over
each store: the local queue, a RedisQueue on a real redis-server, and a ResilientQueue whose
Redis (fakeredis, its fault seam) goes down and comes back mid-run. After every step:
every acknowledged request is findable until its retention ends, nothing answers
`internal_error` or raises an unexpected exception, and the books balance.

Bounded in CI. A long campaign (any failure prints the steps that reproduce it):

    STATEFUL_EXAMPLES=2000 STATEFUL_STEPS=80 STATEFUL_RANDOM=1 .venv/bin/python -m pytest -q \\
        tests/queue/test_stateful.py
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import fakeredis
import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sidecar.config import Settings
from sidecar.errors import (
    BackendUnavailable,
    InvalidState,
    LeaseMismatch,
    NotFound,
    SidecarError,
)
from sidecar.protocol import (
    Cancel,
    Complete,
    Dequeue,
    DequeueResult,
    Enqueue,
    EnqueueItem,
    EnqueueResult,
    Extend,
    Fail,
    RequestInfo,
    Stats,
    StatsResult,
    Status,
    Take,
    TakeResult,
)
from sidecar.queue.base import QueueStore
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient import ResilientQueue
from sidecar.server.ops import Ops
from tests.support.helpers import FakeClock
from tests.support.redis_server import RedisServer, redis_queue_for

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

T = TypeVar("T")

EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "25"))
STEPS = int(os.environ.get("STATEFUL_STEPS", "40"))
# Both a retention long enough to read terminal records back and none at all: with 0 a Redis
# settle once raised KeyError b'queue_id' after purging the hash it was about to answer with.
RETENTIONS_S = (600.0, 0.0)
DEFAULT_LEASE_S = 30.0
# A time within this of a deadline (TTL, lease, retention) may fall either side of it.
EDGE_S = 0.01
# How long ResilientQueue may take to notice Redis is back and move the backlog (real time).
RECOVERY_S = 10.0

QUEUE_IDS = st.sampled_from([f"q{i}" for i in range(8)])
# Mostly named ids (idempotency, collisions), sometimes a generated one.
ITEM_IDS = st.sampled_from([None, *(f"q{i}" for i in range(8))])
TTLS = st.sampled_from([None, 5.0, 40.0, 1000.0])
LEASES = st.sampled_from([None, 3.0, 50.0])
ADVANCES = st.sampled_from([0.5, 4.25, 31.0, 101.0, 650.0])


@dataclass
class Model:
    """What the contract says about one acknowledged request."""

    status: str
    priority: int
    order: int  # arrival order, for the priority-then-FIFO rule
    attempts: int
    max_attempts: int
    expires_at: float
    lease_id: str | None = None
    lease_expires_at: float | None = None
    finished_at: float | None = None  # earliest moment it can have become terminal
    not_before: float | None = None  # a fail with delay_s holds it back until then

    def settle_due(self, now: float) -> None:
        """Apply the lapses and expiry that are due at now (protocol.md section 6)."""
        lapse = self.lease_expires_at
        if self.status == "processing" and lapse is not None and now >= lapse:
            self.lease_id = self.lease_expires_at = self.not_before = None
            if lapse >= self.expires_at or now >= self.expires_at:
                self.finish("expired", max(lapse, self.expires_at))
            elif self.attempts >= self.max_attempts:
                self.finish("failed", lapse)
            else:
                self.status = "queued"
        if self.status == "queued" and now >= self.expires_at:
            self.finish("expired", self.expires_at)

    def finish(self, status: str, at: float) -> None:
        self.status, self.finished_at = status, at
        self.lease_id = self.lease_expires_at = None

    def near_edge(self, now: float, retention_s: float) -> bool:
        """Whether now is so close to one of its deadlines that either side is correct."""
        edges = [self.expires_at, self.lease_expires_at, self.not_before]
        if self.finished_at is not None:
            edges.append(self.finished_at + retention_s)
        return any(e is not None and abs(now - e) < EDGE_S for e in edges)

    def surely_held(self, now: float, retention_s: float) -> bool:
        """Retention has surely not ended (the store may apply a lapse later than it was due)."""
        return self.finished_at is None or now < self.finished_at + retention_s - EDGE_S


class QueueMachine(RuleBasedStateMachine):
    """One store behind Ops, a fake clock, and the model; subclasses pick the store."""

    store_kind: ClassVar[str] = "local"
    redis_url: ClassVar[str | None] = None
    retention_s: ClassVar[float] = RETENTIONS_S[0]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.model: dict[str, Model] = {}
        self.arrivals = 0
        self.redis_down = False
        self.fake_server: Any = None
        self.queue = self.build()
        self.ops = Ops(
            Settings(queue_lease_s=DEFAULT_LEASE_S, max_batch=10), self.queue, clock=self.clock
        )
        self.run(self.queue.start())

    # -- plumbing ---------------------------------------------------------------------------

    def build(self) -> QueueStore:
        local = LocalQueue(
            max_items=10_000,
            max_bytes=10**9,
            high_watermark=0.8,
            low_watermark=0.6,
            retention_s=self.retention_s,
            clock=self.clock,
        )
        if self.store_kind == "local":
            return local
        if self.store_kind == "redis":
            assert self.redis_url is not None
            # A fresh key prefix per example: the examples share one redis-server.
            prefix = f"sm{time.monotonic_ns()}"
            return redis_queue_for(
                self.redis_url, self.clock, retention_s=self.retention_s, prefix=prefix
            )
        self.fake_server = fakeredis.FakeServer()
        redis = RedisQueue(
            fakeredis.FakeAsyncRedis(server=self.fake_server),
            retention_s=self.retention_s,
            clock=self.clock,
            check_eviction_policy=False,
            sweep_interval_s=None,
        )
        return ResilientQueue(redis, local, probe_initial_s=0.001, probe_max_s=0.01)

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(aw, 30))

    def call(self, req: Any) -> Any:
        """One request through Ops: its result, or the SidecarError it raised (never another)."""
        try:
            result = self.run(self.ops.handle(req))
            event(f"{type(req).__name__.lower()}: ok")  # --hypothesis-show-statistics
            return result
        except SidecarError as err:
            event(f"{type(req).__name__.lower()}: {err.code}")
            assert err.code != "internal_error", err
            if isinstance(err, BackendUnavailable):
                assert self.redis_down, f"backend_unavailable while Redis is up: {err}"
            return err

    def teardown(self) -> None:
        try:
            self.run(self.queue.close())
        finally:
            self.loop.close()

    def live(self, queue_id: str) -> Model | None:
        rec = self.model.get(queue_id)
        if rec is None:
            return None
        rec.settle_due(self.clock.now)
        return rec

    def uncertain(self, queue_id: str) -> bool:
        rec = self.model.get(queue_id)
        return rec is not None and (
            rec.near_edge(self.clock.now, self.retention_s)
            or not rec.surely_held(self.clock.now, self.retention_s)
        )

    def adopt(self, queue_id: str, info: RequestInfo) -> None:
        """Take the store's word where the model cannot decide (a deadline edge, a failover)."""
        rec = self.model.get(queue_id)
        if rec is None:
            return
        rec.status, rec.attempts = info.status, info.attempts
        rec.lease_expires_at = info.lease_expires_at
        if info.status in ("completed", "failed", "expired") and rec.finished_at is None:
            rec.finished_at = info.updated_at
        if info.status != "processing":
            rec.lease_id = None

    # -- rules ------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        assert self.call(Stats(id=0)).balanced

    @rule(
        items=st.lists(
            st.tuples(ITEM_IDS, st.integers(0, 9), TTLS, st.integers(1, 3)),
            min_size=1,
            max_size=4,
        )
    )
    def enqueue(self, items: list[tuple[str | None, int, float | None, int]]) -> None:
        if self.redis_down:
            # While Redis is away a named id may also sit in Redis: two copies are reconciled
            # at the move (ResilientQueue), which this model does not follow. Fresh ids only.
            items = [(None, *rest) for _, *rest in items]  # type: ignore[misc]
        wire = [
            EnqueueItem(
                payload=msgspec.Raw(msgspec.msgpack.encode({"n": n})),
                priority=priority,
                ttl_s=ttl,
                queue_id=qid,
                max_attempts=attempts,
            )
            for n, (qid, priority, ttl, attempts) in enumerate(items)
        ]
        result = self.call(Enqueue(id=1, items=wire))
        assert isinstance(result, EnqueueResult), result  # no queue_full: limits are far
        now = self.clock.now
        for sent, got in zip(items, result.items, strict=True):
            _, priority, ttl, attempts = sent
            rec = self.live(got.queue_id)
            if got.created:
                assert rec is None or not rec.surely_held(now, self.retention_s), (got, rec)
                self.arrivals += 1
                self.model[got.queue_id] = Model(
                    status="queued",
                    priority=priority,
                    order=self.arrivals,
                    attempts=0,
                    max_attempts=attempts,
                    expires_at=now + (ttl or self.ops.settings.request_ttl_s),
                )
            else:
                assert rec is not None, got
                assert got.priority == rec.priority

    @rule(max_items=st.integers(1, 12), lease_s=LEASES)
    def dequeue(self, max_items: int, lease_s: float | None) -> None:
        now = self.clock.now
        for qid in list(self.model):
            self.live(qid)
        result = self.call(Dequeue(id=2, max_items=max_items, lease_s=lease_s))
        if isinstance(result, BackendUnavailable):
            return
        assert isinstance(result, DequeueResult), result
        queued = sorted(
            (r.priority, r.order, qid)
            for qid, r in self.model.items()
            if r.status == "queued" and (r.not_before is None or r.not_before <= now)
        )
        got = [j.queue_id for j in result.items]
        assert len(set(got)) == len(got)
        exact = not self.redis_down and self.store_kind != "resilient"
        edgy = any(self.model[q].near_edge(now, self.retention_s) for q in self.model)
        if exact and not edgy:
            assert got == [qid for _, _, qid in queued[: min(max_items, 10)]]
        for job in result.items:
            rec = self.model.get(job.queue_id)
            if rec is None:
                continue
            assert rec.status == "queued" or edgy or self.redis_down, (job, rec)
            held = rec.not_before is not None and now < rec.not_before
            assert not held or edgy or self.redis_down, ("handed out early", job, rec)
            rec.status, rec.attempts, rec.not_before = "processing", job.attempts, None
            rec.lease_id, rec.lease_expires_at = job.lease_id, job.lease_expires_at
            assert job.lease_expires_at == pytest.approx(now + (lease_s or DEFAULT_LEASE_S))

    def pick_lease(self, data: st.DataObject) -> tuple[str, str]:
        leased = sorted((q, r.lease_id) for q, r in self.model.items() if r.lease_id)
        use_real = data.draw(st.booleans())
        if leased and use_real:
            return data.draw(st.sampled_from(leased))
        return data.draw(QUEUE_IDS), data.draw(st.sampled_from(["0123456789abcdef", "nope"]))

    def check_settle(self, qid: str, lease_id: str, result: Any, ok_status: set[str]) -> None:
        """The outcome of extend/complete/fail against what the model allows."""
        rec = self.live(qid)
        if isinstance(result, BackendUnavailable):
            return
        if self.uncertain(qid) or (self.redis_down and rec is None):
            if isinstance(result, RequestInfo):
                self.adopt(qid, result)
            return
        if rec is None:
            assert isinstance(result, NotFound), (qid, result)
        elif rec.status == "processing" and rec.lease_id == lease_id:
            assert isinstance(result, RequestInfo), (qid, rec, result)
            assert result.status in ok_status, (result, rec)
        elif isinstance(result, RequestInfo):
            # Only a repeated complete with its own lease may succeed off `processing`.
            assert rec.status == "completed" and result.status == "completed", (rec, result)
        else:
            assert isinstance(result, InvalidState | LeaseMismatch), (qid, rec, result)

    @rule(data=st.data(), lease_s=LEASES)
    def extend(self, data: st.DataObject, lease_s: float | None) -> None:
        qid, lease_id = self.pick_lease(data)
        result = self.call(Extend(id=3, queue_id=qid, lease_id=lease_id, lease_s=lease_s))
        self.check_settle(qid, lease_id, result, {"processing"})
        rec = self.model.get(qid)
        if isinstance(result, RequestInfo) and rec is not None and result.status == "processing":
            rec.lease_expires_at = result.lease_expires_at
            assert result.lease_expires_at == pytest.approx(
                self.clock.now + (lease_s or DEFAULT_LEASE_S)
            )

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        qid, lease_id = self.pick_lease(data)
        result = self.call(Complete(id=4, queue_id=qid, lease_id=lease_id))
        self.check_settle(qid, lease_id, result, {"completed"})
        rec = self.model.get(qid)
        if isinstance(result, RequestInfo) and rec is not None and rec.status != "completed":
            rec.finish("completed", self.clock.now)
            rec.lease_id = lease_id  # a repeat with this lease answers completed again

    @rule(
        data=st.data(),
        retry=st.booleans(),
        reason=st.sampled_from(["", "503"]),
        delay_s=st.sampled_from([0.0, 0.0, 3.0, 60.0]),
        counts=st.booleans(),
    )
    def fail(
        self, data: st.DataObject, retry: bool, reason: str, delay_s: float, counts: bool
    ) -> None:
        qid, lease_id = self.pick_lease(data)
        rec = self.live(qid)
        sure = rec is not None and not self.uncertain(qid) and not self.redis_down
        req = Fail(id=5, queue_id=qid, lease_id=lease_id, reason=reason, retry=retry,
                   delay_s=delay_s, counts=counts)  # fmt: skip
        result = self.call(req)
        self.check_settle(qid, lease_id, result, {"queued", "failed", "expired"})
        if not isinstance(result, RequestInfo) or rec is None:
            return
        if sure and retry and not counts:
            # Not counted: never exhausted (the TTL alone ends it), and the delivery it ended
            # is given back.
            assert result.status != "failed", (rec, result)
            assert result.attempts == rec.attempts - 1, (rec, result)
        elif sure:
            assert result.attempts == rec.attempts, (rec, result)
        rec.attempts = result.attempts
        if result.status == "queued":
            assert retry and result.reason == (reason or "unspecified"), result
            rec.status, rec.lease_id, rec.lease_expires_at = "queued", None, None
            rec.not_before = self.clock.now + delay_s if delay_s else None
        else:
            rec.finish(result.status, self.clock.now)
            if result.status == "failed" and not retry:
                assert result.reason == (reason or "unspecified"), result

    @rule(qid=QUEUE_IDS)
    def cancel(self, qid: str) -> None:
        rec = self.live(qid)
        result = self.call(Cancel(id=6, queue_id=qid))
        if isinstance(result, BackendUnavailable) or self.uncertain(qid):
            if isinstance(result, RequestInfo):
                self.adopt(qid, result)
            return
        if rec is None:
            assert isinstance(result, NotFound) or self.redis_down, result
            return
        if rec.status == "queued":
            assert isinstance(result, RequestInfo) or self.redis_down, (rec, result)
            if isinstance(result, RequestInfo):
                assert (result.status, result.reason) == ("failed", "cancelled")
                rec.finish("failed", self.clock.now)
        else:
            assert isinstance(result, InvalidState), (rec, result)

    @rule(qid=QUEUE_IDS, lease_s=LEASES)
    def take(self, qid: str, lease_s: float | None) -> None:
        """Lease one request by its id: it if queued (held back or not), else nil."""
        now = self.clock.now
        rec = self.live(qid)
        result = self.call(Take(id=8, queue_id=qid, queue="requests", lease_s=lease_s))
        if isinstance(result, BackendUnavailable):
            return
        assert isinstance(result, TakeResult), result
        job = result.item
        event(f"take: {'leased' if job is not None else 'nil'}")
        if rec is None or self.uncertain(qid) or self.redis_down:
            if job is not None and rec is not None:  # take the store's word
                rec.status, rec.attempts, rec.not_before = "processing", job.attempts, None
                rec.lease_id, rec.lease_expires_at = job.lease_id, job.lease_expires_at
            assert job is None or rec is not None or self.redis_down, (qid, job)
            return
        if rec.status != "queued":
            assert job is None, (rec, job)
            return
        assert job is not None and job.queue_id == qid, (rec, result)
        assert job.attempts == rec.attempts + 1, (rec, job)
        assert job.lease_expires_at == pytest.approx(now + (lease_s or DEFAULT_LEASE_S))
        rec.status, rec.attempts, rec.not_before = "processing", job.attempts, None
        rec.lease_id, rec.lease_expires_at = job.lease_id, job.lease_expires_at

    @rule(seconds=ADVANCES)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.store_kind == "resilient" and not self.redis_down)
    @rule()
    def redis_goes_down(self) -> None:
        event("redis down")
        self.fake_server.connected = False
        self.redis_down = True

    @precondition(lambda self: self.redis_down)
    @rule()
    def redis_comes_back(self) -> None:
        self.fake_server.connected = True
        queue = self.queue
        assert isinstance(queue, ResilientQueue)

        async def recovered() -> None:
            # Waits on the manager's change events for "Redis serves and the backlog moved".
            try:
                await queue.wait_until(queue.backlog_moved, RECOVERY_S)
            except TimeoutError:
                raise AssertionError("Redis did not take the local backlog back") from None

        self.run(recovered())
        self.redis_down = False

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def acknowledged_requests_are_findable(self) -> None:
        for qid in sorted(self.model):
            rec = self.live(qid)
            assert rec is not None
            result = self.call(Status(id=7, queue_id=qid))
            if isinstance(result, BackendUnavailable):
                continue
            if self.uncertain(qid):
                if isinstance(result, RequestInfo):
                    self.adopt(qid, result)
                elif not rec.surely_held(self.clock.now, self.retention_s):
                    del self.model[qid]  # its retention ended; the store agrees it is gone
                continue
            assert isinstance(result, RequestInfo), (qid, rec, result)
            if not self.redis_down:
                assert result.status == rec.status, (qid, rec, result)

    @invariant()
    def books_balance(self) -> None:
        stats = self.call(Stats(id=8))
        assert isinstance(stats, StatsResult)
        assert stats.balanced, stats
        for part in stats.stores.values():
            assert part.balanced, part


def settings_for_ci() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=os.environ.get("STATEFUL_RANDOM") is None,
        database=None,
    )


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


# A campaign longer than the CI run has no time limit (0); the CI run a generous one.
@pytest.mark.timeout(600 if EXAMPLES * STEPS <= 25 * 40 else 0)
@pytest.mark.parametrize("retention_s", RETENTIONS_S)
@pytest.mark.parametrize("kind", ["local", "redis", "resilient"])
def test_random_sequences_keep_the_contract(
    kind: str, retention_s: float, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    attrs = {"store_kind": kind, "redis_url": url, "retention_s": retention_s}
    machine = type(f"{kind.title()}Machine", (QueueMachine,), attrs)
    run_state_machine_as_test(machine, settings=settings_for_ci())
