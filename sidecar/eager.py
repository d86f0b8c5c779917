"""Start a coroutine now, inside the caller, and let a task run the rest only if it suspends.

Python 3.12's eager task factory does this for every task; on 3.11 it is done by hand where it
pays: a step that can finish (or reach its first write) at once should not wait for the next
loop pass. The first step runs in the caller's task, so it must not enter asyncio.timeout or
read asyncio.current_task(): whatever it waits on after its first suspension runs in the task.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator


@types.coroutine
def _pass_up(waiting: object) -> Generator[object, None, None]:
    """Yield one value to the task that awaits this, as a coroutine it runs would."""
    yield waiting


def first_step(coro: Coroutine[object, None, None]) -> tuple[bool, object]:
    """Run coro up to its first suspension: (True, None) when it ended, else (False, what it
    waits on). An exception it raises in this step propagates to the caller."""
    try:
        return False, coro.send(None)
    except StopIteration:
        return True, None


async def resume(coro: Coroutine[object, None, None], waiting: object) -> None:
    """Run coro, suspended in its first step on `waiting`, to its end in the current task.

    A trampoline: whatever coro yields (the future it waits on, or None for one loop pass)
    is yielded up to this task, which waits on it as it would for coro itself; then coro is
    resumed and reads the future's outcome itself. What the task throws in (its
    cancellation) is thrown into coro, so coro is cancelled as its own task would be.
    """
    try:
        while True:
            try:
                await _pass_up(waiting)
            except BaseException as exc:  # thrown into this task: coro's to handle
                waiting = coro.throw(exc)
            else:
                waiting = coro.send(None)
    except StopIteration:
        pass


def start(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[object, None, None]
) -> asyncio.Task[None] | None:
    """Run coro's first step now; the task that runs the rest, or None when it ended at once."""
    ended, waiting = first_step(coro)
    if ended:
        return None
    return loop.create_task(resume(coro, waiting))
