"""Whether Redis serves: the failover to the local store, the probe that notices Redis is back,
the watch of its generation marker, and the reconciliation of uncertain copies before Redis
serves again.

A BackendUnavailable from Redis marks it down at once (later calls do not wait for another
timeout). A probe with backoff notices recovery: it needs PROBE_SUCCESSES writes in a row, then
the uncertain enqueues are reconciled (an enqueue that timed out may still land in Redis later,
when a frozen server runs what it had already received; the copy nobody has touched is
dropped, so one request does not run once from each store) and Redis serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from sidecar.errors import BackendUnavailable
from sidecar.queue.local import LocalQueue
from sidecar.queue.redis import RedisQueue

log = structlog.get_logger("sidecar.queue.resilient")

# Successful write probes in a row before Redis serves again: one small write can pass while a
# Redis at its memory limit refuses the next batch (the store would then flap many times a
# second).
PROBE_SUCCESSES = 2
# Failing again within this long after a recovery is a flap: the probe keeps its backoff
# instead of starting again from probe_initial_s.
FLAP_WINDOW_S = 30.0


class _Repeats:
    """At most one log line per event per interval; the next one says how many were skipped.

    Skipped lines still go out at debug level, so nothing is lost to whoever asks for it.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: str, event: str, *, key: str = "", **fields: Any) -> None:
        """key: counted apart from the event's other lines (one per reason, say)."""
        now = time.monotonic()
        slot = f"{event}:{key}"
        last = self._last.get(slot)
        if last is not None and now - last < self.interval_s:
            self._skipped[slot] = self._skipped.get(slot, 0) + 1
            log.debug(event, **fields)
            return
        self._last[slot] = now
        skipped = self._skipped.pop(slot, 0)
        if skipped:
            fields["repeats_skipped"] = skipped
        getattr(log, level)(event, **fields)


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for it to end, whatever it ends with."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Failover:
    """Redis's state as the manager sees it (up, or down and probed), its counters, and the
    changes of state that wait_until watches."""

    def __init__(
        self,
        redis: RedisQueue,
        local: LocalQueue,
        *,
        on_up: Callable[[], None],
        probe_initial_s: float,
        probe_max_s: float,
        probe_successes: int,
        flap_window_s: float,
        watch_interval_s: float,
        log_repeat_s: float,
    ) -> None:
        """on_up: called whenever Redis starts serving (the manager starts the hand-over)."""
        self.redis = redis
        self.local = local
        self._on_up = on_up
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self.probe_successes = probe_successes
        self.flap_window_s = flap_window_s
        self.watch_interval_s = watch_interval_s
        self.up = False
        self.failovers = 0
        self.recoveries = 0
        self.data_lost: list[str] = []
        self.down_reason: str | None = None
        self._degraded_since: float | None = None
        self._degraded_total = 0.0
        self._changed = asyncio.Event()
        # One reconciliation at a time: two would both see a Redis copy, one would drop the
        # local copy and the other the Redis one, and the request would be gone. Made once,
        # for the life of the store: a change of state does not end one in progress.
        self._reconciling = asyncio.Lock()
        self._closing = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # The probe's backoff, kept across a recovery so a flapping Redis is probed ever slower.
        self.probe_delay_s = probe_initial_s
        self._up_since: float | None = None
        self._repeats = _Repeats(log_repeat_s)

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start Redis and reconcile; when Redis is unreachable, mark it down (the probe
        starts). Then watch its generation marker."""
        try:
            await self.redis.start()
            await self.reconcile()
        except BackendUnavailable as exc:
            self.mark_down(exc, "start")
        except Exception:
            # An error nobody planned for while settling uncertain copies: serve locally and
            # let the probe (which retries such errors) try again, rather than not start.
            log.exception("redis_reconcile_failed")
            self.mark_down(
                BackendUnavailable("reconciliation with redis failed", {"kind": "reconcile"}),
                "start",
            )
        else:
            self.up = True
            self._on_up()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def probe_at_stop(self, deadline: float) -> None:
        """Stop the probe and probe once now, until deadline (loop time): a Redis that came back
        a moment ago takes the backlog."""
        await cancel(self._probe)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._recover_now()

    async def stop(self) -> None:
        """End the probe and the watch."""
        self._closing.set()
        await cancel(self._probe)
        await cancel(self._watcher)

    async def _recover_now(self) -> None:
        try:
            await self.redis.start()
            await self.redis.probe()
            lost = await self.redis.check_generation()
            if lost is not None:
                self._report_data_loss(lost)
            await self.reconcile()
        except BackendUnavailable:
            return
        except Exception:
            # The stop must go on to the final snapshot whatever this probe ran into.
            log.exception("redis_probe_at_stop_failed")
            return
        self._mark_up()

    # -- state ------------------------------------------------------------------------------------

    def mark_down(self, exc: BackendUnavailable, op: str) -> None:
        """Redis failed `op`: serve from the local store and probe until Redis is back."""
        if not self.up and self._probe is not None and not self._probe.done():
            return
        now = time.monotonic()
        if self.up:
            self.failovers += 1
            flapped = self._up_since is not None and now - self._up_since < self.flap_window_s
            self.probe_delay_s = (
                min(self.probe_delay_s * 2, self.probe_max_s) if flapped else self.probe_initial_s
            )
        self.up = False
        self.down_reason = exc.message
        self._degraded_since = now
        self._repeats.log("warning", "redis_down", op=op, error=exc.message,
                          failovers=self.failovers)  # fmt: skip
        self.changed()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    def _mark_up(self) -> None:
        self.up = True
        self.recoveries += 1
        self._up_since = time.monotonic()
        if self._degraded_since is not None:
            self._degraded_total += self._up_since - self._degraded_since
            self._degraded_since = None
        self.down_reason = None
        self._repeats.log("info", "redis_recovered", recoveries=self.recoveries,
                          local_backlog=self.local.queued)  # fmt: skip
        self._on_up()
        self.changed()

    def _still_down(self, exc: BackendUnavailable) -> None:
        """The probe failed: the reason follows what it meets now. Through a Sentinel failover
        that moves on from the lost connection that marked Redis down: no primary while the
        sentinels elect one, then too few replicas confirming on the new primary."""
        if exc.message == self.down_reason:
            return
        self.down_reason = exc.message
        # Each new reason once per interval, apart from the line that marked Redis down.
        self._repeats.log("warning", "redis_down", key=exc.message, op="probe",
                          error=exc.message, failovers=self.failovers)  # fmt: skip
        self.changed()

    def changed(self) -> None:
        """Wake every wait_until: the state changed."""
        self._changed.set()
        self._changed = asyncio.Event()
        # The reconciliation lock is never renewed here: a reconciliation that starts after a
        # change must still wait for one that started before it (see _reconciling).

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds, re-checking at each change of state."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def degraded_s(self) -> float:
        """Seconds served from the local fallback since the start, the ongoing outage included."""
        ongoing = 0.0 if self._degraded_since is None else time.monotonic() - self._degraded_since
        return round(self._degraded_total + ongoing, 3)

    # -- the probe and the watch -------------------------------------------------------------------

    async def _probe_until_up(self) -> None:
        """Probe Redis with backoff until it takes writes probe_successes times in a row; then
        reconcile and hand back to Redis. The backoff carries over from a recent flap (see
        mark_down)."""
        successes = 0
        while not self._closing.is_set():
            # The confirming write follows shortly: after a long outage the backoff is at its
            # maximum, and waiting that long again would only delay the recovery.
            delay = self.probe_delay_s if successes == 0 else self.probe_initial_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
                return
            try:
                await self.redis.start()  # loads scripts when Redis was never reached
                await self.redis.probe()
                successes += 1
                if successes < self.probe_successes:
                    continue
                lost = await self.redis.check_generation()
                if lost is not None:
                    self._report_data_loss(lost)
                await self.reconcile()
            except BackendUnavailable as exc:
                self._still_down(exc)
                successes = 0
                self.probe_delay_s = min(self.probe_delay_s * 2, self.probe_max_s)
                continue
            except Exception:
                # Not an outage we know (a bug, or an error reply we did not expect): keep
                # probing rather than stay on the local queue for good.
                self._repeats.log("error", "redis_probe_failed", exc_info=True)
                successes = 0
                self.probe_delay_s = min(self.probe_delay_s * 2, self.probe_max_s)
                continue
            self._mark_up()
            return

    async def _watch(self) -> None:
        """While Redis serves, check its generation marker every interval.

        A Redis that restarts quickly never fails a call (the client reconnects), so only the
        marker shows that it came back without its data; the check also notices an idle outage.
        """
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.watch_interval_s)
                return
            if not self.up:
                continue  # the probe is in charge until Redis answers again
            try:
                lost = await self.redis.check_generation()
            except BackendUnavailable as exc:
                self.mark_down(exc, "watch")
                continue
            if lost is not None:
                self._report_data_loss(lost)

    def _report_data_loss(self, why: str) -> None:
        message = f"redis came back without its data ({why}): requests it held are gone"
        self.data_lost.append(message)
        log.error("redis_data_lost", reason=why)
        self.changed()

    # -- reconciliation -------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Settle which copy of each uncertain enqueue is the real one, before serving again."""
        async with self._reconciling:
            await self._reconcile_each()

    async def _reconcile_each(self) -> None:
        for queue_id in self.local.uncertain_ids():
            remote = await self.redis.status(queue_id)
            if remote is not None:
                if await self.local.drop_queued(queue_id):
                    log.info("duplicate_dropped", queue_id=queue_id, kept="redis")
                    continue
                if await self.redis.discard_queued(queue_id):
                    log.info("duplicate_dropped", queue_id=queue_id, kept="local")
                else:
                    # Both copies were handed out: at-least-once delivery covers this case.
                    log.warning("duplicate_delivery_possible", queue_id=queue_id)
            await self.local.resolve_uncertain(queue_id)
