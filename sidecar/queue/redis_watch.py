"""RedisWatch: what the Redis store checks about the server itself, not about any request.

Two checks, run at start and then every watch interval by the failover manager: the eviction
policy (a queue needs `noeviction`) and the generation marker (a Redis that restarted empty, or
was flushed, has lost what this daemon acknowledged, and the failover manager must know).
"""

from __future__ import annotations

import uuid
from typing import Any

from sidecar.queue.redis_io import Client, as_text

# Every eviction-policy warning starts with this, so a re-check can replace the last one.
POLICY_WARNING = "redis maxmemory-policy"


class RedisWatch:
    """The eviction policy and the generation marker of one Redis data set."""

    def __init__(
        self, client: Client, generation_key: str, log: Any, *, check_policy: bool
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
        info = await self._redis.info("memory")
        policy = info.get("maxmemory_policy")
        policy = None if policy is None else str(policy)
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
