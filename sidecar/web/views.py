"""How values look in a page: times, sizes, payloads. Jinja escapes everything they return."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from sidecar.models import ListStatus

# A payload shown in a page is cut here: a page is for reading, not for downloading 1 MiB.
PAYLOAD_SHOWN_CHARS = 64 * 1024
STATUSES = [s.value for s in ListStatus]
# What purge may clear from the dashboard: finished records only. Queued, delayed or
# processing ones need `sidecar purge --force` on the host (a deliberate, logged step).
PURGEABLE = ("completed", "failed", "expired")
REQUEUEABLE = ("failed", "expired")
ORDERS = ("oldest", "newest")
PAGE_SIZES = (20, 50, 100, 200)


def when(ts: float | None) -> str:
    """A wall-clock time in UTC, to the second."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago (or, for a time ahead, how long until): `3m 5s ago`, `in 2h 1m`."""
    if ts is None:
        return "-"
    delta = (time.time() if now is None else now) - ts
    text = duration(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.1f}/s"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def payload_text(raw: bytes) -> str:
    """A payload (MessagePack) as indented JSON, or a note when it is not decodable as such."""
    try:
        value: Any = msgspec.msgpack.decode(raw)
        text = json.dumps(value, indent=2, ensure_ascii=False, default=repr)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        return f"(the payload is {len(raw)} bytes that are not readable MessagePack: {exc})"
    if len(text) > PAYLOAD_SHOWN_CHARS:
        return text[:PAYLOAD_SHOWN_CHARS] + f"\n… ({len(text) - PAYLOAD_SHOWN_CHARS} more chars)"
    return text


FILTERS = {
    "when": when,
    "ago": ago,
    "duration": duration,
    "size": size,
    "rate": rate,
    "percent": percent,
}
