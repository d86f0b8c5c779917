"""Fixtures shared by the suites: the fake clock and the store under contract test."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

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
    }
    params.update(overrides)
    return LocalQueue(
        max_items=int(params["max_items"]),
        max_bytes=int(params["max_bytes"]),
        high_watermark=params["high_watermark"],
        low_watermark=params["low_watermark"],
        retention_s=params["retention_s"],
        clock=clock,
        journal=None if state_dir is None else Journal(state_dir, fsync=fsync),
    )


# The quick tier (`tests/run --quick`) runs the contract on the three stores the daemon serves
# from; the variants of the same code paths (fsync on, plain scripts, fakeredis, a cluster) run
# in the whole suite.
_VARIANT = pytest.mark.slow


@pytest.fixture(
    params=[
        "local",
        pytest.param("local_fsync", marks=_VARIANT),
        "redis",
        pytest.param("redis_scripts", marks=_VARIANT),
        pytest.param("fakeredis", marks=_VARIANT),
        "resilient",
        pytest.param("cluster", marks=_VARIANT),
    ]
)
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[QueueStore]:
    """Every store that keeps the contract; the contract suite runs once per param.

    The local store is the durable one, journaled in tmp_path: fsync off for speed, and once
    more with fsync on every commit (`local_fsync`), as the daemon runs by default. Redis runs
    the scripts as Functions, and once more as plain scripts (`redis_scripts`), as on a server
    older than Redis 7.
    """
    repo: QueueStore
    if request.param == "local":
        repo = make_local(clock, tmp_path / "state")
    elif request.param == "local_fsync":
        repo = make_local(clock, tmp_path / "state", fsync=True)
    elif request.param == "redis":
        repo = make_redis_contract_store(request, clock, CONTRACT_RETENTION_S)
    elif request.param == "redis_scripts":
        repo = make_redis_contract_store(request, clock, CONTRACT_RETENTION_S, functions=False)
    elif request.param == "fakeredis":
        repo = make_fakeredis_contract_store(clock, CONTRACT_RETENTION_S)
    elif request.param == "cluster":
        repo = make_cluster_contract_store(request, clock, CONTRACT_RETENTION_S)
    elif request.param == "resilient":
        redis = make_redis_contract_store(request, clock, CONTRACT_RETENTION_S)
        repo = ResilientQueue(redis, make_local(clock, tmp_path / "state"))
    else:  # pragma: no cover - a param without a factory is a bug in this fixture
        raise AssertionError(request.param)
    await repo.start()
    try:
        yield repo
    finally:
        await repo.close()
