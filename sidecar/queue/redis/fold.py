"""Folding concurrent script calls into shared runs: which scripts fold, how calls are cut
into runs, and how a run's reply is split back per call (used by scripts.ScriptRunner)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sidecar.queue.redis.wire import Arg


@dataclass(slots=True)
class ScriptCall:
    script: str
    keys: tuple[str, ...]
    args: tuple[Arg, ...]
    future: asyncio.Future[Any]


# The scripts whose concurrent calls fold into one run (each takes a batch), and the most
# requests one folded run carries, so no run holds Redis much longer than a client's batch.
# Per script: where its ARGV holds the count of requests (None: it is (#ARGV - 2) / per
# request), and how many ARGV values each request takes.
FOLDED_SCRIPTS: dict[str, tuple[int | None, int]] = {"enqueue": (2, 8), "complete": (None, 3)}
FOLD_MAX_ITEMS = 256
# Calls gathered in one loop pass are written to Redis at its end, or as soon as they carry
# this many requests (on the lean connection), so Redis works while the daemon decodes the rest.
EARLY_FLUSH_ITEMS = 16


def items_of(call: ScriptCall) -> int:
    count_at, per_item = FOLDED_SCRIPTS[call.script]
    return int(call.args[count_at]) if count_at is not None else (len(call.args) - 2) // per_item


def folds(batch: list[ScriptCall]) -> bool:
    """Whether batch holds two calls or more of one script that folds."""
    if len(batch) < 2:
        return False
    scripts = [call.script for call in batch if call.script in FOLDED_SCRIPTS]
    return len(scripts) > len(set(scripts))


def fold_groups(calls: list[ScriptCall]) -> list[list[ScriptCall]]:
    """Consecutive calls of one script, cut so no group passes FOLD_MAX_ITEMS requests."""
    groups: list[list[ScriptCall]] = [[]]
    items = 0
    for call in calls:
        n = items_of(call)
        if groups[-1] and items + n > FOLD_MAX_ITEMS:
            groups.append([])
            items = 0
        groups[-1].append(call)
        items += n
    return groups


def fold(calls: list[ScriptCall], loop: asyncio.AbstractEventLoop) -> ScriptCall:
    """One run for several calls of one script: ARGV 1-2 (the latest now), the count where the
    script has one, then each call's items; KEYS the fixed ones, then each call's hashes."""
    if len(calls) == 1:
        return calls[0]
    first = calls[0]
    count_at, _ = FOLDED_SCRIPTS[first.script]
    head = 2 if count_at is None else count_at + 1
    fixed = first.keys[: len(first.keys) - items_of(first)]
    keys: list[str] = list(fixed)
    items: list[Arg] = []
    for call in calls:
        keys += call.keys[len(fixed) :]
        items += call.args[head:]
    now = max(float(call.args[0]) for call in calls)
    count = () if count_at is None else (sum(items_of(call) for call in calls),)
    args = (now, first.args[1], *count, *items)
    return ScriptCall(first.script, tuple(keys), args, loop.create_future())


def unfold(reply: Any, calls: list[ScriptCall]) -> list[Any]:
    """Each call's share of a folded run's reply ({0, items}); an error goes to every call."""
    if isinstance(reply, Exception) or len(calls) == 1:
        return [reply] * len(calls)
    code, items = reply
    out: list[Any] = []
    start = 0
    for call in calls:
        end = start + items_of(call)
        out.append([code, items[start:end]])
        start = end
    return out
