"""What group and ephemeral subscriptions share: a source of deliveries over a local queue, subject filter, decode.

A subscription is core's consumer runtime (:class:`~squadbus.core.consumer.Consumer`:
handler calls, ``max_in_flight``, batches, fairness, close) over an
:class:`EntrySource`, a :class:`~squadbus.core.source.DeliverySource`. The
source's reader tasks read entries into a local queue (at most ``batch_size``,
reading again once it is down to half) and the runtime pulls them in queue
order. ``close()`` stops pulling, lets handlers in progress finish, then the
source stops reading and gives back what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import msgspec

from squadbus.backends.redis._driver import Reconnects, aioredis
from squadbus.backends.redis.layout import KeyLayout
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core import subjects
from squadbus.core.backend import BatchRawHandler, ConsumerOptions, Delivery, RawHandler
from squadbus.core.consumer import Consumer
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import Closed, MalformedMessage
from squadbus.core.source import poll_or_wait

logger = logging.getLogger("squadbus.backends.redis.consumer")

_MATCH_CACHE_LIMIT = 10_000

RawFields = list[bytes] | dict[bytes, bytes]
"""An entry's fields as Redis sent them (flat list) or as redis-py's callbacks made them (dict)."""


@dataclass(slots=True)
class RedisCounters:
    """Counters of one backend instance, reported by ``RedisBackend.stats()``."""

    delivered: int = 0
    filtered: int = 0
    claimed: int = 0
    malformed: int = 0
    trimmed: int = 0
    trimmed_unacked: int = 0
    lost_acks: int = 0
    read_errors: int = 0


@dataclass(frozen=True, slots=True)
class ConsumerContext:
    """What a subscription needs from its backend."""

    client: aioredis.Redis
    layout: KeyLayout
    settings: RedisSettings
    counters: RedisCounters
    publish: Callable[[Message], Any]
    reconnects: Reconnects


class Entry(msgspec.Struct, gc=False, eq=False):
    """One stream entry held by a subscription.

    Not tracked by the garbage collector (``gc=False``): a subscription holds
    hundreds of these at a time and makes them in bursts, and tracking them
    made the collector run (and walk them) several times per read. It can
    form no cycle that needs the collector: the only reference out that can
    lead back is ``timer``, whose callback is dropped when it fires or is
    cancelled.
    """

    stream: str
    entry_id: bytes
    message: Message
    attempt: int
    handed: bool = False
    timer: asyncio.TimerHandle | None = None
    dropped: bool = False
    """Set when the entry's partition went to another member before it was handed out: skipped."""


class EntryOwner(Protocol):
    """What holds an entry while it is out: a subscription, or an agent of the inbox hub (inboxes.py)."""

    def settle_ack(self, entry: Entry) -> None: ...

    def settle_nack(self, entry: Entry, delay: float) -> None: ...

    async def touch(self, entry: Entry) -> None: ...


class RedisDelivery(Delivery):
    """A delivery whose settlement goes back to its subscription."""

    __slots__ = ("_entry", "_owner")

    def __init__(self, entry: Entry, owner: EntryOwner, group: str | None) -> None:
        # Delivery's fields set here rather than through super().__init__: one call less per message.
        self.message = entry.message
        self.attempt = entry.attempt
        self.group = group
        self.gap_before = 0
        self._settled = None
        self._waiter = None
        self._on_failure = None
        self._entry = entry
        self._owner = owner

    def _ack(self) -> None:
        self._owner.settle_ack(self._entry)

    def _nack(self, delay: float) -> None:
        self._owner.settle_nack(self._entry, delay)

    async def in_progress(self) -> None:
        await self._owner.touch(self._entry)


class EntrySource:
    """What group and ephemeral sources share (a :class:`~squadbus.core.source.DeliverySource`); subclasses
    read entries (:meth:`enqueue`) and settle them.

    Deliveries are handed out in queue order. With a ``lease_deadline`` (ordered groups) nothing is handed
    out once it has passed: :meth:`receive` waits for the renewal first (:meth:`wait_for_lease`), and
    entries whose partition went to another member meanwhile (``dropped``) are skipped.
    """

    group: str | None

    def __init__(self, ctx: ConsumerContext, pattern: str, options: ConsumerOptions) -> None:
        self.ctx = ctx
        self._pattern = pattern
        self.options = options
        self.streams = ctx.layout.streams_for(pattern)
        self.literal = subjects.is_literal(pattern)
        self._entries: deque[Entry] = deque()
        self._half = options.batch_size // 2
        # Read by core's consumer: yield to the loop after this many deliveries in a row. The reader refills
        # the queue (<= batch_size) only when the consumer yields, so it waits once a queue is handed out
        # anyway; core's default (64) made the XACK flush and the reader run 4x as often: +0.5 us of CPU per
        # message with a handler that never suspends (20,000 stored messages into a group, load ~1.5).
        self.fairness_streak = max(options.batch_size, 1)
        # The one consumer's wait in receive() (one puller per source): set when an entry is queued.
        self._waiter: asyncio.Future[None] | None = None
        self._now = asyncio.get_running_loop().time
        self.room = asyncio.Event()
        self.room.set()
        self.closing = False
        self._match_cache: dict[bytes, bool] = {}
        self._background: list[asyncio.Task[None]] = []
        self.lease_deadline = math.inf
        """Loop time after which nothing is handed out until a renewal moves it (ordered groups)."""

    @property
    def pattern(self) -> str:
        return self._pattern

    # ---- reading -----------------------------------------------------------------------------

    def wanted(self, subject: bytes | None) -> bool:
        """True when an entry on ``subject`` matches this subscription's pattern."""
        if self.literal or subject is None:
            return True
        cached = self._match_cache.get(subject)
        if cached is None:
            if len(self._match_cache) >= _MATCH_CACHE_LIMIT:
                self._match_cache.clear()
            cached = self._match_cache[subject] = subjects.matches(self._pattern, subject.decode(errors="replace"))
        return cached

    def parse(self, payload: bytes | None, raw: RawFields) -> Message:
        """The message of an entry (its ``m`` field ``payload``; ``raw`` its fields, for the error);
        raises MalformedMessage when it is not an envelope."""
        if payload is None:
            names = sorted(raw) if isinstance(raw, dict) else sorted(raw[::2])
            raise MalformedMessage(f"entry has no 'm' field (fields: {names!r})")
        return decode(payload)

    def free_slots(self) -> int:
        """How many more entries to read now (0 = wait for ``room``)."""
        queued = len(self._entries)
        if queued > self._half:
            return 0
        return max(1, self.options.batch_size - queued)

    async def wait_for_room(self) -> int:
        while (free := self.free_slots()) == 0:
            self.room.clear()
            await self.room.wait()
        return free

    def enqueue(self, entry: Entry) -> None:
        """Queue ``entry`` to be handed out after those queued before it."""
        self._entries.append(entry)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def spawn(self, loop_factory: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run a background loop (reader, claimer); a bug in it is logged and the loop restarted."""
        self._background.append(asyncio.get_running_loop().create_task(self._supervise(loop_factory, name), name=name))

    async def _supervise(self, loop_factory: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        while not self.closing:
            try:
                await loop_factory()
                return
            except Exception:
                logger.exception("%s failed unexpectedly; restarting it in 1s", name)
                await asyncio.sleep(1.0)

    # ---- handing out (DeliverySource) --------------------------------------------------------

    def poll(self, max_count: int) -> Sequence[Delivery]:
        """Up to ``max_count`` queued entries as deliveries, in order, none once the lease deadline passed."""
        entries = self._entries
        if not entries or self.closing:
            return ()
        deadline = self.lease_deadline
        if deadline != math.inf and self._now() >= deadline:
            return ()
        if max_count == 1:  # one delivery at a time, the hot path: no list, no loop
            entry = entries.popleft()
            while entry.dropped:
                if not entries:
                    return ()
                entry = entries.popleft()
            entry.handed = True
            if len(entries) <= self._half:
                self.room.set()
            self.ctx.counters.delivered += 1
            return (RedisDelivery(entry, self, self.group),)
        group, counters = self.group, self.ctx.counters
        got: list[Delivery] = []
        while entries and len(got) < max_count:
            entry = entries.popleft()
            if entry.dropped:
                continue
            entry.handed = True
            got.append(RedisDelivery(entry, self, group))
        if len(entries) <= self._half:
            self.room.set()
        counters.delivered += len(got)
        return got

    async def receive(self, max_count: int, wait: float) -> Sequence[Delivery]:
        if self.closing:
            raise Closed(f"the subscription to {self._pattern!r} is closed")
        return await poll_or_wait(self.poll, self._ready, max_count, wait)

    async def _ready(self) -> None:
        """Wait until an entry may be handed out (or the source closes)."""
        entries = self._entries
        while not self.closing:
            while entries and entries[0].dropped:
                entries.popleft()
            if not entries:
                # The reader waits for room while more than half a batch is queued; nothing is queued now,
                # so let it read (a batch being gathered would otherwise wait out max_wait).
                self.room.set()
                waiter = self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
            elif self._now() >= self.lease_deadline:
                await self.wait_for_lease()
            else:
                return

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Back at the front of the queue, not handed out: ``close()`` releases them as never delivered."""
        entries = self._entries
        for delivery in reversed(deliveries):
            entry = cast(RedisDelivery, delivery)._entry
            entry.handed = False
            entries.appendleft(entry)
        self.ctx.counters.delivered -= len(deliveries)

    async def close(self) -> None:
        """Stop reading and give back what is held (the consumer's handlers have finished); see the
        subclasses."""
        raise NotImplementedError

    async def stop_tasks(self) -> None:
        """Stop handing out and reading: the background loops end."""
        self.closing = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def drain_queue(self) -> list[Entry]:
        """Entries read but never handed out (dropped ones left out)."""
        entries = [entry for entry in self._entries if not entry.dropped]
        self._entries.clear()
        return entries

    # ---- settlement, implemented by subclasses ----------------------------------------------

    def settle_ack(self, entry: Entry) -> None:
        raise NotImplementedError

    def settle_nack(self, entry: Entry, delay: float) -> None:
        raise NotImplementedError

    async def wait_for_lease(self) -> None:
        """Called past ``lease_deadline`` with entries queued: wait (briefly) for news of the lease."""
        await asyncio.sleep(0.1)

    async def touch(self, entry: Entry) -> None:
        """Extend ``ack_wait`` for ``entry`` (default: nothing to extend)."""


class RedisSubscription(Consumer[EntrySource]):
    """A group member's or an ephemeral subscription: core's consumer runtime over its :class:`EntrySource`
    (``handler`` per delivery, or ``batches``); the source's reader starts before, and closes after, it."""

    def __init__(
        self, source: EntrySource, *, handler: RawHandler | None = None, batches: BatchRawHandler | None = None,
        max_wait: float = 0.0,
    ) -> None:
        super().__init__(source, source.options, handler=handler, batches=batches, max_wait=max_wait)
        self.on_closed: Callable[[RedisSubscription], None] | None = None

    async def close(self) -> None:
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed(self)
        await super().close()
