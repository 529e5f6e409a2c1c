"""What group and ephemeral subscriptions share: a local queue, handler workers, subject filter, decode.

A subscription reads entries into a local queue (at most ``batch_size``)
and runs ``max_in_flight`` worker tasks that hand deliveries to the handler
in queue order; with one worker, one delivery at a time. ``close()`` stops
reading, lets handlers in progress finish, then gives back what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from squadbus.backends.redis._driver import Reconnects, aioredis
from squadbus.backends.redis.layout import KeyLayout
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core import subjects
from squadbus.core.backend import BatchRawHandler, ConsumerOptions, Delivery, RawHandler, invoke, invoke_batch
from squadbus.core.batching import fill_until
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import MalformedMessage
from squadbus.core.handoff import Handoff

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


def _never() -> bool:
    return False


class BaseConsumer:
    """The shared machinery; subclasses read entries and settle them."""

    group: str | None

    def __init__(self, ctx: ConsumerContext, pattern: str, handler: RawHandler, options: ConsumerOptions) -> None:
        self.ctx = ctx
        self._pattern = pattern
        self._handler = handler
        self.options = options
        self.streams = ctx.layout.streams_for(pattern)
        self.literal = subjects.is_literal(pattern)
        self.queue: Handoff[Entry] = Handoff()
        self.room = asyncio.Event()
        self.room.set()
        self.closing = False
        self._match_cache: dict[bytes, bool] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._batch_handler: BatchRawHandler | None = None
        self._max_wait = 0.0
        self.on_closed: Callable[[BaseConsumer], None] | None = None
        self.lease_deadline = math.inf
        """Loop time after which nothing is handed out until :meth:`lease_renewed` (ordered groups)."""

    def use_batches(self, handler: BatchRawHandler, max_wait: float) -> None:
        """Before start: hand the handler batches of up to ``batch_size`` entries (one batch at a time)
        instead of one delivery per call, waiting at most ``max_wait`` after the first for more."""
        self._batch_handler = handler
        self._max_wait = max_wait

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
        queued = len(self.queue)
        free = self.options.batch_size - queued
        if queued > self.options.batch_size // 2:
            return 0
        return max(1, free)

    async def wait_for_room(self) -> int:
        while (free := self.free_slots()) == 0:
            self.room.clear()
            await self.room.wait()
        return free

    def enqueue(self, entry: Entry) -> None:
        self.queue.put(entry)

    # ---- handling ----------------------------------------------------------------------------

    def start_workers(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        if self._batch_handler is not None:
            self._workers.append(loop.create_task(self._work_batches(self._batch_handler), name=f"{name}-batches"))
            return
        for i in range(self.options.max_in_flight):
            self._workers.append(loop.create_task(self._work(), name=f"{name}-worker-{i}"))

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

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        queue = self.queue
        handler, options, counters = self._handler, self.options, self.ctx.counters
        half = options.batch_size // 2
        now = asyncio.get_running_loop().time
        while not self.closing:
            entry = queue.take()
            if entry is None:
                self._idle.add(me)
                try:
                    entry = await queue.get()
                finally:
                    self._idle.discard(me)
            if len(queue) <= half:
                self.room.set()
            if entry.dropped or (now() >= self.lease_deadline and not await self.lease_renewed(entry)):
                continue
            entry.handed = True
            counters.delivered += 1
            await invoke(handler, RedisDelivery(entry, self, self.group), options)

    async def _work_batches(self, handler: BatchRawHandler) -> None:
        me = asyncio.current_task()
        assert me is not None
        limit = self.options.batch_size
        queue = self.queue
        now = asyncio.get_running_loop().time

        async def more() -> Entry | None:
            # The reader waits for room while more than half a batch is queued; the queue is empty
            # while this waits, so let it read, or the batch would wait out max_wait for entries that
            # are in Redis already.
            self.room.set()
            return await queue.get()

        while not self.closing:
            entries: list[Entry] = []
            self._idle.add(me)
            try:
                entries.append(await queue.get())
                await fill_until(entries, limit, self._max_wait, take=queue.take, more=more, stop=_never)
            except asyncio.CancelledError:
                for entry in entries:  # closing: give them back for close() to release
                    queue.put(entry)
                raise
            finally:
                self._idle.discard(me)
            if len(queue) <= self.options.batch_size // 2:
                self.room.set()
            counters = self.ctx.counters
            deliveries: list[Delivery] = []
            for entry in entries:
                if entry.dropped or (now() >= self.lease_deadline and not await self.lease_renewed(entry)):
                    continue
                entry.handed = True
                deliveries.append(RedisDelivery(entry, self, self.group))
            if not deliveries:
                continue
            counters.delivered += len(deliveries)
            await invoke_batch(handler, deliveries, self.options)

    async def close(self) -> None:
        """Stop consuming; see the subclasses."""
        raise NotImplementedError

    async def stop_tasks(self) -> None:
        """Stop reading, let running handlers finish, stop idle workers."""
        self.closing = True
        if self.on_closed is not None:
            self.on_closed(self)
        for task in self._background:
            task.cancel()
        for task in list(self._idle):
            task.cancel()
        await asyncio.gather(*self._background, *self._workers, return_exceptions=True)

    def drain_queue(self) -> list[Entry]:
        """Entries read but never handed to the handler."""
        return self.queue.drain()

    # ---- settlement, implemented by subclasses ----------------------------------------------

    def settle_ack(self, entry: Entry) -> None:
        raise NotImplementedError

    def settle_nack(self, entry: Entry, delay: float) -> None:
        raise NotImplementedError

    async def lease_renewed(self, entry: Entry) -> bool:
        """Called past ``lease_deadline``: True once ``entry`` may be handed out (default: at once)."""
        return True

    async def touch(self, entry: Entry) -> None:
        """Extend ``ack_wait`` for ``entry`` (default: nothing to extend)."""
