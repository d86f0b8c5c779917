"""The limiter's rules, written once: GCRA over two limits, the drain's share, the shared
breaker with its one probe, the slow start, pauses. lua/limit.lua is the same code in Lua.

A scope's state is a few integers, times in microseconds since the epoch (a limit of millions
of tokens per minute spaces tokens a few microseconds apart, below a millisecond). Each GCRA
limit keeps one integer, its theoretical arrival time (TAT): the time by which everything
granted so far would have been spent at the limit's rate. protocol.md 8.14-8.17 is the
normative text; the constants below are the ones it names.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from sidecar.protocol.limits import MAX_RAMP_S

US = 1_000_000
MINUTE_US = 60 * US
# How far ahead of now a limit's TAT may run: a request is granted while its cost fits in it.
# A quarter second keeps any 10-second window within 2.5% of the limit (a burst from idle can
# add at most this much of the limit), yet absorbs the few milliseconds a worker's re-ask is
# late. A cost above it is granted when the limit's TAT is not ahead of now (nothing unspent),
# so no request waits forever.
BURST_US = 250_000
# Fresh traffic (the gateway) seen within this window goes first: a drain ask needs
# FRESH_HEADROOM_US more room than a fresh one, so an arriving live call finds the room the
# drain leaves it, and the drain takes the rest (work-conserving). While a fresh ask is kept
# waiting (refused, not granted since, within the window), the drain is held to its share
# instead, competing on equal terms for the rest.
FRESH_WINDOW_US = 5 * US
FRESH_HEADROOM_US = BURST_US // 2
# A probe that never reports frees the half-open scope for another probe after this long.
PROBE_LEASE_US = 30 * US
# While a probe is out, others are told to ask again within this long (its outcome is unknown).
PROBING_RECHECK_US = 1 * US
# The slow start begins at this share of each limit (at least 1 per minute).
RAMP_FLOOR = 0.1
# How far ahead a single grant (or settle) may push a TAT: one day, like the longest pause.
MAX_AHEAD_US = 86_400 * US
# A scope's state is kept this long past the latest time it still matters, then expires.
IDLE_KEEP_US = 300 * US
# An open or half-open breaker is remembered this long after its open period ends, so a host
# that starts later still sends one probe; forgotten after, it opens again on new failures.
BREAKER_KEEP_US = 3600 * US


class Reason(enum.StrEnum):
    """Why an acquire was not granted ("" when it was)."""

    NONE = ""
    REQUESTS = "requests"
    TOKENS = "tokens"
    PAUSED = "paused"
    BREAKER_OPEN = "breaker_open"
    PROBING = "probing"
    DRAIN_SHARE = "drain_share"


class Breaker(enum.StrEnum):
    """The shared breaker's state of a scope."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Ask:
    """One acquire: the limits (per minute, 0 = none) and the costs against them."""

    rpm: float
    tpm: float
    requests: int = 1
    tokens: int = 0
    fresh: bool = False
    drain_share: float = 0.5
    ramp_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Grant:
    """An acquire's answer: granted (probe: the fleet's one half-open call), or not yet."""

    granted: bool
    wait_s: float = 0.0
    probe: bool = False
    reason: Reason = Reason.NONE


@dataclass(slots=True)
class ScopeState:
    """One scope, as lua/limit.lua keeps it in its hash (the same field names)."""

    r: int = 0  # TAT of the requests limit
    t: int = 0  # TAT of the tokens limit
    dr: int = 0  # the drain's own TATs, at drain_share of each limit, while fresh traffic flows
    dt: int = 0
    f: int = 0  # fresh traffic last seen
    w: int = 0  # a fresh ask refused and not granted since (0: none waits)
    p: int = 0  # paused until
    n: int = 0  # unavailable outcomes in a row
    o: int = 0  # the breaker: open until (0: closed; past: half-open)
    h: int = 0  # the half-open probe's lease, until
    rs: int = 0  # the slow start began (0: none)


def interval_us(per_minute: float) -> float:
    """The emission interval of a limit: microseconds per unit."""
    return MINUTE_US / per_minute


def breaker(s: ScopeState, now: int) -> Breaker:
    if s.o == 0:
        return Breaker.CLOSED
    return Breaker.OPEN if s.o > now else Breaker.HALF_OPEN


def _ramp(s: ScopeState, now: int, ramp_s: float) -> float:
    """The share of each limit the slow start admits now (1 when none runs); ends it once due."""
    if s.rs == 0:
        return 1.0
    span = ramp_s * US
    if span <= 0 or now - s.rs >= span:
        s.rs = 0
        return 1.0
    return RAMP_FLOOR + (1.0 - RAMP_FLOOR) * max(0, now - s.rs) / span


def _limit(per_minute: float, ramp: float) -> float:
    """A limit under the slow start: its share, at least 1 per minute (never above the limit)."""
    return max(per_minute * ramp, min(per_minute, 1.0))


def whole_us(x: float) -> int:
    """x rounded to the nearest microsecond (halves up, as Lua's math.floor(x + 0.5))."""
    return math.floor(x + 0.5)


def _advance(tat: int, now: int, cost: float) -> int:
    return min(max(tat, now) + whole_us(cost), now + MAX_AHEAD_US)


def acquire(s: ScopeState, now: int, ask: Ask) -> Grant:
    """Grant all of the ask's costs or none; changes s only as the grant (or fresh traffic)
    does."""
    if ask.fresh:
        s.f = now
    blocked = max(s.p, s.o)
    if blocked > now:
        reason = Reason.PAUSED if s.p >= s.o else Reason.BREAKER_OPEN
        return Grant(False, (blocked - now) / US, reason=reason)
    half_open = s.o != 0
    if half_open and s.h > now:
        return Grant(False, min(s.h - now, PROBING_RECHECK_US) / US, reason=Reason.PROBING)
    ramp = _ramp(s, now, ask.ramp_s)
    # (reason, field, cost in microseconds of its limit)
    dims: list[tuple[Reason, str, float]] = []
    if ask.rpm > 0:
        dims.append((Reason.REQUESTS, "r", ask.requests * interval_us(_limit(ask.rpm, ramp))))
    if ask.tpm > 0:
        dims.append((Reason.TOKENS, "t", ask.tokens * interval_us(_limit(ask.tpm, ramp))))
    fresh_seen = not ask.fresh and s.f != 0 and now - s.f < FRESH_WINDOW_US
    held = fresh_seen and s.w != 0 and now - s.w < FRESH_WINDOW_US and ask.drain_share < 1
    headroom = FRESH_HEADROOM_US if fresh_seen and not held else 0
    if held:
        share = ask.drain_share
        for _, name, cost in list(dims):
            dims.append((Reason.DRAIN_SHARE, "d" + name, cost / share))
    wait, why = 0, Reason.NONE
    for reason, name, cost in dims:
        # Allowed once the TAT is within BURST_US of now, counting this cost; a cost above
        # BURST_US once the TAT is not ahead of now at all.
        allowed_at = getattr(s, name) - max(BURST_US - cost, 0)
        if name in ("r", "t"):
            allowed_at += headroom
        if allowed_at - now > wait:
            wait, why = math.ceil(allowed_at - now), reason
    if wait > 0:
        if ask.fresh:
            s.w = now  # live traffic is waiting for the budget: the drain is held to its share
        return Grant(False, wait / US, reason=why)
    for _, name, cost in dims:
        setattr(s, name, _advance(getattr(s, name), now, cost))
    if ask.fresh:
        s.w = 0  # no live traffic waits any more
    if half_open:
        s.h = now + PROBE_LEASE_US
        return Grant(True, probe=True)
    return Grant(True)


def settle(s: ScopeState, now: int, tpm: float, tokens_delta: int) -> None:
    """Charge (or refund, when negative) tokens to the tokens limit; its TAT never below now."""
    if tpm <= 0 or tokens_delta == 0:
        return
    s.t = max(now, _advance(s.t, now, tokens_delta * interval_us(tpm)))


def pause(s: ScopeState, now: int, pause_s: float) -> int:
    """Nothing granted before now + pause_s (the later of two pauses wins); the end, in us."""
    s.p = max(s.p, now + whole_us(pause_s * US))
    return max(s.p, now)


def report(
    s: ScopeState, now: int, *, ok: bool, probe: bool, failures: int, reset_s: float
) -> Breaker:
    """One call's outcome: count unavailable ones in a row; a probe's closes or reopens."""
    state = breaker(s, now)
    if state is Breaker.HALF_OPEN and probe:
        s.h = 0
        if ok:
            s.o, s.n, s.rs = 0, 0, now
        else:
            s.o = now + whole_us(reset_s * US)
    elif state is Breaker.CLOSED:
        s.n = 0 if ok else s.n + 1
        if s.n >= failures:
            s.o, s.n, s.h = now + whole_us(reset_s * US), 0, 0
    # Open, or half-open and not the probe: outcomes of calls granted before it opened.
    return breaker(s, now)


def expires_at(s: ScopeState, now: int) -> int:
    """When the state no longer matters (then it may be dropped): the latest time it holds,
    plus IDLE_KEEP_US."""
    latest = max(s.r, s.t, s.dr, s.dt, s.p, s.h, max(s.f, s.w) + FRESH_WINDOW_US, now)
    if s.o:
        latest = max(latest, s.o + BREAKER_KEEP_US)
    if s.rs:
        latest = max(latest, s.rs + whole_us(MAX_RAMP_S * US))
    return latest + IDLE_KEEP_US
