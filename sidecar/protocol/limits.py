"""Wire types of the limiter ops (protocol.md 8.14-8.17): acquire, settle, pause, report.

Every number is bounded here, so only finite values in range reach a limiter (NaN fails every
bound, inf passes none); sidecar.queue.limit.gcra and lua/limit.lua keep within the same bounds.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from sidecar.protocol.messages import Request

# A scope is opaque to the daemon: the LLM side derives it from the provider, base URL, model
# and a hash of the API key. Printable ASCII without spaces, as a queue_id: it fits a Redis key
# and a log line. \Z, not $: `$` also matches before a final newline.
Scope = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[!-~]+\Z")]
MAX_RPM = 1_000_000
MAX_TPM = 1_000_000_000
MAX_REQUESTS = 1_000_000
MAX_TOKENS = 1_000_000_000
MAX_RAMP_S = 3600.0
MAX_PAUSE_S = 86_400.0
MAX_RESET_S = 86_400.0
MAX_FAILURES = 1000
Rpm = Annotated[int, msgspec.Meta(ge=0, le=MAX_RPM)]
Tpm = Annotated[int, msgspec.Meta(ge=0, le=MAX_TPM)]


class LimitAcquire(Request, tag="limit_acquire"):
    """Take `requests` against rpm and `tokens` against tpm, all or nothing (protocol.md 8.14)."""

    scope: Scope
    rpm: Rpm = 0
    tpm: Tpm = 0
    requests: Annotated[int, msgspec.Meta(ge=0, le=MAX_REQUESTS)] = 1
    tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)] = 0
    # Live traffic (the gateway): while some was seen lately, the drain keeps to drain_share.
    fresh: bool = False
    drain_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    ramp_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_RAMP_S)] = 0.0


class LimitSettle(Request, tag="limit_settle"):
    """Charge (positive) or refund (negative) tokens after the call (protocol.md 8.15)."""

    scope: Scope
    tpm: Tpm = 0
    tokens_delta: Annotated[int, msgspec.Meta(ge=-MAX_TOKENS, le=MAX_TOKENS)] = 0


class LimitPause(Request, tag="limit_pause"):
    """Grant nothing on the scope for pause_s, for the whole fleet (protocol.md 8.16)."""

    scope: Scope
    pause_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_PAUSE_S)]
    # Why (retry_after, ratelimit_headers...): logged by the daemon, not stored.
    reason: Annotated[str, msgspec.Meta(max_length=128)] = ""


class LimitReport(Request, tag="limit_report"):
    """One provider call's outcome for the scope's shared breaker (protocol.md 8.17)."""

    scope: Scope
    ok: bool
    probe: bool = False
    failures: Annotated[int, msgspec.Meta(ge=1, le=MAX_FAILURES)] = 5
    reset_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_RESET_S)] = 30.0


class LimitGrant(msgspec.Struct, kw_only=True):
    """limit_acquire's result: granted, or when asking again can succeed and why not now."""

    granted: bool
    wait_s: float
    probe: bool
    reason: str


class LimitSettled(msgspec.Struct, kw_only=True):
    """limit_settle's result: an empty map."""


class LimitPaused(msgspec.Struct, kw_only=True):
    """limit_pause's result: the scope's pause ends then (epoch seconds, the limiter's clock)."""

    paused_until: float


class LimitState(msgspec.Struct, kw_only=True):
    """limit_report's result: the breaker's state after the report."""

    state: str
