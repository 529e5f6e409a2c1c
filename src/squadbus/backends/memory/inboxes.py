"""Agents' inboxes on the memory backend (``MultiplexesInboxes``): a group member with no task while idle.

An inbox is still the durable group ``inbox-<agent>`` on the agent's direct
subject (backfilled from the replay window, the slow-consumer policy and the
admission of blocked publishers as for any group), but its member is not a
consumer loop: the group *kicks* it when an entry arrives, and it runs a task
only while it has deliveries to hand over, then ends. An idle agent thus costs
the group buffer and this object, both allocated once at open (``gc.freeze()``
in a host runner keeps them out of every collection), and nothing it allocates
again per wait. A consumer loop per inbox instead held a task and, once the
agent had had a message, a new future, its iterator and the task's wake-up
callback for every wait: three objects per agent that each full collection
scanned (issue 15: 10,000 agents, scenario 5's GC pauses).

Two opens of one agent in a backend instance: the first is served, a later
one gets nothing until those before it close, then takes over (what it left
unsettled comes back to the group, after its nack's delay).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from squadbus.backends.memory.group import GroupBuffer, MemoryDelivery
from squadbus.core.backend import ConsumerOptions, RawHandler, invoke
from squadbus.core.consumer import FAIRNESS_STREAK
from squadbus.core.envelope import Message
from squadbus.core.tasks import wait_ended

if TYPE_CHECKING:
    from squadbus.backends.memory.backend import MemoryBackend

class MemoryInbox:
    """One open of an agent's inbox: a member of its group, handing one delivery at a time to ``handler``."""

    __slots__ = ("_backend", "_closing", "_group", "_handler", "_options", "_task")

    def __init__(self, backend: MemoryBackend, group: GroupBuffer, handler: RawHandler,
                 options: ConsumerOptions) -> None:
        self._backend = backend
        self._group = group
        self._handler = handler
        self._options = options
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pattern(self) -> str:
        return self._group.pattern

    @property
    def group(self) -> str | None:
        return self._group.name

    def kick(self) -> None:
        """The group may have an entry: hand it over unless a delivery is out already (called by the group)."""
        if self._task is not None or self._closing:
            return
        item = self._group.take()
        if item is not None:
            self._task = asyncio.get_running_loop().create_task(self._hand_over(item))

    async def _hand_over(self, item: tuple[Message, int, int]) -> None:
        """Hand over ``item``, then whatever the group has next, one at a time; end when it has nothing."""
        group, handler, options = self._group, self._handler, self._options
        streak = 0
        try:
            while True:
                await invoke(handler, MemoryDelivery(item[0], item[1], group, item[2]), options)
                if self._closing:
                    return
                streak += 1
                if streak >= FAIRNESS_STREAK:
                    # Handlers that never suspend would otherwise starve the loop.
                    streak = 0
                    await asyncio.sleep(0)
                    if self._closing:
                        return
                next_item = group.take()
                if next_item is None:
                    return
                item = next_item
        finally:
            self._task = None

    async def close(self) -> None:
        """Stop handing deliveries over; the one in progress finishes and settles first. Idempotent."""
        if self._closing:
            return
        self._closing = True
        try:
            await wait_ended(self._task)  # a cancelled close cancels the hand-over (its delivery is nacked)
        finally:
            self._backend._remove_member(self)
