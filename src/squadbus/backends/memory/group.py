"""A consumer group's buffer and the deliveries handed out of it."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from squadbus.backends.memory.admission import SpaceWaiter, admit_next
from squadbus.core.backend import ConsumerOptions, Delivery, SlowConsumerPolicy
from squadbus.core.envelope import Message

if TYPE_CHECKING:
    from squadbus.backends.memory.inboxes import MemoryInbox
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
        # Publishers blocked on this group, in ticket order, and the slots reserved for those admitted
        # that have not pushed yet (squadbus.backends.memory.admission).
        self.space_waiters: list[SpaceWaiter] = []
        self.reserved = 0
        self.members: set[MemorySubscription | MemoryInbox] = set()
        # Inbox members (squadbus.backends.memory.inboxes) in the order they opened: the first is kicked
        # when an entry arrives (they have no task waiting), the others wait for it to close.
        self.holders: list[MemoryInbox] = []
        self.inflight = 0
        self.pending_gap = 0
        self.dropped = 0
        self.timers: set[asyncio.TimerHandle] = set()

    def has_space(self) -> bool:
        return len(self.buffer) + self.reserved < self.options.max_pending

    def blocks_publishers(self) -> bool:
        return bool(self.members) and self.options.slow_consumer is SlowConsumerPolicy.BLOCK

    def push(self, entry: _Entry) -> None:
        # Drop the oldest only where the policy allows it. A publisher to a group that blocks pushes
        # into a free or reserved slot; finding the buffer full means deliveries were given back since
        # (a nack, a redelivery timer, a closing batch member) or the group joined while it waited:
        # the buffer then holds more than max_pending until it drains, and publishers wait meanwhile.
        if len(self.buffer) >= self.options.max_pending and not self.blocks_publishers():
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
        if self.holders:
            self.holders[0].kick()
        while self.getters:
            getter = self.getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def take(self) -> tuple[Message, int, int] | None:
        """The next message, its attempt number and the gap before it; None when empty."""
        if not self.buffer:
            return None
        message, delivered = self.buffer.popleft()
        self.inflight += 1
        gap, self.pending_gap = self.pending_gap, 0
        if self.space_waiters:
            admit_next(self)
        return message, delivered + 1, gap

    def deliveries(self, max_count: int) -> Sequence[MemoryDelivery]:
        """Up to ``max_count`` next messages as deliveries (what :meth:`take` does, per message), empty when
        there is none: a member's poll (squadbus.backends.memory.subscription), its hot path, so take()
        is inlined here."""
        buffer = self.buffer
        if not buffer:
            return ()
        if max_count == 1:  # a member handing one delivery at a time: no list
            message, delivered = buffer.popleft()
            self.inflight += 1
            gap, self.pending_gap = self.pending_gap, 0
            if self.space_waiters:
                admit_next(self)
            return (MemoryDelivery(message, delivered + 1, self, gap),)
        got: list[MemoryDelivery] = []
        while buffer and len(got) < max_count:
            message, delivered = buffer.popleft()
            self.inflight += 1
            gap, self.pending_gap = self.pending_gap, 0
            got.append(MemoryDelivery(message, delivered + 1, self, gap))
        if self.space_waiters:
            admit_next(self)
        return got

    def entry_waiter(self) -> asyncio.Future[None]:
        """A future that a push or requeue resolves; await it directly (no coroutine around it: a waiting
        member is a few objects the collector scans, 10,000 of them with 10,000 inboxes open) and call
        :meth:`gave_up` if that await is cancelled."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.getters.append(fut)
        return fut

    def gave_up(self, fut: asyncio.Future[None]) -> None:
        """A member stopped waiting on ``fut`` (cancelled): a wake-up it was given goes to another."""
        if fut.done() and not fut.cancelled():
            self._wake_getter()

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

    def give_back(self, items: list[tuple[Message, int, int]]) -> None:
        """Return what :meth:`take` gave and no handler saw (a batch member closed while it filled a
        batch) to the front of the buffer, in order, as never delivered; a waiting member gets it."""
        for message, attempt, gap in reversed(items):
            self.inflight -= 1
            self.pending_gap += gap
            self.buffer.appendleft((message, attempt - 1))
        self._wake_getter()

    def cancel_timers(self) -> None:
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
