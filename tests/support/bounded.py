"""Bounded waits for tests that run tasks and threads beside the test body.

A test's background tasks must end when the test does, and their failures must not vanish:
`gather(..., return_exceptions=True)` both waits without a bound and swallows what went
wrong (pytest-timeout's own exception included, when it lands inside a task). A thread run
with `asyncio.to_thread` is joined when the event loop closes, so one that never returns
hangs the suite after its test has already failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

# How long a cancelled task may take to finish: a task that outlives this swallows
# cancellation, which is a bug of its own.
CANCEL_GRACE_S = 5.0


def describe(tasks: Iterable[asyncio.Task[object]]) -> str:
    """Each task's name and the stack it waits in: what a hang report needs."""
    out = io.StringIO()
    for task in tasks:
        out.write(f"--- {task.get_name()}: {task.get_coro()!r}\n")
        task.print_stack(file=out)
    return out.getvalue()


async def settle(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait up to timeout_s for tasks to end, cancel the rest, re-raise what they raised.

    Raises a BaseExceptionGroup of every unexpected exception the tasks raised (cancellation
    aside), else AssertionError naming the tasks that had to be cancelled, with their stacks.
    """
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=timeout_s)
    stacks = describe(late)
    for task in late:
        task.cancel()
    if late:
        _, stuck = await asyncio.wait(late, timeout=CANCEL_GRACE_S)
        if stuck:
            raise AssertionError(f"tasks ignore cancellation:\n{describe(stuck)}")
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if errors:
        raise BaseExceptionGroup("background tasks failed", [e for e in errors if e])
    if late:
        raise AssertionError(f"tasks still running after {timeout_s} s:\n{stacks}")


async def in_thread(fn: Callable[..., T], *args: object, timeout_s: float) -> T:
    """fn(*args) in a daemon thread, awaited for at most timeout_s (TimeoutError past it).

    Not asyncio.to_thread: its executor is joined when the loop closes, so a call that never
    returns would hang the suite in teardown. A daemon thread is never joined; fn must still
    bound its own work, since the thread cannot be stopped from outside.
    """
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        # InvalidStateError: the wait timed out (and cancelled `done`); the test has failed.
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting test, not lost in the thread
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                done.set_exception(exc)
        else:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                done.set_result(result)

    threading.Thread(target=run, name=f"in_thread-{fn.__name__}", daemon=True).start()
    async with asyncio.timeout(timeout_s):
        # wrap_future drops the outcome if the loop is closed by then (the test timed out).
        return await asyncio.wrap_future(done)
