"""Prometheus metrics of one daemon: counted where events happen, queue gauges read at scrape.

Two kinds of series, labelled so that a sum over hosts is right:

- this daemon's own work (requests, errors, connections, its failovers, the expiries, retries
  and failures its own store calls performed, first-lease waits, fsyncs): a sum over hosts is
  the total (`sum(...)`);
- the queue's state and books (`sidecar_queue_*`), with `scope="host"` for the local store
  (each host has its own) and `scope="shared"` for the Redis queue, which every host sharing the
  Redis reports alike: take one host's value (`max without (instance) (...)`), never the sum.

The queue gauges are refreshed by `render()` from the serving store (its `stats()`, its
per-priority counts and its failover counters), so they cost nothing on the request path. Each
daemon has its own CollectorRegistry.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from sidecar.errors import BackendUnavailable
from sidecar.models import FailoverCounters, QueueStats, ServingMode

# The `_created` series double the exposition and no dashboard here reads them. The switch is
# process-wide in prometheus_client; this process is the daemon, whose only registry is ours.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

log = structlog.get_logger("sidecar.metrics")

# The exposition's content type: text format 0.0.4, which every Prometheus 2.x scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# A scrape waits this long for the stores' numbers; a frozen Redis must not hold the scraper.
REFRESH_TIMEOUT_S = 5.0
# Label values come from the server and the stores, never from clients, but a cap keeps a bug
# from growing the registry without bound: past it, new values count under "other".
MAX_LABEL_VALUES = 64
OTHER = "other"

SCOPES = {"local": "host", "redis": "shared"}
# A single store's failover counters: it has no failover.
NO_FAILOVER = FailoverCounters(
    failovers=0, recoveries=0, degraded_s=0.0, data_lost=0, backlog=0, moved=0
)

# Local round trips take tens of microseconds; a dequeue's long poll up to SIDECAR_MAX_WAIT_S.
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # fmt: skip
# From a request picked up at once to one that waited hours through an outage (TTL 4 h).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                7200.0, 14400.0)  # fmt: skip
# An SSD syncs in well under a millisecond; a struggling disk takes a second.
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5)  # fmt: skip


class MeteredStore(Protocol):
    """What render() reads from the serving store (every sidecar.queue.base.QueueStore has it)."""

    @property
    def store_names(self) -> tuple[str, ...]: ...

    async def stats(self) -> QueueStats: ...

    async def queued_by_priority(self) -> dict[str, dict[int, int]]: ...

    def failover_counters(self) -> FailoverCounters | None: ...


@dataclass
class _Snapshot:
    """What one refresh read from the stores."""

    stores: dict[str, QueueStats] = field(default_factory=dict)
    ready: dict[str, dict[int, int]] = field(default_factory=dict)
    mode: str = ServingMode.LOCAL_ONLY
    high_watermark: float = 0.0
    low_watermark: float = 0.0
    failover: FailoverCounters = NO_FAILOVER
    # The outbox queues' books by queue name (results waiting, apart from requests).
    outbox: dict[str, QueueStats] = field(default_factory=dict)


class _QueueCollector:
    """Yields the gauges and books of the last snapshot (prometheus_client's custom collector)."""

    def __init__(self) -> None:
        self.snapshot: _Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        yield from _queue_families(snap)
        yield from _local_families(snap)
        yield from _failover_families(snap)
        yield from _outbox_families(snap)


def _outbox_families(snap: _Snapshot) -> Iterator[Metric]:
    items = GaugeMetricFamily(
        "sidecar_outbox_items",
        "Results waiting for their caller in each outbox queue (deliveries, pickups), by status.",
        labels=["queue", "status"],
    )
    for name, st in sorted(snap.outbox.items()):
        items.add_metric([name, "queued"], st.queued)
        items.add_metric([name, "processing"], st.processing)
    yield items


def _queue_families(snap: _Snapshot) -> Iterator[Metric]:
    labels = ["scope", "store"]
    depth = GaugeMetricFamily("sidecar_queue_requests", "Requests held, by store and status.",
                              labels=[*labels, "status"])  # fmt: skip
    ready = GaugeMetricFamily(
        "sidecar_queue_ready_requests",
        "Queued requests waiting in line (not delayed, not being moved), by priority.",
        labels=[*labels, "priority"],
    )
    oldest = GaugeMetricFamily(
        "sidecar_queue_oldest_queued_age_seconds",
        "Age of the oldest request waiting in line (0 when none waits).",
        labels=labels,
    )
    held = GaugeMetricFamily("sidecar_queue_held_bytes",
                             "Payload bytes of queued and processing requests.", labels=labels)
    retained = GaugeMetricFamily("sidecar_queue_retained_requests",
                                 "Finished requests still readable by queue_id.", labels=labels)
    dead = GaugeMetricFamily("sidecar_dead_letters", "Dead letters held (failed for good or "
                             "expired unprocessed, payload kept).", labels=labels)
    dead_bytes = GaugeMetricFamily("sidecar_dead_letters_bytes",
                                   "Payload bytes of the dead letters held.", labels=labels)
    dead_dropped = CounterMetricFamily(
        "sidecar_dead_letters_dropped", "Dead letters dropped before their retention ended "
        "because QUEUE_MAX_DEAD was reached.", labels=labels)
    books = CounterMetricFamily(
        "sidecar_queue_events",
        "The store's books: requests accepted, completed, failed, expired, moved out.",
        labels=[*labels, "event"],
    )  # fmt: skip
    for name, st in snap.stores.items():
        key = [SCOPES.get(name, "host"), name]
        depth.add_metric([*key, "queued"], st.queued)
        depth.add_metric([*key, "processing"], st.processing)
        for priority, count in sorted(snap.ready.get(name, {}).items()):
            ready.add_metric([*key, str(priority)], count)
        oldest.add_metric(key, st.oldest_queued_age_s or 0.0)
        held.add_metric(key, st.bytes)
        retained.add_metric(key, st.retained)
        dead.add_metric(key, st.dead_letters)
        dead_bytes.add_metric(key, st.dead_letters_bytes)
        dead_dropped.add_metric(key, st.dead_letters_dropped)
        for event in ("accepted", "completed", "failed", "expired", "moved_out"):
            books.add_metric([*key, event], getattr(st, event))
    yield from (depth, ready, oldest, held, retained, dead, dead_bytes, dead_dropped, books)


def _local_families(snap: _Snapshot) -> Iterator[Metric]:
    local = snap.stores.get("local")
    if local is None:
        return
    yield GaugeMetricFamily(
        "sidecar_local_queue_usage_ratio",
        "Local queue usage: the larger of items/QUEUE_MAX_SIZE and bytes/QUEUE_MAX_MEMORY_MB.",
        value=local.usage,
    )
    marks = GaugeMetricFamily(
        "sidecar_local_queue_watermark_ratio",
        "The breaker opens at the high watermark and closes at the low one.",
        labels=["level"],
    )
    marks.add_metric(["high"], snap.high_watermark)
    marks.add_metric(["low"], snap.low_watermark)
    yield marks
    yield GaugeMetricFamily("sidecar_local_queue_breaker_open",
                            "1 while the local queue refuses new requests (queue_full).",
                            value=float(local.breaker_open))  # fmt: skip
    yield GaugeMetricFamily("sidecar_local_queue_limit_requests", "QUEUE_MAX_SIZE.",
                            value=local.max_items or 0)  # fmt: skip
    yield GaugeMetricFamily("sidecar_local_queue_limit_bytes", "QUEUE_MAX_MEMORY_MB in bytes.",
                            value=local.max_bytes or 0)  # fmt: skip


def _failover_families(snap: _Snapshot) -> Iterator[Metric]:
    mode = GaugeMetricFamily("sidecar_mode", "1 for the mode this daemon serves in.",
                             labels=["mode"])  # fmt: skip
    for name in ServingMode:
        mode.add_metric([name], float(name == snap.mode))
    yield mode
    counters = snap.failover
    yield CounterMetricFamily("sidecar_failovers", "Times this daemon fell back to the local "
                              "queue because Redis could not serve.", value=counters.failovers)
    yield CounterMetricFamily("sidecar_recoveries", "Times Redis served again after a failover.",
                              value=counters.recoveries)  # fmt: skip
    yield CounterMetricFamily("sidecar_degraded_seconds", "Seconds this daemon served from the "
                              "local fallback since it started.", value=counters.degraded_s)
    yield CounterMetricFamily("sidecar_redis_data_loss_detections",
                              "Times Redis came back without its data (generation marker).",
                              value=counters.data_lost)  # fmt: skip
    yield GaugeMetricFamily("sidecar_handover_backlog_requests",
                            "Local requests still to move to Redis.", value=counters.backlog)
    yield CounterMetricFamily("sidecar_handover_moved", "Requests moved from the local queue "
                              "to Redis after an outage.", value=counters.moved)


class LoopHistogram:
    """One histogram written only by the event loop's thread: no lock, bisect for the bucket.

    prometheus_client's Histogram.observe takes a lock twice and scans its buckets in Python:
    about 5 us a call here, against 0.5 us for this, on every request (measured: bench/).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's `le`.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class LoopHistograms:
    """A histogram family with one label, of LoopHistogram children (a custom collector)."""

    def __init__(self, name: str, doc: str, label: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.label, self.bounds = name, doc, label, bounds
        self.children: dict[str, LoopHistogram] = {}

    def child(self, value: str) -> LoopHistogram:
        found = self.children.get(value)
        if found is None:
            found = self.children[value] = LoopHistogram(self.bounds)
        return found

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, h in self.children.items():
            cumulative = list(itertools.accumulate(h.counts))
            les = [repr(float(b)) for b in h.bounds] + ["+Inf"]
            family.add_metric([value], list(zip(les, cumulative, strict=True)), h.total)
        yield family


class DaemonMetrics:
    """The daemon's registry; the server and the stores report to it, render() exposes it."""

    def __init__(self, *, version: str, high_watermark: float, low_watermark: float) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._queue: MeteredStore | None = None
        self._outbox: Mapping[str, MeteredStore] = {}
        self._marks = (high_watermark, low_watermark)
        self._view = _QueueCollector()
        self.registry.register(self._view)
        reg = self.registry
        Gauge("sidecar_build_info", "The running version.", ["version"],
              registry=reg).labels(version).set(1)  # fmt: skip
        self._duration = LoopHistograms(
            "sidecar_request_duration_seconds",
            "Requests handled, by op: from decoding the frame to the reply (its _count counts "
            "every request, errors included).",
            "op", REQUEST_BUCKETS,
        )  # fmt: skip
        reg.register(self._duration)
        self._errors = Counter("sidecar_request_errors", "Error replies, by op and code.",
                               ["op", "code"], registry=reg)  # fmt: skip
        self._open = Gauge("sidecar_connections_open", "Client connections open now.",
                           registry=reg)  # fmt: skip
        self._opened = Counter("sidecar_connections_opened", "Client connections accepted.",
                               registry=reg)  # fmt: skip
        self._refused = Counter("sidecar_connections_refused", "Client connections refused, "
                                "by reason.", ["reason"], registry=reg)  # fmt: skip
        self._expired = Counter("sidecar_expiries", "Requests this daemon's store calls expired, "
                                "by store and reason.", ["store", "reason"], registry=reg)
        self._retried = Counter("sidecar_retries", "Requests queued again, by store and reason "
                                "(worker_retry, lease_expired).", ["store", "reason"],
                                registry=reg)  # fmt: skip
        self._failed = Counter("sidecar_failures", "Requests ended failed, by store and reason "
                               "(cancelled, attempts_exhausted, worker_failed).",
                               ["store", "reason"], registry=reg)  # fmt: skip
        self._rejected = Counter("sidecar_rejections", "Requests refused for capacity "
                                 "(queue_full), by store and reason.", ["store", "reason"],
                                 registry=reg)  # fmt: skip
        self._wait_family = LoopHistograms(
            "sidecar_first_lease_wait_seconds",
            "Time from enqueue to the first lease, by the store that handed it out.",
            "store", WAIT_BUCKETS,
        )  # fmt: skip
        reg.register(self._wait_family)
        self._wait: dict[str, LoopHistogram] = {}
        self._fsync = Histogram("sidecar_journal_fsync_duration_seconds", "Local journal syncs "
                                "(one per loop pass that changed the store).",
                                buckets=FSYNC_BUCKETS, registry=reg)  # fmt: skip
        self._limiter = Counter("sidecar_limiter_decisions", "Limiter acquires answered, by "
                                "result (granted, probe: granted as the half-open probe, "
                                "waited: told to ask again).", ["result"], registry=reg)
        self._scrape_errors = Counter("sidecar_metrics_refresh_errors", "Scrapes whose read of "
                                      "the stores failed (queue gauges missing).", registry=reg)
        # Pre-bound children: the request path does one dict lookup and one observe.
        self._by_op: dict[str, LoopHistogram] = {}
        self._bound: dict[tuple[object, ...], Counter] = {}

    def bind(self, queue: MeteredStore, outbox: Mapping[str, MeteredStore] | None = None) -> None:
        """The serving store render() reads (after it is built with this object as its hooks),
        and the outbox queues' stores by name, counted apart (sidecar_outbox_items)."""
        self._queue = queue
        self._outbox = outbox or {}
        self._wait = {name: self._wait_family.child(name) for name in queue.store_names}

    # -- the server's calls (per request and per connection) -------------------------------------

    def request_done(self, op: str, seconds: float, error_code: str | None) -> None:
        """One request answered, after `seconds`; error_code when the reply was an error."""
        h = self._by_op.get(op)
        if h is None:
            h = self._bind_op(op)
        # LoopHistogram.observe, inlined: this runs once per request.
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.total += seconds
        if error_code is not None:
            self._child(self._errors, op, error_code).inc()

    def connection_opened(self) -> None:
        self._open.inc()
        self._opened.inc()

    def connection_closed(self) -> None:
        self._open.dec()

    def connection_refused(self, reason: str) -> None:
        self._child(self._refused, reason).inc()

    # -- the stores' hooks (sidecar.queue.hooks.StoreHooks) --------------------------------------

    def expired(self, store: str, reason: str, count: int) -> None:
        self._child(self._expired, store, reason).inc(count)

    def retried(self, store: str, reason: str, count: int) -> None:
        self._child(self._retried, store, reason).inc(count)

    def failed(self, store: str, reason: str, count: int) -> None:
        self._child(self._failed, store, reason).inc(count)

    def first_leased(self, store: str, wait_s: float) -> None:
        child = self._wait.get(store)
        if child is not None:
            child.observe(max(0.0, wait_s))

    def rejected(self, store: str, reason: str, count: int) -> None:
        self._child(self._rejected, store, reason).inc(count)

    # -- the limiter's hooks (sidecar.queue.limit.LimiterHooks) ----------------------------------

    def limit_decided(self, result: str) -> None:
        self._child(self._limiter, result).inc()

    def timed_sync(self, sync: Callable[[int], None]) -> Callable[[int], None]:
        """Wrap the journal's sync so each one is timed (it runs in an executor thread)."""
        observe = self._fsync.observe

        def timed(fd: int) -> None:
            began = time.perf_counter()
            try:
                sync(fd)
            finally:
                observe(time.perf_counter() - began)

        return timed

    # -- exposition ------------------------------------------------------------------------------

    async def render(self) -> bytes:
        """The text exposition (format 0.0.4), with the queue gauges read from the stores now."""
        try:
            snap = await asyncio.wait_for(self._read_stores(), REFRESH_TIMEOUT_S)
        except (BackendUnavailable, TimeoutError) as exc:
            self._scrape_errors.inc()
            log.warning("metrics_refresh_failed", error=type(exc).__name__)
            snap = None
        self._view.snapshot = snap
        return generate_latest(self.registry)

    async def _read_stores(self) -> _Snapshot | None:
        queue = self._queue
        if queue is None:
            return None
        stats = await queue.stats()
        snap = _Snapshot(mode=stats.mode or ServingMode.LOCAL_ONLY,
                         high_watermark=self._marks[0], low_watermark=self._marks[1])  # fmt: skip
        snap.stores = dict(stats.stores) if stats.stores else {stats.store: stats}
        snap.failover = queue.failover_counters() or NO_FAILOVER
        # A store gone since stats() is left out: its depth by status is there, priorities wait.
        snap.ready = await queue.queued_by_priority()
        for name, store in self._outbox.items():
            snap.outbox[name] = await store.stats()
        return snap

    # -- helpers ---------------------------------------------------------------------------------

    def _bind_op(self, op: str) -> LoopHistogram:
        if len(self._by_op) >= MAX_LABEL_VALUES:
            return self._duration.child(OTHER)  # a bug's path, so not cached
        child = self._by_op[op] = self._duration.child(op)
        return child

    def _child(self, family: Counter, *values: str) -> Counter:
        key = (id(family), *values)
        child = self._bound.get(key)
        if child is None:
            if len(self._bound) >= MAX_LABEL_VALUES * 4:
                return family.labels(*(OTHER for _ in values))  # a bug's path, so not cached
            child = self._bound[key] = family.labels(*values)
        return child
