"""A broker read the service must not wait on for long (``/metrics`` group figures, ``/v1/agents``' inboxes).

A read that overruns its bound is cancelled and left to unwind in the background (a driver may
need a moment to give its connection back); while ``MAX_UNWINDING`` such reads are still
unwinding, no new one starts, so a broker that stopped answering cannot pile up reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedRead(Generic[T]):
    """Runs reads of one kind, each bounded in time (module docstring)."""

    MAX_UNWINDING = 4

    def __init__(self) -> None:
        self._unwinding: set[asyncio.Future[T]] = set()

    async def run(self, read: Callable[[], Awaitable[T]], timeout: float) -> T:
        """``await read()``; raises TimeoutError when it took longer than ``timeout`` seconds or too
        many earlier reads are still unwinding."""
        if len(self._unwinding) >= self.MAX_UNWINDING:
            raise TimeoutError(f"{len(self._unwinding)} earlier reads are still unwinding")
        task = asyncio.ensure_future(read())
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:  # the client went away
            self._abandon(task)
            raise
        if task in done:
            return task.result()
        self._abandon(task)
        raise TimeoutError(f"no answer within {timeout:g} s")

    def _abandon(self, task: asyncio.Future[T]) -> None:
        task.cancel()
        self._unwinding.add(task)
        task.add_done_callback(self._unwound)

    def _unwound(self, task: asyncio.Future[T]) -> None:
        self._unwinding.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was reported as a timeout already
