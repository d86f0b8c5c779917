"""Concurrent single enqueues on one AsyncClient, sent as one batch per loop pass.

A service that shares one AsyncClient among its tasks (the README's advice) makes many
`enqueue` calls at once. Each would cost a frame, a request and a reply of its own; folded,
the daemon handles one request of many items, which costs it a fraction per item (bench: an
enqueue batch of 64 costs the daemon about a third of 64 single enqueues). Every caller still
gets its own result or its own error:

- the batch stores all its items or none (protocol.md 8.2), and every item is named by the
  client, so when the daemon refuses the batch (one payload too large, the queue full, ...),
  each item is sent again alone and its caller gets what it alone would have got;
- when the connection fails under the batch, every caller gets that error, as each would
  have alone (the client already resent the batch once where that is safe);
- a batch stays small (FOLD_MAX_ITEMS, FOLD_MAX_BYTES) and large payloads go alone, so a
  folded frame never approaches the daemon's frame limit. Should a daemon configured with a
  limit below FOLD_MAX_BYTES refuse one (frame_too_large), this client stops folding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar import eager
from sidecar.client_conn import observe
from sidecar.errors import FrameTooLarge, InternalError, SidecarError, SidecarUnavailable
from sidecar.protocol import EnqueuedItem, EnqueueItem

# A folded batch holds at most this many items, and at most this many payload bytes; a payload
# larger than FOLD_ITEM_MAX_BYTES is always sent alone.
FOLD_MAX_ITEMS = 32
FOLD_MAX_BYTES = 32 * 1024
FOLD_ITEM_MAX_BYTES = 4 * 1024

SendMany = Callable[[list[EnqueueItem]], Awaitable[list[EnqueuedItem]]]


class EnqueueFold:
    """Gathers single enqueues; sends them as one `enqueue` at the end of the loop pass (or
    once FOLD_MAX_ITEMS / FOLD_MAX_BYTES are reached)."""

    def __init__(self, send_many: SendMany) -> None:
        self._send_many = send_many
        self.enabled = True
        self._items: list[EnqueueItem] = []
        self._futures: list[asyncio.Future[EnqueuedItem]] = []
        self._bytes = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def takes(self, item: EnqueueItem) -> bool:
        """Whether item may be folded (small enough, and folding is on)."""
        return self.enabled and len(item.payload) <= FOLD_ITEM_MAX_BYTES

    async def enqueue(self, item: EnqueueItem) -> EnqueuedItem:
        """Send item with the others of this loop pass; its own result or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EnqueuedItem] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        self._bytes += len(item.payload)
        if len(self._items) >= FOLD_MAX_ITEMS or self._bytes >= FOLD_MAX_BYTES:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_scheduled)
        return await future

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self._flush()

    def _flush(self) -> None:
        items, futures = self._items, self._futures
        if not items:
            return
        self._items, self._futures, self._bytes = [], [], 0
        # Eagerly: the batch's frame joins the connection's outbox now, not a pass later.
        task = eager.start(asyncio.get_running_loop(), self._send(items, futures))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(observe)

    async def _send(
        self, items: list[EnqueueItem], futures: list[asyncio.Future[EnqueuedItem]]
    ) -> None:
        live = [(item, fut) for item, fut in zip(items, futures, strict=True) if not fut.done()]
        try:
            await self._answer(live)
        finally:
            # Whatever went wrong above, no caller may wait forever on its future.
            _fail_all(live, InternalError("the batched enqueue ended without a result"))

    async def _answer(self, live: list[tuple[EnqueueItem, asyncio.Future[EnqueuedItem]]]) -> None:
        if not live:
            return  # every caller was cancelled before the batch left: nothing to send
        if len(live) == 1:
            await self._alone(*live[0])
            return
        try:
            results = await self._send_many([item for item, _ in live])
        except SidecarUnavailable as err:
            # The connection failed under the batch (after the client's one resend, where
            # that is safe): every caller's outcome is unknown, as it would be alone.
            _fail_all(live, err)
            return
        except FrameTooLarge:
            self.enabled = False  # this daemon's frame limit is below FOLD_MAX_BYTES
            await asyncio.gather(*(self._alone(item, fut) for item, fut in live))
            return
        except SidecarError:
            # Refused whole, so nothing was stored (all or none): each alone gets its own
            # answer (the same queue_id makes a resend after an unknown outcome harmless).
            await asyncio.gather(*(self._alone(item, fut) for item, fut in live))
            return
        except BaseException:
            for _, fut in live:  # cancelled: so are the calls that wait on it
                fut.cancel()
            raise
        if len(results) != len(live):
            _fail_all(live, InternalError(f"{len(results)} results for {len(live)} items"))
            return
        for (_, fut), result in zip(live, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _alone(self, item: EnqueueItem, fut: asyncio.Future[EnqueuedItem]) -> None:
        try:
            [result] = await self._send_many([item])
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        except BaseException:
            fut.cancel()
            raise
        else:
            if not fut.done():
                fut.set_result(result)

    async def close(self) -> None:
        """Wait for the batches in flight (the connection closing ends them)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _fail_all(live: list[tuple[Any, asyncio.Future[EnqueuedItem]]], exc: Exception) -> None:
    for _, fut in live:
        if not fut.done():
            fut.set_exception(exc)
