"""A stand-in for the daemon's client in the LLM side's unit tests: records every call.

Only the methods the gateway, the worker and the pacer use. Real-daemon tests live beside
(test_llm_worker.py, test_outbox_daemon.py); this one is for branches a real daemon cannot be
steered into on cue (a limiter that says wait, then go; an outbox that is full).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from sidecar.client import AsyncClient
from sidecar.errors import NotFound, SidecarError
from sidecar.protocol import EnqueuedItem, Job, RequestInfo


@dataclass
class Grant:
    granted: bool = True
    wait_s: float = 0.0
    probe: bool = False
    reason: str = ""


@dataclass
class Stored:
    queue: str
    queue_id: str
    payload: bytes
    ttl_s: float | None
    completed: bool = False
    failed: str | None = None


@dataclass
class StubSidecar:
    """Answers the limiter with `grants` in turn (then granted), stores enqueues by queue."""

    grants: list[Grant | SidecarError] = field(default_factory=list)
    state: str = "closed"  # what limit_report answers
    enqueue_error: SidecarError | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stored: dict[tuple[str, str], Stored] = field(default_factory=dict)
    on_acquire: Callable[[], None] | None = None

    def as_client(self) -> AsyncClient:
        return cast(AsyncClient, self)

    def named(self, op: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.calls if name == op]

    async def limit_acquire(self, scope: str, **kw: Any) -> Grant:
        self.calls.append(("limit_acquire", {"scope": scope, **kw}))
        if self.on_acquire is not None:
            self.on_acquire()
        if not self.grants:
            return Grant()
        grant = self.grants.pop(0)
        if isinstance(grant, SidecarError):
            raise grant
        return grant

    async def limit_settle(self, scope: str, **kw: Any) -> None:
        self.calls.append(("limit_settle", {"scope": scope, **kw}))

    async def limit_pause(self, scope: str, **kw: Any) -> None:
        self.calls.append(("limit_pause", {"scope": scope, **kw}))

    async def limit_report(self, scope: str, **kw: Any) -> str:
        self.calls.append(("limit_report", {"scope": scope, **kw}))
        return self.state

    async def enqueue(self, payload: object, **kw: Any) -> Any:
        self.calls.append(("enqueue", {"payload": payload, **kw}))
        if self.enqueue_error is not None:
            raise self.enqueue_error
        queue, qid = kw.get("queue", "requests"), kw["queue_id"]
        created = (queue, qid) not in self.stored
        if created:
            data = msgspec.msgpack.encode(payload)
            self.stored[(queue, qid)] = Stored(queue, qid, data, kw.get("ttl_s"))
        return EnqueuedItem(queue_id=qid, status="queued", created=created, priority=5,
                            expires_at=0.0)  # fmt: skip

    async def take(self, queue_id: str, *, queue: str = "pickups", **kw: Any) -> Job | None:
        self.calls.append(("take", {"queue_id": queue_id, "queue": queue, **kw}))
        entry = self.stored.get((queue, queue_id))
        if entry is None or entry.completed:
            return None
        return job(queue_id, entry.payload)

    async def complete(self, queue_id: str, lease_id: str, **kw: Any) -> None:
        self.calls.append(("complete", {"queue_id": queue_id, "lease_id": lease_id, **kw}))
        queue = kw.get("queue", "requests")
        del self.stored[(queue, queue_id)]  # deleted at once in the outbox queues

    async def fail(self, queue_id: str, lease_id: str, reason: str = "", **kw: Any) -> None:
        self.calls.append(("fail", {"queue_id": queue_id, "reason": reason, **kw}))

    async def status(self, queue_id: str, **kw: Any) -> RequestInfo:
        self.calls.append(("status", {"queue_id": queue_id, **kw}))
        if queue_id not in self.statuses:
            raise NotFound(f"no request {queue_id}")
        return RequestInfo(queue_id=queue_id, status=self.statuses[queue_id], priority=5,
                           attempts=1, max_attempts=10, created_at=0.0, expires_at=0.0,
                           updated_at=1.0, size_bytes=1)  # fmt: skip


def job(
    queue_id: str = "j1", payload: bytes | object = b"", *, attempts: int = 1,
    created_at: float = 0.0, expires_at: float = 0.0,
) -> Job:  # fmt: skip
    """A leased job as run_worker hands it to a handler; a non-bytes payload is encoded."""
    data = payload if isinstance(payload, bytes) else msgspec.msgpack.encode(payload)
    return Job(queue_id=queue_id, lease_id="lease-1", lease_expires_at=0.0,
               payload=msgspec.Raw(data), priority=5, attempts=attempts, max_attempts=10,
               created_at=created_at, expires_at=expires_at)  # fmt: skip
