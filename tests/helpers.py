"""Small shared pieces for tests: a controllable clock and request builders."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from sidecar.models import PRIORITY_DEFAULT, QueuedRequest
from sidecar.queue.base import new_request


class FakeClock:
    """A wall clock the test moves by hand, so TTLs and leases lapse without sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_request(
    clock: Callable[[], float],
    body: object = None,
    *,
    priority: int = PRIORITY_DEFAULT,
    ttl_s: float = 3600.0,
    max_attempts: int = 3,
    queue_id: str | None = None,
) -> QueuedRequest:
    """A new request as the server would build it, with `body` encoded as its payload."""
    payload = msgspec.msgpack.encode(body if body is not None else {"prompt": "hi"})
    return new_request(
        payload=payload,
        priority=priority,
        ttl_s=ttl_s,
        max_attempts=max_attempts,
        now=clock(),
        queue_id=queue_id,
    )
