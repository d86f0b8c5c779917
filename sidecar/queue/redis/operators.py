"""RedisQueue's side of the operators' ops: list (lua/list.lua), requeue of dead letters
(lua/requeue.lua) and purge (lua/purge.lua). Each page or batch is one script run over the
sorted sets: O(log N + page), never SCAN or KEYS."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from sidecar.errors import InvalidState, NotFound
from sidecar.models import (
    ListPosition,
    ListQuery,
    ListStatus,
    RecordPage,
    RequeueOutcome,
)
from sidecar.queue.base import Clock
from sidecar.queue.redis.keys import ScriptCode, decode_record
from sidecar.queue.redis.wire import Arg

# Records one purge script run forgets at most: a run blocks Redis while it works.
PURGE_BATCH = 500


class _Store(Protocol):
    name: str
    _clock: Clock

    def _req(self, queue_id: str) -> tuple[str]: ...

    def _call(
        self, script: str, now: float, *args: Arg, keys: tuple[str, ...] = ()
    ) -> asyncio.Future[list[Any]]: ...


class RedisOperatorSide:
    """RedisQueue's list_records, requeue_dead and purge_records (QueueStore)."""

    async def list_records(
        self: _Store, query: ListQuery, after: ListPosition | None
    ) -> RecordPage:
        """One page from the status's sorted set (lua/list.lua)."""
        reply = await self._call(
            "list", self._clock(), query.status.value,
            "" if query.priority is None else query.priority,
            "1" if query.newest else "0", query.limit,
            "" if after is None else repr(after.score), "" if after is None else after.queue_id,
            "1" if query.payload else "0", "" if query.max_bytes is None else query.max_bytes,
        )  # fmt: skip
        _, score, queue_id, *records = reply
        items = [(self.name, decode_record(pairs)) for pairs in records]
        nxt = None
        if score:
            nxt = ListPosition(self.name, float(score), _text(queue_id))
        return RecordPage(items=items, next=nxt)

    async def requeue_dead(self: _Store, queue_ids: Sequence[str]) -> RequeueOutcome:
        """The dead letters back to queued in one script run: all checked before any changes,
        so not_found or invalid_state leaves every one as it was (lua/requeue.lua)."""
        ids = list(dict.fromkeys(queue_ids))
        reply = await _requeue_run(self, ids, check_only=False)
        requeued: list[str] = []
        unchanged: list[str] = []
        for qid, what in zip(ids, reply[1:], strict=True):
            (requeued if _text(what) == "requeued" else unchanged).append(qid)
        return RequeueOutcome(requeued=requeued, unchanged=unchanged)

    async def check_requeue(self: _Store, queue_ids: Sequence[str]) -> None:
        """Raise what requeue_dead would raise for these ids, changing nothing."""
        await _requeue_run(self, list(dict.fromkeys(queue_ids)), check_only=True)

    async def purge_records(self: _Store, status: ListStatus, older_than_s: float | None) -> int:
        """Batches of lua/purge.lua until the status's index is done."""
        now = self._clock()
        cutoff: Arg = "" if older_than_s is None else now - older_than_s
        purged = offset = 0
        while True:
            _, n, examined, kept = await self._call(
                "purge", now, status.value, cutoff, PURGE_BATCH, offset
            )
            purged += int(n)
            offset += int(kept)
            if int(examined) < PURGE_BATCH:
                return purged


async def _requeue_run(self: _Store, ids: list[str], *, check_only: bool) -> list[Any]:
    if not ids:
        return [ScriptCode.OK]
    keys = tuple(k for qid in ids for k in self._req(qid))
    reply = await self._call("requeue", self._clock(), "1" if check_only else "0", *ids, keys=keys)
    if reply[0] == ScriptCode.NOT_FOUND:
        qid = _text(reply[1])
        raise NotFound(f"no request {qid}", {"queue_id": qid})
    if reply[0] == ScriptCode.INVALID_STATE:
        status, qid = _text(reply[1]), _text(reply[2])
        raise InvalidState(
            f"request {qid} is {status}; only a dead letter (failed for good or "
            "expired, payload kept) can be requeued",
            {"queue_id": qid, "status": status},
        )
    return reply


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
