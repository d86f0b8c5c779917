"""Fixtures shared by the suites: the fake clock and the store under contract test."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from sidecar.queue.base import QueueStore
from sidecar.queue.local import Journal, LocalQueue
from sidecar.queue.resilient import ResilientQueue
from tests.support.helpers import FakeClock
from tests.support.redis_server import make_fakeredis_contract_store, make_redis_contract_store
from tests.support.redis_topology import make_cluster_contract_store, redis_cluster_fixture

# The session's Redis Cluster (three primaries), started on first use only.
redis_cluster = redis_cluster_fixture

# Retention and lease used by the contract suite; short enough to step past with the fake clock.
CONTRACT_RETENTION_S = 600.0
# Dead letters stay ten times longer than other finished records in the contract stores.
DEAD_RETENTION_FACTOR = 10
CONTRACT_LEASE_S = 30.0


class _UnobservedErrors(logging.Handler):
    """Collects asyncio's reports of a task or future whose exception nobody retrieved."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "never retrieved" in message:
            self.reports.append(message)


@pytest.fixture(autouse=True)
def logging_left_as_found() -> Iterator[None]:
    """A test must not configure structlog in-process: with cache_logger_on_first_use the
    loggers keep that level for the rest of the session, and a later test's capture_logs
    misses its debug lines (seen as a flake that depended on the order of the tests)."""
    before = structlog.get_config()
    yield
    assert structlog.get_config() == before, "this test configured structlog in-process"


@pytest.fixture(autouse=True)
def no_unobserved_task_exceptions() -> Iterator[None]:
    """Fail a test that leaves a task's exception unobserved (asyncio only logs it)."""
    handler = _UnobservedErrors()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect()  # a dropped task reports its exception when it is collected
    finally:
        logger.removeHandler(handler)
    assert not handler.reports, "task exceptions never retrieved:\n" + "\n".join(handler.reports)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_local(
    clock: FakeClock,
    state_dir: Path | None = None,
    *,
    fsync: bool = False,
    **overrides: float,
) -> LocalQueue:
    """A local store; journaled under state_dir when one is given (fsync off unless asked)."""
    params: dict[str, float] = {
        "max_items": 10_000,
        "max_bytes": 100 * 1024 * 1024,
        "high_watermark": 0.8,
        "low_watermark": 0.6,
        "retention_s": CONTRACT_RETENTION_S,
        "dead_retention_s": CONTRACT_RETENTION_S * DEAD_RETENTION_FACTOR,
    }
    params.update(overrides)
    return LocalQueue(
        max_items=int(params["max_items"]),
        max_bytes=int(params["max_bytes"]),
        high_watermark=params["high_watermark"],
        low_watermark=params["low_watermark"],
        retention_s=params["retention_s"],
        dead_retention_s=params["dead_retention_s"],
        max_dead=int(params.get("max_dead", 10_000)),
        max_dead_bytes=int(params.get("max_dead_bytes", 64 * 1024 * 1024)),
        clock=clock,
        journal=None if state_dir is None else Journal(state_dir, fsync=fsync),
    )


# The quick tier (`tests/run --quick`) runs the contract on the two stores underneath: the
# local one and Redis. The resilient manager over both (which serves the calls through them),
# and the variants of the same code paths (fsync on, plain scripts, fakeredis, a cluster), run
# in the whole suite: each Redis-backed variant starts a redis-server per test.
_VARIANT = pytest.mark.slow


_STORE_PARAMS = [
    "local",
    pytest.param("local_fsync", marks=_VARIANT),
    "redis",
    pytest.param("redis_scripts", marks=_VARIANT),
    pytest.param("fakeredis", marks=_VARIANT),
    pytest.param("resilient", marks=_VARIANT),
    pytest.param("cluster", marks=_VARIANT),
]


def _build_store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path, retention_s: float
) -> QueueStore:
    """The store named by request.param, keeping terminal records for retention_s."""
    name = request.param
    dead_s = retention_s * DEAD_RETENTION_FACTOR
    if name == "local":
        return make_local(
            clock, tmp_path / "state", retention_s=retention_s, dead_retention_s=dead_s
        )
    if name == "local_fsync":
        return make_local(
            clock, tmp_path / "state", fsync=True, retention_s=retention_s, dead_retention_s=dead_s
        )
    if name == "redis":
        return make_redis_contract_store(request, clock, retention_s, dead_retention_s=dead_s)
    if name == "redis_scripts":
        return make_redis_contract_store(
            request, clock, retention_s, functions=False, dead_retention_s=dead_s
        )
    if name == "fakeredis":
        return make_fakeredis_contract_store(clock, retention_s, dead_retention_s=dead_s)
    if name == "cluster":
        return make_cluster_contract_store(request, clock, retention_s, dead_retention_s=dead_s)
    if name == "resilient":
        redis = make_redis_contract_store(request, clock, retention_s, dead_retention_s=dead_s)
        local = make_local(
            clock, tmp_path / "state", retention_s=retention_s, dead_retention_s=dead_s
        )
        return ResilientQueue(redis, local)
    raise AssertionError(name)  # pragma: no cover - a param without a factory is a bug here


@pytest.fixture(params=_STORE_PARAMS)
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[QueueStore]:
    """Every store that keeps the contract; the contract suite runs once per param.

    The local store is the durable one, journaled in tmp_path: fsync off for speed, and once
    more with fsync on every commit (`local_fsync`), as the daemon runs by default. Redis runs
    the scripts as Functions, and once more as plain scripts (`redis_scripts`), as on a server
    older than Redis 7.
    """
    repo = _build_store(request, clock, tmp_path, CONTRACT_RETENTION_S)
    await repo.start()
    try:
        yield repo
    finally:
        await repo.close()


@pytest.fixture(params=_STORE_PARAMS)
async def store_no_retention(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[QueueStore]:
    """The same stores with `QUEUE_RETENTION_HOURS=0`: a terminal record is forgotten at once."""
    repo = _build_store(request, clock, tmp_path, 0.0)
    await repo.start()
    try:
        yield repo
    finally:
        await repo.close()
