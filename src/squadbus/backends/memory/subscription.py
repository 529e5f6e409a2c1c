"""A member of a group as a source of deliveries, run by the core consumer runtime (squadbus.core.consumer)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from squadbus.backends.memory.group import GroupBuffer
from squadbus.core.backend import BatchRawHandler, Delivery, RawHandler
from squadbus.core.consumer import Consumer
from squadbus.core.errors import Closed

if TYPE_CHECKING:
    from squadbus.backends.memory.backend import MemoryBackend


def _nothing(max_count: int) -> Sequence[Delivery]:
    return ()


class GroupSource:
    """The deliveries of one member of a memory group (a DeliverySource): taken from the group's buffer, in
    order, each counted in flight until it is settled."""

    __slots__ = ("_group", "poll")

    def __init__(self, group: GroupBuffer) -> None:
        self._group = group
        # poll is the group's own method (and _nothing once closed), not a method of this class calling
        # take(): one call less per delivery. 100 broadcasts to 1,000 subscriptions, CPU per delivery, min of
        # 5, interleaved with the loop this runtime replaced (load 1.4-2.9): a poll method around take() and
        # a list per delivery cost 1.53-1.56 us vs 1.38-1.40; this and GroupBuffer.deliveries' one-delivery
        # path 1.13-1.14 vs 1.10-1.13 (the same measure without the set-up and close of the subscriptions).
        self.poll: Callable[[int], Sequence[Delivery]] = group.deliveries

    @property
    def pattern(self) -> str:
        return self._group.pattern

    @property
    def group(self) -> str | None:
        return self._group.name

    async def receive(self, max_count: int, wait: float) -> Sequence[Delivery]:
        if self.poll is _nothing:
            raise Closed("this subscription is closed")
        got = self.poll(max_count)
        if got or wait <= 0:
            return got
        group = self._group
        # The group's future awaited directly (no coroutine around it): an idle member is a few objects.
        fut = group.entry_waiter()
        try:
            if wait == math.inf:
                await fut
            else:
                async with asyncio.timeout(wait):
                    await fut
        except TimeoutError:
            group.gave_up(fut)  # a wake-up given as the time ran out goes to another member
            return ()
        except asyncio.CancelledError:
            group.gave_up(fut)
            raise
        return self.poll(max_count)

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        self._group.give_back([(d.message, d.attempt, d.gap_before) for d in deliveries])

    async def close(self) -> None:
        self.poll = _nothing


class MemorySubscription(Consumer[GroupSource]):
    """One member of a group: the core runtime over its :class:`GroupSource` (``handler`` per delivery, or
    ``batches``: what is buffered, up to ``batch_size``, waiting at most ``max_wait`` after the first
    message for more); it leaves the group once closed."""

    def __init__(
        self, backend: MemoryBackend, group: GroupBuffer, *, handler: RawHandler | None = None,
        batches: BatchRawHandler | None = None, max_wait: float = 0.0,
    ) -> None:
        super().__init__(GroupSource(group), group.options, handler=handler, batches=batches, max_wait=max_wait)
        self._backend = backend
        self._group = group
        self._left = False

    def run(self) -> None:
        """Start consuming."""
        self.start(f"squadbus-memory-{self._group.name or 'ephemeral'}")

    async def close(self) -> None:
        try:
            await super().close()
        finally:  # also when the close was cancelled
            if not self._left:
                self._left = True
                self._backend._remove_member(self)
