"""Every name a queue has in Redis, built in one place: keys, hash fields, scripts, codes.

With the default prefix `sidecar` the keys are (the braces are a Redis Cluster hash tag, so every
key of one queue lands in one slot and each Lua script stays legal on a cluster):

| key | type | holds |
| --- | --- | --- |
| `{sidecar}:req:<queue_id>` | hash | one request's metadata (short values: a compact listpack) |
| `{sidecar}:req:<queue_id>:p` | string | its payload (raw bytes) until it is settled |
| `{sidecar}:pending` | zset | queued queue_ids by `priority * 2**48 + seq` (exact in a double) |
| `{sidecar}:leases` | zset | processing queue_ids by lease end (epoch ms, rounded up to an int) |
| `{sidecar}:expiry` | zset | queued queue_ids by expires_at (epoch ms, rounded up to an int) |
| `{sidecar}:delayed` | zset | queued queue_ids held back by a `fail` with delay_s (or moved from |
| | | the local store while held back), by not_before |
| `{sidecar}:retained` | zset | completed and cancelled queue_ids by the end of their retention |
| `{sidecar}:dead:failed` | zset | dead letters that failed for good (payload kept) by the end |
| | | of their dead retention (KEYS[10]) |
| `{sidecar}:dead:expired` | zset | dead letters that expired unprocessed, likewise (KEYS[11]) |
| `{sidecar}:seq` | string | the arrival counter that assigns `seq` |
| `{sidecar}:stats` | hash | counters shared by every daemon (accepted, completed, failed, |
| | | expired, bytes, max_expired_age_s) |
| `{sidecar}:generation` | string | a token written once; if it vanishes, this Redis lost its data |
| `{sidecar}:probe` | string | a daemon checks that Redis takes writes again (10 s TTL) |
| `{sidecar}:discarded:<token>` | string | one discard call did its work (60 s TTL) |
| `{sidecar}:limit:<scope>` | hash | one limiter scope (lua/limit.lua); expires once idle |
| `{sidecar}:req:` | (prefix) | declared to every script as KEYS[8]: ids read from an index |
| | | become keys under it; the hashes a call names are declared one by one after |
| | | dead:expired (KEYS[12] on) |

A request hash has the fields queue_id, priority, seq, created_at, expires_at, status, attempts,
max_attempts, updated_at, size_bytes, lease_id, lease_expires_at, reason, not_before (while
delayed), purge_at (once terminal) and settled_by (which op and lease ended it, so the same
settle run twice is recognised); times are epoch seconds as decimal text, at most MAX_TIME_S.
The payload sits beside it in `<hash>:p` until the request is settled. Hashes written before
that key existed keep the payload in a `payload` field; the scripts read and remove both, so a
daemon upgraded with requests in Redis needs no migration.

The outbox queues (`deliveries`, `pickups`; sidecar/queue/build.py) are queues of their own
with this same layout under the prefix `<prefix>:<name>`: `{sidecar:deliveries}:pending`, ...

An operator finds a request with `redis-cli HGETALL '{sidecar}:req:<queue_id>'`, the next
requests to be handed out with `redis-cli ZRANGE '{sidecar}:pending' 0 9`, and the books with
`redis-cli HGETALL '{sidecar}:stats'`. Only a terminal request's hash carries a native TTL (the
end of its retention): a queued or leased one stays until a script settles it, so Redis never
drops what the queue must keep, and the `bytes` counter stays exact.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

from sidecar.errors import InvalidState, LeaseMismatch, NotFound, SidecarError
from sidecar.models import QueuedRequest, QueueStatus

# seq gets the low 48 bits of the pending score and priority (0-9) the bits above: the largest
# score, 10 * 2**48, stays below 2**53, so a double holds it exactly and ties never blur.
PRIORITY_SHIFT = 1 << 48
# The latest time the scripts store, in epoch seconds (about year 287,000): 2**53 ms, so a time
# in milliseconds is an exact integer in Lua's doubles and PEXPIREAT never sees an overflowed,
# negative value. Later times (an infinite TTL or lease) are clamped to it (lua/common.lua).
MAX_TIME_S = float(2**53 // 1000)


def bounded_time(t: float, what: str) -> float:
    """An epoch time the scripts can store: at most MAX_TIME_S; NaN raises ValueError."""
    if t <= MAX_TIME_S:  # nearly every time, in one comparison (NaN fails it)
        return t
    if math.isnan(t):
        raise ValueError(f"{what} is not a number")
    return MAX_TIME_S


def lease_end(now: float, lease_s: float) -> float:
    """now + lease_s, bounded like every time the scripts store."""
    if math.isnan(lease_s):
        raise ValueError("lease_s is not a number")
    return bounded_time(now + lease_s, "lease end")


def pending_score(priority: int, seq: int) -> int:
    """The exact pending score that orders by priority, then arrival."""
    return priority * PRIORITY_SHIFT + seq


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The key names of one queue under one prefix."""

    prefix: str
    pending: str
    leases: str
    expiry: str
    retained: str
    seq: str
    stats: str
    generation: str
    probe: str
    request_prefix: str
    delayed: str
    dead_failed: str
    dead_expired: str

    @classmethod
    def for_prefix(cls, prefix: str) -> RedisKeys:
        """Build every key under `{prefix}` (the prefix must not contain braces)."""
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"invalid Redis key prefix {prefix!r}")
        tag = "{" + prefix + "}:"
        return cls(
            prefix=prefix,
            pending=tag + "pending",
            leases=tag + "leases",
            expiry=tag + "expiry",
            retained=tag + "retained",
            seq=tag + "seq",
            stats=tag + "stats",
            generation=tag + "generation",
            probe=tag + "probe",
            request_prefix=tag + "req:",
            delayed=tag + "delayed",
            dead_failed=tag + "dead:failed",
            dead_expired=tag + "dead:expired",
        )

    def request(self, queue_id: str) -> str:
        """The hash of one request."""
        return self.request_prefix + queue_id

    def payload(self, queue_id: str) -> str:
        """The string beside a request's hash that holds its payload until it is settled."""
        return self.request(queue_id) + ":p"

    def limit(self, scope: str) -> str:
        """The hash of one limiter scope (lua/limit.lua; sidecar.queue.limit.redis)."""
        return f"{{{self.prefix}}}:limit:{scope}"

    def discarded(self, token: str) -> str:
        """The marker a discard call leaves for 60 s, so the same call run twice is recognised."""
        return f"{{{self.prefix}}}:discarded:{token}"

    def script_keys(self) -> tuple[str, ...]:
        """KEYS[1..11] of every script, in the order lua/common.lua names them."""
        return (
            self.pending,
            self.leases,
            self.expiry,
            self.retained,
            self.seq,
            self.stats,
            self.generation,
            self.request_prefix,
            self.delayed,
            self.dead_failed,
            self.dead_expired,
        )


# -- scripts: lua/<name>.lua, each run with lua/common.lua prepended ---------------------------

SCRIPT_NAMES = (
    "enqueue", "dequeue", "extend", "complete", "fail", "cancel", "status", "sweep", "stats",
    "discard", "take", "limit", "list", "requeue", "purge",
)  # fmt: skip


class SweepCounts(NamedTuple):
    """What one sweep step moved."""

    expired: int
    requeued: int
    failed: int
    purged: int


class ScriptCode(enum.IntEnum):
    """The first element of every script reply (mirrors lua/common.lua)."""

    OK = 0
    NOT_FOUND = -1
    INVALID_STATE = -2
    LEASE_MISMATCH = -3


# The one table from script return codes to errors; messages are formatted with the call's
# queue_id, lease_id, op, the status the script reported and the status the op needs.
SCRIPT_ERRORS: dict[int, tuple[type[SidecarError], str]] = {
    ScriptCode.NOT_FOUND: (NotFound, "no request {queue_id}"),
    ScriptCode.INVALID_STATE: (InvalidState, "request {queue_id} is {status}; {op} needs {needs}"),
    ScriptCode.LEASE_MISMATCH: (
        LeaseMismatch,
        "lease {lease_id} is not the current lease of {queue_id}",
    ),
}


def settled_record(reply: list[Any], op: str, queue_id: str, lease_id: str | None) -> QueuedRequest:
    """The record of an OK reply, or the error its code maps to in SCRIPT_ERRORS."""
    code = reply[0]
    if code == ScriptCode.OK:
        return decode_record(reply[1])
    cls, template = SCRIPT_ERRORS[code]
    status = reply[1].decode() if len(reply) > 1 else None
    needs = "a queued request" if op == "cancel" else "a processing request"
    message = template.format(
        queue_id=queue_id, lease_id=lease_id, op=op, status=status, needs=needs
    )
    details: dict[str, Any] = {"queue_id": queue_id}
    if status is not None:
        details["status"] = status
    raise cls(message, details)


def _sources() -> tuple[dict[str, str], str]:
    """(each script as a plain script, keyed by name; the library of them all as Functions)."""
    lua = resources.files("sidecar.queue.redis") / "lua"
    common = (lua / "common.lua").read_text(encoding="utf-8")
    bodies = {n: (lua / f"{n}.lua").read_text(encoding="utf-8") for n in SCRIPT_NAMES}
    scripts = {
        n: f"local KEYS, ARGV = KEYS, ARGV\n{common}\nbegin(KEYS, ARGV)\n{body}"
        for n, body in bodies.items()
    }
    functions = "".join(
        f"\nredis.register_function{{function_name = '{_LIBRARY_NAME}_{n}', flags = {{"
        + ("" if n in _DENY_OOM else "'allow-oom'")
        + f"}}, callback = function(keys, args)\nbegin(keys, args)\n{body}\nend}}\n"
        for n, body in bodies.items()
    )
    return scripts, f"local KEYS, ARGV\n{common}{functions}"


_LIBRARY_NAME = "@LIBRARY@"  # stands for the library's name in its code until it is known
# The functions Redis refuses at once while used_memory is past maxmemory: those that add.
# The rest (settles, reads, sweeps) run, as a plain script does until its first write that
# needs memory, so a full Redis still drains: they free more than the fields they set.
_DENY_OOM = frozenset({"enqueue", "requeue"})
SCRIPTS, _library_code = _sources()
# Redis names a script by the SHA1 of its text, so the SHAs are known before any SCRIPT LOAD.
SCRIPT_SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
# The library is named after its code, and its functions after it: daemons of different
# versions sharing one Redis each call their own (function names are global in Redis).
LIBRARY_NAME = "sidecar_" + hashlib.sha1(_library_code.encode()).hexdigest()[:16]
LIBRARY = f"#!lua name={LIBRARY_NAME}\n" + _library_code.replace(_LIBRARY_NAME, LIBRARY_NAME)
FUNCTION_NAMES = {name: f"{LIBRARY_NAME}_{name}" for name in SCRIPT_NAMES}


# -- request hashes -------------------------------------------------------------------------


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def decode_number(value: bytes | None) -> float | None:
    return None if value is None else float(value)


# Each status by its stored bytes: calling the Enum class costs more than the rest of a field.
_STATUS_BY_BYTES = {status.value.encode(): status for status in QueueStatus}


def decode_record(pairs: Sequence[bytes]) -> QueuedRequest:
    """A request from the HGETALL field/value pairs of its hash."""
    f = dict(zip(pairs[::2], pairs[1::2], strict=True))
    status = _STATUS_BY_BYTES.get(f[b"status"]) or QueueStatus(f[b"status"].decode())
    return QueuedRequest(
        queue_id=f[b"queue_id"].decode(),
        priority=int(f[b"priority"]),
        seq=int(f[b"seq"]),
        created_at=float(f[b"created_at"]),
        expires_at=float(f[b"expires_at"]),
        status=status,
        attempts=int(f[b"attempts"]),
        max_attempts=int(f[b"max_attempts"]),
        updated_at=float(f[b"updated_at"]),
        payload=f.get(b"payload"),
        size_bytes=int(f[b"size_bytes"]),
        lease_id=_text(f.get(b"lease_id")),
        lease_expires_at=decode_number(f.get(b"lease_expires_at")),
        reason=_text(f.get(b"reason")),
    )
