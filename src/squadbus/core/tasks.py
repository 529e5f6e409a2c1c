"""Ending the tasks a component started, without absorbing a cancellation of the caller.

``task.cancel()`` then ``with suppress(CancelledError): await task`` cannot
tell the task's own CancelledError (expected) from the caller's (someone
cancelled the ``close()`` that is waiting): it swallowed both, so a
cancelled close went on as if nothing had happened and
``asyncio.wait_for(x.close(), t)`` could not time out. These helpers wait
with ``asyncio.wait``, which never raises a task's outcome: the caller's
cancellation propagates (the tasks are cancelled, as awaiting them directly
would have done, and have ended when it does, so a ``finally`` after the
wait cleans up behind them: commits, requeues, closes a channel), and a
task that failed with another exception raises it as awaiting it did.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_ended(*tasks: asyncio.Future[Any] | None) -> None:
    """Wait until every task (None: skipped) has ended; re-raise the first one's exception other than a cancel.

    If the caller is cancelled meanwhile, the tasks still running are cancelled, and CancelledError propagates
    once they have ended (a second cancel of the caller stops that wait).
    """
    await _ended([task for task in tasks if task is not None], cancel=True)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel every task (None: skipped) and wait until each has ended (see :func:`wait_ended`).

    A caller cancelled meanwhile does not cancel them again: that would cut short the clean-up a task
    runs on its cancel (a handler nacking its delivery)."""
    waiting = [task for task in tasks if task is not None]
    for task in waiting:
        task.cancel()
    await _ended(waiting, cancel=False)


async def _ended(waiting: list[asyncio.Future[Any]], *, cancel: bool) -> None:
    if not waiting:
        return
    try:
        await asyncio.wait(waiting)
    except asyncio.CancelledError:
        if cancel:
            for task in waiting:
                task.cancel()
        if running := [task for task in waiting if not task.done()]:
            await asyncio.wait(running)
        raise
    for task in waiting:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
