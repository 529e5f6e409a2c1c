"""Members of a group: one delivery at a time, several at once, or batches."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from squadbus.backends.memory.group import GroupBuffer, MemoryDelivery
from squadbus.core.backend import BatchRawHandler, InFlight, RawHandler, batch_only, invoke, invoke_batch
from squadbus.core.batching import fill_until
from squadbus.core.envelope import Message

if TYPE_CHECKING:
    from squadbus.backends.memory.backend import MemoryBackend

_FAIRNESS_STREAK = 64


class MemorySubscription:
    """One member of a group, running its handler one delivery at a time."""

    def __init__(self, backend: MemoryBackend, group: GroupBuffer, handler: RawHandler) -> None:
        self._backend = backend
        self._group = group
        self._handler = handler
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._waiting = False

    @property
    def pattern(self) -> str:
        return self._group.pattern

    @property
    def group(self) -> str | None:
        return self._group.name

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"squadbus-memory-{self._group.name or 'ephemeral'}"
        )

    async def _next(self) -> tuple[Message, int, int] | None:
        """The next entry, waiting for one; None when closing."""
        group = self._group
        while not self._closing:
            item = group.take()
            if item is not None:
                return item
            await self._wait()
        return None

    async def _wait(self) -> None:
        """Wait until the group may have an entry (or :meth:`close` cancels the wait)."""
        group = self._group
        fut = group.entry_waiter()
        self._waiting = True
        try:
            await fut
        except asyncio.CancelledError:
            group.gave_up(fut)
            raise
        finally:
            self._waiting = False

    async def _handle(self, message: Message, attempt: int, gap: int) -> None:
        delivery = MemoryDelivery(message, attempt, self._group, gap)
        await invoke(self._handler, delivery, self._group.options)

    async def _run(self) -> None:
        if self._group.options.max_in_flight > 1:
            await self._run_concurrently(self._group.options.max_in_flight)
            return
        group, handler, options = self._group, self._handler, self._group.options
        streak = 0
        while not self._closing:
            item = group.take()
            if item is None:
                # Waiting inline, not in _next()/_wait(): an idle member then holds one future and no
                # coroutine of its own (measured: 2 fewer tracked objects per idle inbox).
                fut = group.entry_waiter()
                self._waiting = True
                try:
                    await fut
                except asyncio.CancelledError:
                    group.gave_up(fut)
                    raise
                finally:
                    self._waiting = False
                continue
            streak += 1
            if streak >= _FAIRNESS_STREAK:
                # Handlers that never suspend would otherwise starve the loop.
                streak = 0
                await asyncio.sleep(0)
            await invoke(handler, MemoryDelivery(item[0], item[1], group, item[2]), options)

    async def _run_concurrently(self, limit: int) -> None:
        inflight = InFlight(limit)
        try:
            while True:
                await inflight.slot()
                item = await self._next()
                if item is None:
                    inflight.give_back()
                    break
                inflight.start(self._handle(*item))
        finally:
            await inflight.finish()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        task = self._task
        if task is not None:
            if self._waiting:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._backend._remove_member(self)


class MemoryBatchSubscription(MemorySubscription):
    """A member that hands its handler batches: what is buffered, up to ``batch_size``,
    waiting at most ``max_wait`` after the first message for more."""

    def __init__(self, backend: MemoryBackend, group: GroupBuffer, handler: BatchRawHandler, max_wait: float) -> None:
        super().__init__(backend, group, batch_only)
        self._batch_handler = handler
        self._max_wait = max_wait

    async def _run(self) -> None:
        group, handler, options = self._group, self._batch_handler, self._group.options
        while not self._closing:
            first = group.take() or await self._next()
            if first is None:
                return
            items = [first]
            try:
                await self._fill(items, options.batch_size)
            except asyncio.CancelledError:
                group.give_back(items)  # closed while waiting for more
                raise
            deliveries = [MemoryDelivery(message, attempt, group, gap) for message, attempt, gap in items]
            await invoke_batch(handler, deliveries, options)

    async def _fill(self, items: list[tuple[Message, int, int]], limit: int) -> None:
        await fill_until(items, limit, self._max_wait, take=self._group.take, more=self._wait,
                         stop=lambda: self._closing)
