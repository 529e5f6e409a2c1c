"""A consumer group's buffer and the deliveries handed out of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from squadbus.core.backend import ConsumerOptions, Delivery, SlowConsumerPolicy
from squadbus.core.envelope import Message

if TYPE_CHECKING:
    from squadbus.backends.memory.subscription import MemorySubscription

logger = logging.getLogger("squadbus.backends.memory")

# A buffered message and how many times it was delivered already. A tuple of
# a gc=False Message and an int is untracked by the garbage collector, which
# keeps full buffers from making every collection slower.
_Entry = tuple[Message, int]


class MemoryDelivery(Delivery):
    __slots__ = ("_group",)

    def __init__(self, message: Message, attempt: int, group: GroupBuffer, gap_before: int) -> None:
        # Delivery.__init__ inlined: one of these per message on the hot path.
        self.message = message
        self.attempt = attempt
        self.group = group.name
        self.gap_before = gap_before
        self._settled = None
        self._waiter = None
        self._on_failure = None
        self._group = group

    def _ack(self) -> None:
        self._group.inflight -= 1

    def _nack(self, delay: float) -> None:
        self._group.inflight -= 1
        self._group.redeliver((self.message, self.attempt), delay)


class GroupBuffer:
    """A buffer shared by the members of one consumer group."""

    def __init__(self, name: str | None, pattern: str, options: ConsumerOptions) -> None:
        self.name = name
        self.pattern = pattern
        self.options = options
        self.buffer: deque[_Entry] = deque()
        self.getters: deque[asyncio.Future[None]] = deque()
        # Publishers blocked on a full buffer, first come first served; ``waking`` counts those
        # woken for a free slot that have not run yet (their slots are taken).
        self.space_waiters: deque[asyncio.Future[None]] = deque()
        self.waking = 0
        self.members: set[MemorySubscription] = set()
        self.inflight = 0
        self.pending_gap = 0
        self.dropped = 0
        self.timers: set[asyncio.TimerHandle] = set()

    def has_space(self) -> bool:
        return len(self.buffer) + self.waking < self.options.max_pending

    def must_wait(self, *, queued: bool) -> bool:
        """True when a publisher must wait before pushing: no free slot, or (a newcomer, ``queued``
        False) others are already waiting for one."""
        if not self.blocks_publishers():
            return False
        return not self.has_space() or (not queued and bool(self.space_waiters))

    def blocks_publishers(self) -> bool:
        return bool(self.members) and self.options.slow_consumer is SlowConsumerPolicy.BLOCK

    def push(self, entry: _Entry) -> None:
        if len(self.buffer) >= self.options.max_pending:
            self.buffer.popleft()
            self.pending_gap += 1
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "group %s (%s) is full: dropped its oldest message (%d dropped so far)",
                    self.name or "<ephemeral>", self.pattern, self.dropped,
                )
        self.buffer.append(entry)
        self._wake_getter()

    def _wake_getter(self) -> None:
        while self.getters:
            getter = self.getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def _wake_space(self) -> None:
        """Wake as many waiting publishers as there are free slots (all when nothing blocks any more)."""
        while self.space_waiters and (self.has_space() or not self.blocks_publishers()):
            waiter = self.space_waiters.popleft()
            if not waiter.done():
                self.waking += 1
                waiter.set_result(None)

    def take(self) -> tuple[Message, int, int] | None:
        """The next message, its attempt number and the gap before it; None when empty."""
        if not self.buffer:
            return None
        message, delivered = self.buffer.popleft()
        self.inflight += 1
        gap, self.pending_gap = self.pending_gap, 0
        if self.space_waiters:
            self._wake_space()
        return message, delivered + 1, gap

    async def wait_for_entry(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.getters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake_getter()  # pass the wake-up on to another member
            raise

    async def wait_for_space(self, *, front: bool = False) -> None:
        """Wait for a slot, behind the publishers already waiting (``front``: ahead of them, for one
        that was woken and lost its slot to a group that filled again)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            self.space_waiters.appendleft(fut)
        else:
            self.space_waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.waking -= 1  # woken, then cancelled (timeout): pass the slot on
                self._wake_space()
            else:
                with contextlib.suppress(ValueError):  # _wake_space may have dropped it already
                    self.space_waiters.remove(fut)
            raise
        self.waking -= 1  # the slot is this publisher's now: it pushes before it yields

    def redeliver(self, entry: _Entry, delay: float) -> None:
        if delay <= 0:
            self._requeue(entry)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self.timers.discard(handle)
            self._requeue(entry)

        handle = loop.call_later(delay, fire)
        self.timers.add(handle)

    def _requeue(self, entry: _Entry) -> None:
        # Redeliveries go first: they are the oldest messages of the group.
        self.buffer.appendleft(entry)
        self._wake_getter()

    def cancel_timers(self) -> None:
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
