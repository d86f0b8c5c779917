"""The Redis store: requests in sorted sets and a hash each, every change one Lua function.

store.py    RedisQueue: the contract over Redis
keys.py     every key name, the scripts' codes, and how records are read
io.py       the client for the layout the settings name, and which errors mean "away"
scripts.py  runs the library (Redis Functions, or EVALSHA where they are missing)
fold.py     concurrent single calls of one loop pass folded into one script run
wire.py     the command encoder used on the hot path
watch.py    the long-poll watcher and the generation check
sweep.py    expiry and lapsed leases, in bounded slices
lua/        one file per atomic operation, with its header contract
"""

from __future__ import annotations

from sidecar.queue.redis.io import (
    RedisClient,
    redis_client,
    translate_error,
    unavailable_kind,
)
from sidecar.queue.redis.keys import SCRIPT_ERRORS, RedisKeys, SweepCounts
from sidecar.queue.redis.scripts import close_client
from sidecar.queue.redis.store import RedisQueue

__all__ = [
    "SCRIPT_ERRORS",
    "RedisClient",
    "RedisKeys",
    "RedisQueue",
    "SweepCounts",
    "close_client",
    "redis_client",
    "translate_error",
    "unavailable_kind",
]
