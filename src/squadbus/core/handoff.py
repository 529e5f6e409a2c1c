"""A FIFO from a consumer's reader to its handler workers, lighter than ``asyncio.Queue``.

The reader bounds what it reads itself, so ``put`` never blocks and there is
no ``maxsize``, ``task_done`` or ``join`` bookkeeping: per message this is a
deque append and pop, and a wake-up only when a worker is waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """Items in arrival order; ``take()`` without waiting, ``await get()`` when empty."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Append ``item`` and wake one waiting worker, if any."""
        self._items.append(item)
        if self._waiters:
            self._wake_one()

    def take(self) -> T | None:
        """The oldest item, or None when empty."""
        return self._items.popleft() if self._items else None

    async def get(self) -> T:
        """The oldest item, waiting for one if empty."""
        items = self._items
        while not items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Woken and cancelled at once: hand the wake-up on so the item is not left waiting.
                if waiter.done() and not waiter.cancelled() and items:
                    self._wake_one()
                raise
        return items.popleft()

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def drain(self) -> list[T]:
        """Remove and return every item."""
        items = list(self._items)
        self._items.clear()
        return items
