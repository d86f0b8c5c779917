"""What the server reports as it serves: the seam per-op metrics plug into, and the open count.

app.py makes one Observer and one ConnectionCount and hands them to the server (which reports)
and to the ops (which read the count for `health`); nothing reads them back from a neighbour.
The server calls the observer on its hot path: an implementation must not block or raise.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    """Told of every request answered and every connection accepted, closed or refused."""

    def request_done(self, op: str, seconds: float, error_code: str | None) -> None:
        """op: the registry's name, or "invalid" for a frame that did not decode."""

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def connection_refused(self, reason: str) -> None:
        """reason: the error code the refusal sent (too_many_connections, ...)."""


class NullObserver:
    """The observer when nothing observes."""

    def request_done(self, op: str, seconds: float, error_code: str | None) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def connection_refused(self, reason: str) -> None:
        pass


class ConnectionCount:
    """Connections open now: the server keeps it, `health` reports it."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0
