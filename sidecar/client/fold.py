"""Concurrent single calls on one AsyncClient, sent as one request per loop pass.

A call made while none of its kind is in flight leaves at once, alone (Nagle's rule): folding
pays only when calls overlap, and a lone call must not wait a loop pass and a task for it.

A service that shares one AsyncClient among its tasks (as docs/client.md advises) makes many
`enqueue` calls at once, and a worker many `complete` calls. Each would cost a frame, a request
and a reply of its own; folded, the daemon handles one request of many items, which costs it a
fraction per item (bench: an enqueue batch of 64 costs the daemon about a third of 64 single
enqueues). Every caller still gets its own result or its own error.

Enqueues (EnqueueFold) go as one `enqueue` batch:

- the batch stores all its items or none (protocol.md 8.2), and every item is named by the
  client, so when the daemon refuses the batch (one payload too large, the queue full, ...),
  each item is sent again alone and its caller gets what it alone would have got;
- when the connection fails under the batch, every caller gets that error, as each would
  have alone (the client already resent the batch once where that is safe);
- a batch stays small (FOLD_MAX_ITEMS, FOLD_MAX_BYTES) and large payloads go alone, so a
  folded frame never approaches the daemon's frame limit. Should a daemon configured with a
  limit below FOLD_MAX_BYTES refuse one (frame_too_large), this client stops folding.

Completes (CompleteFold) go as one `complete_many` (protocol.md 8.13), whose items are settled
each on its own: each caller gets its item's info, or raises its item's error. A request the
daemon refuses whole (an older daemon that knows no complete_many, say) is sent again as
single completes, which is harmless: a repeated complete changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

from sidecar import eager
from sidecar.client.connection import observe
from sidecar.errors import (
    FrameTooLarge,
    InternalError,
    SidecarError,
    SidecarUnavailable,
    UnknownOp,
    error_from_code,
)
from sidecar.protocol import (
    CompleteItem,
    CompleteManyResult,
    EnqueuedItem,
    EnqueueItem,
    RequestInfo,
)

# A folded request holds at most this many items, and at most this many payload bytes; a
# payload larger than FOLD_ITEM_MAX_BYTES is always sent alone.
FOLD_MAX_ITEMS = 32
FOLD_MAX_BYTES = 32 * 1024
FOLD_ITEM_MAX_BYTES = 4 * 1024

I = TypeVar("I")  # noqa: E741 - an item, as the caller made it
R = TypeVar("R")  # its caller's result

SendMany = Callable[[list[EnqueueItem]], Awaitable[list[EnqueuedItem]]]
SendCompletes = Callable[[list[CompleteItem]], Awaitable[CompleteManyResult]]
SendComplete = Callable[[CompleteItem], Awaitable[RequestInfo]]


class _PassFold(Generic[I, R]):
    """Gathers single calls; sends them as one request at the end of the loop pass (or once
    FOLD_MAX_ITEMS / FOLD_MAX_BYTES are reached). A subclass says how a group is sent."""

    def __init__(self) -> None:
        self.enabled = True
        self._items: list[I] = []
        self._futures: list[asyncio.Future[R]] = []
        self._bytes = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests of this kind sent and not yet answered (single or folded).
        self._in_flight = 0

    @property
    def idle(self) -> bool:
        """None of this kind in flight or gathering: a call now should leave at once, alone
        (Nagle's rule; bench: a lone call through the fold cost about 60 µs more than sent
        straight). Only calls made while one is out gather, to leave at the pass's end."""
        return not self._in_flight and not self._items

    @contextlib.contextmanager
    def out(self) -> Iterator[None]:
        """Count a call sent straight (while idle) as in flight until it is answered."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def call(self, item: I, size: int = 0) -> R:
        """Send item with the others of this loop pass; its own result or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        self._bytes += size
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
        # Eagerly: the request's frame joins the connection's outbox now, not a pass later.
        task = eager.start(asyncio.get_running_loop(), self._send(items, futures))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(observe)

    async def _send(self, items: list[I], futures: list[asyncio.Future[R]]) -> None:
        live = [(item, fut) for item, fut in zip(items, futures, strict=True) if not fut.done()]
        self._in_flight += 1
        try:
            if len(live) == 1:
                await self._alone(*live[0])
            elif live:  # else every caller was cancelled before the request left
                await self._answer(live)
        except BaseException:
            for _, fut in live:  # cancelled: so are the calls that wait on it
                fut.cancel()
            raise
        finally:
            self._in_flight -= 1
            # Whatever went wrong above, no caller may wait forever on its future.
            _fail_all(live, InternalError("the folded request ended without a result"))

    async def _answer(self, live: list[tuple[I, asyncio.Future[R]]]) -> None:
        raise NotImplementedError

    async def _one(self, item: I) -> R:
        """item sent as the single call its caller made."""
        raise NotImplementedError

    async def _alone(self, item: I, fut: asyncio.Future[R]) -> None:
        try:
            result = await self._one(item)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(result)

    async def _each_alone(self, live: list[tuple[I, asyncio.Future[R]]]) -> None:
        await asyncio.gather(*(self._alone(item, fut) for item, fut in live))

    async def close(self) -> None:
        """Wait for the requests in flight (the connection closing ends them)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class EnqueueFold(_PassFold[EnqueueItem, EnqueuedItem]):
    """Single enqueues of one loop pass, sent as one `enqueue` batch."""

    def __init__(self, send_many: SendMany) -> None:
        super().__init__()
        self._send_many = send_many

    def takes(self, item: EnqueueItem) -> bool:
        """Whether item may be folded (small enough, and folding is on)."""
        return self.enabled and len(item.payload) <= FOLD_ITEM_MAX_BYTES

    async def _one(self, item: EnqueueItem) -> EnqueuedItem:
        [result] = await self._send_many([item])
        return result

    async def _answer(self, live: list[tuple[EnqueueItem, asyncio.Future[EnqueuedItem]]]) -> None:
        try:
            results = await self._send_many([item for item, _ in live])
        except SidecarUnavailable as err:
            # The connection failed under the batch (after the client's one resend, where
            # that is safe): every caller's outcome is unknown, as it would be alone.
            _fail_all(live, err)
            return
        except FrameTooLarge:
            self.enabled = False  # this daemon's frame limit is below FOLD_MAX_BYTES
            await self._each_alone(live)
            return
        except SidecarError:
            # Refused whole, so nothing was stored (all or none): each alone gets its own
            # answer (the same queue_id makes a resend after an unknown outcome harmless).
            await self._each_alone(live)
            return
        if len(results) != len(live):
            _fail_all(live, InternalError(f"{len(results)} results for {len(live)} items"))
            return
        for (_, fut), result in zip(live, results, strict=True):
            if not fut.done():
                fut.set_result(result)


class CompleteFold(_PassFold[CompleteItem, RequestInfo]):
    """Single completes of one loop pass, sent as one `complete_many`."""

    def __init__(self, send_many: SendCompletes, send_one: SendComplete) -> None:
        super().__init__()
        self._send_many = send_many
        self._send_one = send_one

    async def _one(self, item: CompleteItem) -> RequestInfo:
        return await self._send_one(item)

    async def _answer(self, live: list[tuple[CompleteItem, asyncio.Future[RequestInfo]]]) -> None:
        try:
            got = await self._send_many([item for item, _ in live])
        except SidecarUnavailable as err:
            _fail_all(live, err)  # each caller's outcome is unknown, as it would be alone
            return
        except UnknownOp:
            self.enabled = False  # a daemon older than complete_many
            await self._each_alone(live)
            return
        except SidecarError:
            # Refused whole (shutting down, say): each alone gets its own answer; a complete
            # that did take effect answers the same info again.
            await self._each_alone(live)
            return
        if len(got.results) != len(live):
            _fail_all(live, InternalError(f"{len(got.results)} results for {len(live)} items"))
            return
        for (_, fut), one in zip(live, got.results, strict=True):
            if fut.done():
                continue
            if one.error is not None:
                body = one.error
                fut.set_exception(error_from_code(body.code, body.message, body.details))
            elif one.completed is not None:
                fut.set_result(one.completed)
            else:
                fut.set_exception(InternalError("a complete_many result with neither part"))


def _fail_all(live: list[tuple[Any, asyncio.Future[Any]]], exc: Exception) -> None:
    for _, fut in live:
        if not fut.done():
            fut.set_exception(exc)
