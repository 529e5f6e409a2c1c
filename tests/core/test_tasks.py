"""core.tasks: a caller's cancellation is never absorbed while it waits for tasks to end."""

from __future__ import annotations

import asyncio

import pytest

from squadbus.core.tasks import cancel_and_wait, wait_ended


def slow_to_end(ended: list[str], name: str, delay: float = 0.2) -> asyncio.Task[None]:
    """A task that, once cancelled, needs ``delay`` seconds to clean up (as a handler settling its delivery)."""

    async def run() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(delay)
            ended.append(name)
            raise

    return asyncio.create_task(run())


async def test_tasks_end_before_it_returns() -> None:
    ended: list[str] = []
    tasks = [slow_to_end(ended, "a", 0.05), slow_to_end(ended, "b", 0.1)]
    await asyncio.sleep(0)
    await cancel_and_wait(*tasks, None)
    assert sorted(ended) == ["a", "b"] and all(task.done() for task in tasks)


async def test_a_cancelled_caller_is_cancelled_not_absorbed() -> None:
    ended: list[str] = []
    inner = slow_to_end(ended, "inner", 0.5)
    await asyncio.sleep(0)
    closing = asyncio.create_task(cancel_and_wait(inner))
    await asyncio.sleep(0.05)  # closing now waits for inner's clean-up
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closing.cancelled() and ended == ["inner"]  # it ended before the caller's cancel came through


async def test_wait_for_a_close_times_out() -> None:
    ended: list[str] = []
    inner = slow_to_end(ended, "inner", 1.0)
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cancel_and_wait(inner), 0.1)
    await asyncio.wait([inner])


async def test_wait_ended_cancels_what_runs_when_the_caller_is_cancelled() -> None:
    running = asyncio.create_task(asyncio.sleep(3600))
    waiting = asyncio.create_task(wait_ended(running))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert running.cancelled()


async def test_a_task_that_failed_raises_its_error() -> None:
    async def fail() -> None:
        raise ValueError("broken")

    failed = asyncio.create_task(fail())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await wait_ended(failed, None)
