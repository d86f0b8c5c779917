"""The waits of tests/support/bounded.py: a stall or a task's failure is reported, never lost."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.support.bounded import in_thread, settle


async def _fail() -> None:
    raise ValueError("bug in a load task")


async def test_settle_reraises_what_a_task_raised() -> None:
    ok = asyncio.create_task(asyncio.sleep(0))
    bad = asyncio.create_task(_fail())
    with pytest.raises(ExceptionGroup) as info:
        await settle([ok, bad], 5.0)
    assert [str(e) for e in info.value.exceptions] == ["bug in a load task"]


async def test_settle_cancels_a_task_past_the_bound_and_names_where_it_waits() -> None:
    never = asyncio.Event()

    async def wait_forever() -> None:
        await never.wait()

    stuck = asyncio.create_task(wait_forever(), name="stuck-worker")
    with pytest.raises(AssertionError, match=r"still running after 0\.05 s") as info:
        await settle([stuck], 0.05)
    assert stuck.cancelled()
    assert "stuck-worker" in str(info.value)
    assert "await never.wait()" in str(info.value)  # the line the task waited at


async def test_settle_reports_a_task_that_swallows_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tests.support.bounded.CANCEL_GRACE_S", 0.05)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug settle() must report, not wait on forever

    task = asyncio.create_task(stubborn(), name="stubborn")
    try:
        with pytest.raises(AssertionError, match="ignore cancellation"):
            await settle([task], 0.05)
    finally:
        release.set()
        await task


async def test_in_thread_returns_the_value_and_raises_the_error() -> None:
    assert await in_thread(sum, [1, 2], timeout_s=5.0) == 3
    with pytest.raises(ZeroDivisionError):
        await in_thread(divmod, 1, 0, timeout_s=5.0)


async def test_in_thread_times_out_without_waiting_for_the_thread() -> None:
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError):
            await in_thread(release.wait, 30.0, timeout_s=0.05)
    finally:
        release.set()  # the daemon thread ends now; nothing joins it
