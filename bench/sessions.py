"""What the load generator drives: one session per connection, one method per unit of work.

A session does the same unit of work against whichever target it is bound to, so a workload's
two rows (the daemon and its ceiling) differ only in what serves them. A new ceiling that does
not speak the sidecar protocol (raw redis-py doing the Redis work of an enqueue, say) is a new
class with these methods.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bench.payload import llm_request
from sidecar.client import AsyncClient, item

# The daemon's default SIDECAR_MAX_BATCH is 1000; stay under it.
PREFILL_BATCH = 500


class Session(Protocol):
    """One connection's worth of work against one target."""

    async def enqueue(self) -> None:
        """Enqueue one request."""
        ...

    async def dequeue_complete(self) -> None:
        """Lease one request and complete it: what a worker does per request."""
        ...

    async def prefill(self, count: int) -> None:
        """Queue count requests (untimed), so that dequeues find work."""
        ...

    async def close(self) -> None: ...


SessionFactory = Callable[[], Awaitable[Session]]


class EmptyQueue(RuntimeError):
    """A dequeue found nothing: the bench queued too little before a dequeue workload."""


class SidecarSession:
    """The sidecar protocol through the real AsyncClient, as a service or worker uses it."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.payload: dict[str, Any] = llm_request()

    @classmethod
    def factory(cls, socket_path: str) -> SessionFactory:
        async def connect() -> Session:
            return cls(await AsyncClient(socket_path).connect())

        return connect

    async def enqueue(self) -> None:
        await self.client.enqueue(self.payload)

    async def dequeue_complete(self) -> None:
        jobs = await self.client.dequeue(1)
        if not jobs:
            raise EmptyQueue("dequeue found no request")
        await self.client.complete(jobs[0].queue_id, jobs[0].lease_id)

    async def prefill(self, count: int) -> None:
        while count > 0:
            n = min(count, PREFILL_BATCH)
            await self.client.enqueue_many([item(self.payload) for _ in range(n)])
            count -= n

    async def close(self) -> None:
        await self.client.close()
