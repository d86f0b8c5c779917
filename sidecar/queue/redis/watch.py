"""What the Redis store watches besides its calls: the server itself, and work for long polls.

RedisWatch: two checks, run at start and then every watch interval by the failover manager:
the eviction policy (a queue needs `noeviction`) and the generation marker (a Redis that
restarted empty, or was flushed, has lost what this daemon acknowledged, and the failover
manager must know). PendingWatch: wakes the store's long polls when work shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoPermissionError

from sidecar.errors import BackendUnavailable
from sidecar.queue.redis.io import RedisClient, as_text, redis_errors
from sidecar.queue.redis.keys import RedisKeys, bounded_time

# Every eviction-policy warning starts with this, so a re-check can replace the last one.
POLICY_WARNING = "redis maxmemory-policy"
# The policy as seen when the user may not run INFO (an ACL without +info).
_DENIED = "(denied)"


class RedisWatch:
    """The eviction policy and the generation marker of one Redis data set."""

    def __init__(
        self, client: RedisClient, generation_key: str, log: Any, *, check_policy: bool
    ) -> None:
        self._redis = client
        self._key = generation_key
        self._log = log
        self._check_policy = check_policy
        self._policy: str | None = None
        self._policy_seen = False
        # Operator-facing notes (health, stats); the store shares this list.
        self.warnings: list[str] = []
        self.generation: str | None = None

    async def start(self) -> None:
        """Check the policy and mark (or read) the generation; Redis errors propagate."""
        if self._check_policy:
            await self.check_eviction_policy()
        self.generation = await self._mark_generation()

    async def check_eviction_policy(self) -> None:
        """Read maxmemory-policy; warn (health, stats, log) while it is not noeviction.

        Run at start and again at every generation check: an operator (or a managed Redis)
        can change the policy while the daemon runs.
        """
        # A queue must never lose what it acknowledged; any policy but noeviction lets Redis
        # drop request hashes under memory pressure.
        try:
            info = await self._redis.info("memory")
        except NoPermissionError:
            # An ACL without +info: the queue still works, only the check cannot be made. Not a
            # reason to keep off Redis (the daemon would serve locally for good): reported as
            # a warning in health and stats, and logged once, like an unsafe policy.
            policy: str | None = _DENIED
        else:
            found = info.get("maxmemory_policy")
            policy = None if found is None else str(found)
        if self._policy_seen and policy == self._policy:
            return
        previous, self._policy, self._policy_seen = self._policy, policy, True
        self.warnings[:] = [w for w in self.warnings if not w.startswith(POLICY_WARNING)]
        if policy == "noeviction":
            if previous is not None:
                self._log.info(
                    "redis_eviction_policy_safe", maxmemory_policy=policy, previous=previous
                )
            return
        if policy == _DENIED:
            self.warnings.append(
                f"{POLICY_WARNING} cannot be read (INFO is denied to this user: grant +info): "
                "Redis may evict queued requests under memory pressure unless it is noeviction"
            )
            self._log.warning("redis_eviction_policy_unknown", reason="INFO denied (NOPERM)")
            return
        self.warnings.append(
            f"{POLICY_WARNING} is {policy or 'unknown'}, not noeviction: "
            "Redis may evict queued requests under memory pressure"
        )
        self._log.warning(
            "redis_eviction_policy_unsafe", maxmemory_policy=policy, previous=previous
        )

    async def check_generation(self) -> str | None:
        """Why this Redis lost its data since we last looked (its marker changed), or None.

        A Redis that restarted empty (or was flushed) has no marker: a new one is written, so
        the next check compares against the new data set. It also re-reads the eviction
        policy, so a change shows in `warnings` (health, stats) and in the log. Redis errors
        propagate to the caller.
        """
        if self._check_policy:
            await self.check_eviction_policy()
        value = await self._redis.get(self._key)
        seen = self.generation
        if value is not None and as_text(value) == seen:
            return None
        self.generation = await self._mark_generation()
        if seen is None:
            return None  # never connected before: nothing to compare with
        why = "generation marker missing" if value is None else "generation marker changed"
        self._log.error("redis_data_lost", reason=why, generation=self.generation)
        return why

    async def _mark_generation(self) -> str:
        # Written once per data set; if it ever reads back different or missing, this Redis
        # lost its data (restarted empty), which the failover manager needs to know.
        token = uuid.uuid4().hex
        await self._redis.set(self._key, token, nx=True)
        value = await self._redis.get(self._key)
        return token if value is None else as_text(value)


class PendingWatch:
    """Wakes long polls on an enqueue through this store, or when Redis shows queued requests.

    Other hosts' enqueues reach this Redis without telling us, so one shared watcher per store
    looks (ZCARD, O(1)) every poll interval while anyone waits: a thousand idle long polls cost
    one command per interval, not a thousand dequeue scripts.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: RedisKeys,
        clock: Callable[[], float],
        poll_interval_s: float,
        closing: asyncio.Event,
        log: Any,
    ) -> None:
        self._redis = client
        self._log = log
        # The error (not an outage) the looks meet, from its first until a look works again.
        self._failing: str | None = None
        self._keys = keys
        self._clock = clock
        self.poll_interval_s = poll_interval_s
        self._closing = closing
        self._work = asyncio.Event()
        self._waiters = 0
        self._watcher: asyncio.Task[None] | None = None

    async def wait(self, timeout: float) -> None:
        """Until notified, or timeout seconds."""
        event = self._work
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        self._waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(0.0, timeout))
        finally:
            self._waiters -= 1

    def notify(self) -> None:
        """Wake every waiter. A fresh event each time, so no waiter can miss a notice; none
        counted, none to wake (a waiter takes the event and counts itself at once)."""
        if self._waiters:
            self._work.set()
            self._work = asyncio.Event()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch(self) -> None:
        """Notify waiters when requests are queued in Redis; stop once nobody waits."""
        while self._waiters > 0 and not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.poll_interval_s)
                return
            try:
                with redis_errors():
                    queued = await self._redis.zcard(self._keys.pending)
                    if not queued:
                        # A delayed request whose time has come: the next dequeue promotes it.
                        due = bounded_time(self._clock(), "now")
                        queued = await self._redis.zcount(self._keys.delayed, "-inf", due)
            except BackendUnavailable:
                queued = 1  # let the waiters try, and meet the outage in their own call
            except Exception as exc:
                # Not an outage (an ACL that denies ZCARD, say): the watcher goes on, and the
                # waiters look for themselves every interval, as in an outage. Logged when
                # the error changes (or goes away), not at every look.
                self._report(exc)
                queued = 1
            else:
                self._report(None)
            if queued:
                self.notify()

    def _report(self, exc: Exception | None) -> None:
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        if error == self._failing:
            return
        if error is not None:
            self._log.warning("redis_watch_failed", error=error)
        else:
            self._log.info("redis_watch_recovered", previous=self._failing)
        self._failing = error
