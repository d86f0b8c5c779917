"""Fleet-wide pacing of provider calls: the limiter client of the gateway and the workers.

The daemon owns the limiter (GCRA over requests and tokens per minute, the shared breaker with
its one half-open probe, the slow start, pauses), keyed by a *scope*: one per provider, base
URL, model and API key (`scope_for`; the key only as a SHA-256 hash). A `Pacer` wraps the four
limiter ops for one scope:

- `admit(tokens, fresh=...)` before a call: `limit_acquire` with one request and `tokens` (the
  estimate of the prompt, `estimate_prompt_tokens`, plus the completion's `max_tokens`). Not
  granted with a wait that keeps the call's total wait within `PacingOptions.max_wait_s`: wait
  and ask again (a worker holds its lease meanwhile); a longer one is returned to the caller,
  who puts the request back
  (`RetryLater(wait_s, counts=False)`) or queues it (the gateway's 202). A refusal also marks
  the scope blocked in this process until the wait ends, so a worker's `ready` gate stops
  taking requests (`wait_ready`).
- `settle(reserved, actual)` after the call: the provider's `usage.total_tokens` replaces the
  reservation (`limit_settle` with the difference).
- `pause(seconds, reason)`: a 429 or 503 with `Retry-After`, or rate-limit headers at zero
  (`pause_from_headers`), pause the scope for the whole fleet (`limit_pause`).
- `report(ok, probe)`: each outcome feeds the shared breaker (`limit_report`): ok when the
  provider answered (a 4xx included), not ok when it was unavailable.

`fail_open=True` (the gateway) lets a fresh call go when the daemon cannot be reached for a
limiter call, or does not answer one within FAIL_OPEN_DEADLINE_S (logged once per lapse,
`llm_limiter_unavailable`): the live service keeps working without pacing. For
FAIL_OPEN_BYPASS_S after a lapse the limiter is not asked at all (nor told outcomes), then it
is asked again. A daemon older than the limiter ops (`unknown_op`) is not paced either.
Refusals with short waits are waited out only up to `max_wait_s` in all, then handed back.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog

from sidecar.client import AsyncClient
from sidecar.config import Settings
from sidecar.errors import SidecarError, UnknownOp

log = structlog.get_logger("sidecar.llm.pacing")
T = TypeVar("T")

# About four bytes of UTF-8 JSON per token: OpenAI's rule of thumb for English text. It
# overestimates a request's JSON (keys, quotes) a little, which errs on the safe side; the
# settle after the call replaces the estimate with the provider's own count.
BYTES_PER_TOKEN = 4
# A refusal whose wait is at most this long is waited out in place (holding the lease): the
# limiter's spacing at a few requests per second is well under it, and putting a request back
# for so short a wait would cost two round trips for nothing. Longer waits go back to the queue.
MAX_WAIT_S = 2.0
# The gateway's (fail-open) limiter calls: a limiter op over the local socket answers in well
# under a millisecond, so 0.3 s means the daemon is hung (stopped, swapping), and is what a
# live request can afford to lose finding out; without it each call waited the client's own
# timeout (10 s). After such a lapse the limiter is not asked for FAIL_OPEN_BYPASS_S: one
# 0.3 s loss per 5 s, not one per request, while the daemon stays away.
FAIL_OPEN_DEADLINE_S = 0.3
FAIL_OPEN_BYPASS_S = 5.0
# OpenAI's duration format in x-ratelimit-reset-*: "6m0s", "1s", "20ms", "1h2m3.5s".
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?"
                       r"(?:(\d+(?:\.\d+)?)ms)?")  # fmt: skip
_SCOPE_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# The limiter ops' bound on one acquire's tokens (protocol.md 8.14): a larger reservation (a
# huge max_tokens times n) is asked as this much.
MAX_TOKENS = 1_000_000_000
# limit_pause's bounds: its reason's length, and a day at most.
MAX_REASON = 128
MAX_PAUSE_S = 86_400.0


def scope_for(provider: str, base_url: str, model: str, api_key: str | None) -> str:
    """The limiter scope of one provider account and model: readable, the key only hashed."""
    key_hash = hashlib.sha256((api_key or "").encode()).hexdigest()
    digest = hashlib.sha256(f"{provider}\n{base_url}\n{model}\n{key_hash}".encode()).hexdigest()
    readable = _SCOPE_SAFE.sub("_", f"{provider}.{model}")[:64]
    return f"llm.{readable}.{digest[:16]}"


def estimate_prompt_tokens(request: Mapping[str, Any]) -> int:
    """The prompt's tokens, estimated from the request's JSON size (BYTES_PER_TOKEN)."""
    size = len(msgspec.json.encode(request))
    return max(1, math.ceil(size / BYTES_PER_TOKEN))


def completion_tokens(request: Mapping[str, Any], default: int) -> int:
    """The most tokens the answer may use: `max_completion_tokens` or `max_tokens` (times `n`
    choices), else `default` (LLM_DEFAULT_MAX_TOKENS)."""
    most = request.get("max_completion_tokens") or request.get("max_tokens")
    if not isinstance(most, int) or isinstance(most, bool) or most <= 0:
        most = default
    n = request.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    return int(most) * choices


def reserve_tokens(request: Mapping[str, Any], default_max_tokens: int) -> int:
    """What a call reserves before it goes: the prompt's estimate plus the answer's most."""
    return estimate_prompt_tokens(request) + completion_tokens(request, default_max_tokens)


def used_tokens(body: Mapping[str, Any]) -> int | None:
    """`usage.total_tokens` of a provider's answer, or None when it reports none."""
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    return None


def parse_duration(value: str | None) -> float | None:
    """Seconds from a rate-limit reset header: OpenAI's `6m0s`, `1s`, `20ms`, or plain seconds;
    None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if match is None or not any(match.groups()):
            return None
        h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s + ms / 1000
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        return None
    return seconds


def pause_from_headers(status: int | None, headers: Mapping[str, str]) -> float | None:
    """How long the whole fleet should hold off this scope after an answer, or None.

    A 429 or 503 with `Retry-After` (seconds, or `retry-after-ms`); or
    `x-ratelimit-remaining-requests` / `-tokens` at 0 with its `x-ratelimit-reset-*`. The
    longest of those that apply.
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    waits: list[float] = []
    if status in (429, 503):
        ms = parse_duration(lowered.get("retry-after-ms"))
        after = parse_duration(lowered.get("retry-after"))
        if ms is not None:
            waits.append(ms / 1000)
        elif after is not None:
            waits.append(after)
    for kind in ("requests", "tokens"):
        remaining = lowered.get(f"x-ratelimit-remaining-{kind}", "").strip()
        if remaining in ("0", "0.0"):
            reset = parse_duration(lowered.get(f"x-ratelimit-reset-{kind}"))
            if reset is not None:
                waits.append(reset)
    waits = [w for w in waits if w > 0]
    return max(waits) if waits else None


@dataclass(frozen=True, kw_only=True)
class PacingOptions:
    """The limiter's parameters for one scope; each default is its setting's."""

    rpm: int = 0  # LLM_PROVIDER_RPM (0: no limit)
    tpm: int = 0  # LLM_PROVIDER_TPM (0: no limit)
    default_max_tokens: int = 1024  # LLM_DEFAULT_MAX_TOKENS
    drain_share: float = 0.5  # LLM_DRAIN_SHARE
    ramp_s: float = 30.0  # LLM_RAMP_SECONDS
    breaker_failures: int = 5  # LLM_BREAKER_FAILURES
    breaker_reset_s: float = 10.0  # LLM_BREAKER_RESET_SECONDS
    max_wait_s: float = MAX_WAIT_S


@dataclass(frozen=True, kw_only=True)
class Admission:
    """What `Pacer.admit` decided: go (with whether this call is the fleet's probe and the
    tokens reserved), or wait `wait_s` elsewhere, for `reason`."""

    granted: bool
    tokens: int = 0
    probe: bool = False
    wait_s: float = 0.0
    reason: str = ""
    paced: bool = True  # False: the limiter was not asked (unreachable, or too old a daemon)


class Pacer:
    """The limiter ops of one scope, as the gateway and the workers use them."""

    def __init__(
        self,
        client: AsyncClient,
        scope: str,
        options: PacingOptions | None = None,
        *,
        fail_open: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
        deadline_s: float = FAIL_OPEN_DEADLINE_S,
        bypass_s: float = FAIL_OPEN_BYPASS_S,
    ) -> None:
        self.client = client
        self.scope = scope
        self.opts = options or PacingOptions()
        self.fail_open = fail_open
        self.deadline_s = deadline_s  # fail_open only: a limiter call's longest wait
        self.bypass_s = bypass_s  # fail_open only: how long a lapse skips the limiter
        self._bypass_until = 0.0  # clock time
        self._clock = clock
        self._sleep = sleep
        self.blocked_until = 0.0  # this process's view: no call may go before (clock time)
        self.breaker = "closed"  # the shared breaker's state, as the last report answered
        self._unpaced = False  # the limiter is not answering (logged once per lapse)

    # -- before a call -------------------------------------------------------------------

    async def admit(self, tokens: int, *, fresh: bool) -> Admission:
        """Acquire one request and `tokens` for a call; short waits are waited out here."""
        tokens = min(tokens, MAX_TOKENS)
        if self.opts.tpm > 0:
            # More than a minute's budget could never be granted: ask for the whole minute
            # (the settle charges what was really used).
            tokens = min(tokens, self.opts.tpm)
        if self.bypassing():
            return Admission(granted=True, tokens=tokens, paced=False)
        waited = 0.0
        while True:
            try:
                grant = await self._bounded(self.client.limit_acquire(
                    self.scope, rpm=self.opts.rpm, tpm=self.opts.tpm, requests=1, tokens=tokens,
                    fresh=fresh, drain_share=self.opts.drain_share, ramp_s=self.opts.ramp_s,
                ))  # fmt: skip
            except UnknownOp:
                self._lapse("the daemon has no limiter ops (older than this client)")
                return Admission(granted=True, tokens=tokens, paced=False)
            except (SidecarError, TimeoutError) as exc:
                if not self.fail_open:
                    raise
                self._lapse(_why(exc, self.deadline_s))
                return Admission(granted=True, tokens=tokens, paced=False)
            self._back()
            if grant.granted:
                return Admission(granted=True, tokens=tokens, probe=bool(grant.probe))
            wait_s = max(0.0, float(grant.wait_s))
            # Capped in total: short refusals one after another must not hold a call forever.
            if waited + wait_s > self.opts.max_wait_s:
                self.block(wait_s)
                return Admission(granted=False, wait_s=wait_s, reason=grant.reason or "limited")
            await self._sleep(wait_s)
            waited += wait_s

    def bypassing(self) -> bool:
        """Whether the limiter is skipped now: it lapsed (fail-open) less than bypass_s ago."""
        return self.fail_open and self._clock() < self._bypass_until

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A limiter call; the gateway's (fail-open) ones bounded by `deadline_s`."""
        if not self.fail_open:
            return await call
        async with asyncio.timeout(self.deadline_s):
            return await call

    def block(self, wait_s: float) -> None:
        """No call from this process before `wait_s` from now (the ready gate waits)."""
        self.blocked_until = max(self.blocked_until, self._clock() + wait_s)

    def blocked_for(self) -> float:
        """Seconds until this process may try a call again (0: now)."""
        return max(0.0, self.blocked_until - self._clock())

    async def wait_ready(self, stop: asyncio.Event) -> None:
        """Until the scope is not known blocked, or `stop` is set (a worker's ready gate)."""
        while not stop.is_set():
            left = self.blocked_for()
            if left <= 0:
                return
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((stopped,), timeout=left)
            finally:
                stopped.cancel()

    # -- after a call --------------------------------------------------------------------

    async def settle(self, reserved: int, actual: int | None) -> None:
        """Replace the reservation with the tokens the provider reported (if it did)."""
        if actual is None or actual == reserved or self.opts.tpm <= 0:
            return
        await self._quiet(self.client.limit_settle(self.scope, tpm=self.opts.tpm,
                                                   tokens_delta=actual - reserved))  # fmt: skip

    async def pause(self, pause_s: float, reason: str) -> None:
        """Hold the scope off for the whole fleet for `pause_s` (the provider asked)."""
        pause_s = min(pause_s, MAX_PAUSE_S)
        self.block(pause_s)
        log.warning("llm_scope_paused", scope=self.scope, pause_s=round(pause_s, 3), reason=reason)
        await self._quiet(self.client.limit_pause(self.scope, pause_s=pause_s,
                                                  reason=reason[:MAX_REASON]))  # fmt: skip

    async def report(self, *, ok: bool, probe: bool = False) -> None:
        """Feed one outcome to the shared breaker; log when its state changes."""
        state = await self._quiet(self.client.limit_report(
            self.scope, ok=ok, probe=probe, failures=self.opts.breaker_failures,
            reset_s=self.opts.breaker_reset_s,
        ))  # fmt: skip
        state = getattr(state, "state", state)  # LimitState, or its state already
        if isinstance(state, str) and state != self.breaker:
            log.info("llm_breaker_changed", scope=self.scope, state=state, was=self.breaker)
            self.breaker = state
            if state == "open":
                self.block(self.opts.breaker_reset_s)

    async def _quiet(self, call: Coroutine[Any, Any, Any]) -> Any:
        """A bookkeeping call whose failure must not fail the request it follows."""
        if self.bypassing():
            call.close()  # never sent: the limiter lapsed a moment ago
            return None
        try:
            result = await self._bounded(call)
        except TimeoutError:
            self._lapse(_why(TimeoutError(), self.deadline_s))
            return None
        except SidecarError as exc:
            if not isinstance(exc, UnknownOp):
                log.warning("llm_limiter_call_failed", scope=self.scope, code=exc.code,
                            error=exc.message)  # fmt: skip
            return None
        self._back()
        return result

    def _lapse(self, why: str) -> None:
        if self.fail_open:
            self._bypass_until = self._clock() + self.bypass_s
        if not self._unpaced:
            self._unpaced = True
            log.warning("llm_limiter_unavailable", scope=self.scope, error=why,
                        detail="calls go unpaced until the limiter answers")  # fmt: skip

    def _back(self) -> None:
        if self._unpaced:
            self._unpaced = False
            log.info("llm_limiter_available", scope=self.scope)


def _why(exc: BaseException, deadline_s: float) -> str:
    if isinstance(exc, SidecarError):
        return f"{exc.code}: {exc.message}"
    return f"no answer within {deadline_s:g} s"


def pacing_options(settings: Settings) -> PacingOptions:
    """The limiter's parameters from the settings."""
    return PacingOptions(
        rpm=settings.llm_provider_rpm,
        tpm=settings.llm_provider_tpm,
        default_max_tokens=settings.llm_default_max_tokens,
        drain_share=settings.llm_drain_share,
        ramp_s=settings.llm_ramp_s,
        breaker_failures=settings.llm_breaker_failures,
        breaker_reset_s=settings.llm_breaker_reset_s,
    )
