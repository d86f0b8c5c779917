"""The operators' ops: list (with its cursor), requeue, purge, and status with a payload.

Validation that depends on the settings (payloads allowed, force) and the cursor happen here,
once, above every store; the stores list, requeue and purge (sidecar.queue.base.QueueStore).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import replace

import msgspec
import structlog

from sidecar.errors import BadCursor, Forbidden, InvalidMessage, InvalidState, NotFound
from sidecar.models import (
    DEAD_LIST_STATUSES,
    FINISHED_LIST_STATUSES,
    ListPosition,
    ListQuery,
    ListStatus,
    QueuedRequest,
)
from sidecar.protocol import (
    List,
    ListResult,
    Purge,
    PurgeResult,
    RequestDetail,
    Requeue,
    RequeueResult,
    Status,
)
from sidecar.queue.base import QueueStore

log = structlog.get_logger("sidecar.ops")
_encoder = msgspec.msgpack.Encoder()

_STATUSES = ", ".join(s.value for s in ListStatus)
_ORDERS = ("oldest", "newest")
# The checksum's length: 96 bits of an HMAC-SHA256 leave no room to forge or damage a cursor
# unnoticed, and keep it short enough to paste.
_MAC_BYTES = 12
_CURSOR_VERSION = 1
_cursor_body = msgspec.msgpack.Encoder()
_CursorBody = tuple[int, bytes, str, str, int | None, str, str, float, str]


def list_status(value: str, allowed: frozenset[ListStatus] | None = None) -> ListStatus:
    """The ListStatus named by value; InvalidMessage naming the choices otherwise."""
    try:
        status = ListStatus(value)
    except ValueError:
        status = None
    choices = _STATUSES if allowed is None else ", ".join(sorted(s.value for s in allowed))
    if status is None or (allowed is not None and status not in allowed):
        raise InvalidMessage(
            f"unknown status {value!r} here; one of: {choices}",
            {"status": value, "allowed": choices.split(", ")},
        )
    return status


class CursorCodec:
    """Opaque list cursors: where a page ended, the filters it was made for, this daemon's
    identity and a checksum (HMAC with a key made at start, so a cursor is valid only on the
    daemon that made it, until it restarts)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        # Public, inside the checksummed body: tells another daemon's cursor from a damaged one.
        self._tag = hashlib.sha256(b"sidecar-cursor:" + self._key).digest()[:6]

    def encode(self, req: List, pos: ListPosition) -> str:
        body: _CursorBody = (
            _CURSOR_VERSION, self._tag, req.status, req.order, req.priority, req.queue,
            pos.store, pos.score, pos.queue_id,
        )  # fmt: skip
        raw = _cursor_body.encode(body)
        mac = hmac.digest(self._key, raw, "sha256")[:_MAC_BYTES]
        return base64.urlsafe_b64encode(raw + mac).rstrip(b"=").decode()

    def decode(self, req: List, text: str) -> ListPosition:
        """The position a cursor carries; BadCursor if it is not this daemon's, damaged, or
        made for other filters."""
        try:
            blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            raw, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
            body = msgspec.msgpack.decode(raw, type=_CursorBody)
        except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
            raise _damaged() from exc
        if body[0] != _CURSOR_VERSION or body[1] != self._tag:
            raise BadCursor(
                "the cursor was made by another daemon (or by this one before it restarted); "
                "list again without a cursor",
                {"reason": "other_daemon"},
            )
        if not hmac.compare_digest(mac, hmac.digest(self._key, raw, "sha256")[:_MAC_BYTES]):
            raise _damaged()
        _, _, status, order, priority, queue, store, score, queue_id = body
        if (status, order, priority, queue) != (req.status, req.order, req.priority, req.queue):
            raise BadCursor(
                f"the cursor was made for status {status}, order {order}, priority "
                f"{priority}, queue {queue}: send the same filters with it",
                {"reason": "other_filters"},
            )
        return ListPosition(store=store, score=score, queue_id=queue_id)


def _damaged() -> BadCursor:
    return BadCursor(
        "the cursor is damaged (not as this daemon made it); list again without a cursor",
        {"reason": "damaged"},
    )


def detail(store: str, rec: QueuedRequest, payload: bool) -> RequestDetail:
    """A record as status and list answer it: metadata, store, and its payload if asked."""
    out = RequestDetail(
        queue_id=rec.queue_id,
        status=rec.status.value,
        priority=rec.priority,
        attempts=rec.attempts,
        max_attempts=rec.max_attempts,
        created_at=rec.created_at,
        expires_at=rec.expires_at,
        updated_at=rec.updated_at,
        size_bytes=rec.size_bytes,
        lease_expires_at=rec.lease_expires_at,
        reason=rec.reason,
        store=store,
    )
    if payload and rec.payload is not None:
        out.payload = msgspec.Raw(rec.payload)
    return out


class OperatorOps:
    """list, requeue, purge and status; payloads allowed or not by SIDECAR_OPS_PAYLOADS."""

    def __init__(
        self,
        *,
        payloads_allowed: bool,
        cursor_key: bytes | None = None,
        max_reply_bytes: int | None = None,
    ) -> None:
        """max_reply_bytes: the most bytes of items in a list reply (the daemon's max frame
        bytes less the reply's envelope); None: no bound."""
        self.payloads_allowed = payloads_allowed
        self.max_reply_bytes = max_reply_bytes
        self.cursors = CursorCodec(cursor_key)

    def _check_payload(self, asked: bool) -> None:
        if asked and not self.payloads_allowed:
            raise Forbidden(
                "payloads are not shown here (SIDECAR_OPS_PAYLOADS=false); ask without payload",
                {"setting": "SIDECAR_OPS_PAYLOADS"},
            )

    async def status(self, req: Status, queue: QueueStore) -> RequestDetail:
        self._check_payload(req.payload)
        rec = await queue.status(req.queue_id)
        if rec is None:
            raise NotFound(
                f"no request {req.queue_id} (never enqueued, or its retention ended)",
                {"queue_id": req.queue_id},
            )
        return detail(queue.holder(req.queue_id), rec, req.payload)

    async def list_page(self, req: List, queue: QueueStore) -> ListResult:
        status = list_status(req.status)
        if req.order not in _ORDERS:
            raise InvalidMessage(
                f"unknown order {req.order!r}; one of: oldest, newest", {"order": req.order}
            )
        self._check_payload(req.payload)
        after = None if req.cursor is None else self.cursors.decode(req, req.cursor)
        query = ListQuery(
            status=status,
            priority=req.priority,
            newest=req.order == "newest",
            limit=req.limit,
            payload=req.payload,
            max_bytes=self.max_reply_bytes,
        )
        page = await queue.list_records(query, after)
        items = [detail(store, rec, req.payload) for store, rec in page.items]
        fit = self._fitting(items)
        while fit < len(items):
            # Past the byte bound: the same page asked again with as many as fit (at least
            # one), so its cursor resumes after the last item returned, in every store.
            query = replace(query, limit=fit)
            page = await queue.list_records(query, after)
            items = [detail(store, rec, req.payload) for store, rec in page.items]
            fit = len(items) if fit == 1 else self._fitting(items)
        return ListResult(
            items=items,
            next_cursor=None if page.next is None else self.cursors.encode(req, page.next),
        )

    def _fitting(self, items: list[RequestDetail]) -> int:
        """How many of items, from the first, fit in max_reply_bytes (at least one)."""
        if self.max_reply_bytes is None:
            return len(items)
        used = 0
        for i, item in enumerate(items):
            used += len(_encoder.encode(item))
            if used > self.max_reply_bytes:
                return max(1, i)
        return len(items)

    async def requeue(self, req: Requeue, queue: QueueStore, peer_uid: int | None) -> RequeueResult:
        if req.queue_id is not None:
            ids = [req.queue_id]
        else:
            status = list_status(req.status, DEAD_LIST_STATUSES)
            ids = await self._dead_ids(queue, status, req.priority, req.limit)
        requeued: list[str] = []
        unchanged: list[str] = []
        while ids:
            try:
                outcome = await queue.requeue_dead(ids)
            except (NotFound, InvalidState) as exc:
                gone = exc.details.get("queue_id")
                if req.queue_id is not None or gone not in ids:
                    raise
                # By filter: a dead letter listed a moment ago that left since (its retention
                # ended, a trim at the cap, another requeue) is skipped, reported unchanged;
                # the store changed nothing, so the others are asked again.
                ids.remove(gone)
                unchanged.append(gone)
                continue
            requeued, unchanged = outcome.requeued, outcome.unchanged + unchanged
            break
        if requeued:
            log.info(
                "dead_letters_requeued", count=len(requeued), peer_uid=peer_uid,
                queue_id=req.queue_id, status=req.status, priority=req.priority,
            )  # fmt: skip
        return RequeueResult(requeued=len(requeued), ids=requeued, unchanged=unchanged)

    async def _dead_ids(
        self, queue: QueueStore, status: ListStatus, priority: int | None, limit: int
    ) -> list[str]:
        """Up to limit dead letters of a status, oldest first, page by page."""
        ids: list[str] = []
        after: ListPosition | None = None
        while len(ids) < limit:
            query = ListQuery(status=status, priority=priority, limit=min(1000, limit - len(ids)))
            page = await queue.list_records(query, after)
            ids.extend(rec.queue_id for _, rec in page.items)
            if page.next is None:
                break
            after = page.next
        return ids[:limit]

    async def purge(self, req: Purge, queue: QueueStore, peer_uid: int | None) -> PurgeResult:
        status = list_status(req.status)
        if status not in FINISHED_LIST_STATUSES and not req.force:
            raise InvalidState(
                f"purging {status.value} requests drops work that was never done: send force "
                "to do it anyway (sidecar purge --force)",
                {"status": status.value, "force": False},
            )
        purged = await queue.purge_records(status, req.older_than_s)
        log.warning(
            "records_purged", status=status.value, older_than_s=req.older_than_s,
            force=req.force, count=purged, peer_uid=peer_uid,
        )  # fmt: skip
        return PurgeResult(purged=purged)
