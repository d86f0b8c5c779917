"""The parsers of the settings table: each turns one environment value into a typed one.

A parser raises ValueError for a value it does not accept; `Settings.from_env` turns that into
a line naming the variable, the value and the setting's accepted text.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[
    [str], float
]:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open)."""

    def parse(raw: str) -> float:
        value = float(raw)
        if math.isnan(value) or math.isinf(value):
            raise ValueError(raw)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ValueError(raw)
        if hi is not None and value > hi:
            raise ValueError(raw)
        return value

    return parse


def whole(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An int in [lo, hi]."""

    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < lo or (hi is not None and value > hi):
            raise ValueError(raw)
        return value

    return parse


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def choice(*options: str) -> Callable[[str], str]:
    """One of the options, case-insensitive; returned in lower case."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(raw)
        return value

    return parse


def text(raw: str) -> str:
    if not raw.strip():
        raise ValueError(raw)
    return raw


def http_url(raw: str) -> str:
    if not raw.strip().startswith(("http://", "https://")):
        raise ValueError(raw)
    return raw.strip()


def ids(raw: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    if not values or any(v < 0 for v in values):
        raise ValueError(raw)
    return values


def group(raw: str) -> int:
    import grp

    raw = raw.strip()
    if raw.isdigit():
        return int(raw)
    try:
        return grp.getgrnam(raw).gr_gid
    except KeyError:
        raise ValueError(raw) from None


def redis_url(raw: str) -> str:
    if raw.startswith("redis+sentinel://"):
        parse_sentinel_url(raw)
        return raw
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(raw)
    return raw


def key_prefix(raw: str) -> str:
    # Braces would break the {prefix} hash tag that keeps every key in one cluster slot.
    if not raw or any(c in raw for c in "{} \t\n"):
        raise ValueError(raw)
    return raw


def sentinels(raw: str) -> str:
    return ",".join(f"{host}:{port}" for host, port in sentinel_hosts(raw))


def sentinel_hosts(raw: str) -> list[tuple[str, int]]:
    """host:port,host:port as pairs; ValueError when one is malformed."""
    hosts: list[tuple[str, int]] = []
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(raw)
        hosts.append((host, int(port)))
    return hosts


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """redis+sentinel://host:port,.../master[/db] as (sentinels, master, db); ValueError."""
    rest = url.removeprefix("redis+sentinel://")
    hosts, _, path = rest.partition("/")
    master, _, db = path.partition("/")
    if not master or (db and not db.isdigit()):
        raise ValueError(url)
    return sentinel_hosts(hosts), master, int(db or 0)
