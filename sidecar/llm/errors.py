"""What a provider call can end in, classified once: unavailable (queue it) or rejected (4xx).

One table: connection refused or reset, timeouts, 5xx, 408, 429 and an open breaker
mean the provider cannot answer now, so the request is queued and retried later; any other 4xx
means the request itself is wrong, so the caller gets that 4xx and nothing is queued.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any


class Outcome(enum.StrEnum):
    """How a provider's answer is treated."""

    OK = "ok"
    UNAVAILABLE = "unavailable"  # queue it (gateway), retry later (worker)
    REJECTED = "rejected"  # answer the 4xx (gateway), fail for good (worker)


# The 4xx that mean "not now": 408 Request Timeout (a timeout, like any other) and
# 429 Too Many Requests. Every other 4xx is the request's own fault.
_TRANSIENT_4XX = frozenset({408, 429})


def classify_status(status: int) -> Outcome:
    """The outcome of an HTTP status from the provider."""
    if 200 <= status < 300:
        return Outcome.OK
    if status >= 500 or status in _TRANSIENT_4XX:
        return Outcome.UNAVAILABLE
    if 400 <= status < 500:
        return Outcome.REJECTED
    return Outcome.UNAVAILABLE  # 1xx/3xx from an API is a broken proxy: not the request's fault


class ProviderUnavailable(Exception):
    """The provider cannot answer now (refused, reset, timeout, 5xx, 429, open breaker)."""

    def __init__(
        self,
        reason: str,
        *,
        retry_after_s: float | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.status = status  # the HTTP status, when the provider answered at all
        self.headers: Mapping[str, str] = headers or {}  # its rate-limit headers, for pacing


class ProviderRejected(Exception):
    """The provider refused the request itself (a 4xx other than the transient ones)."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"provider answered {status}")
        self.status = status
        self.body = body
        self.headers: Mapping[str, str] = headers or {}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds; an HTTP date is ignored), bounded."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, 3600.0)  # a provider asking for more than an hour is backed off anyway
