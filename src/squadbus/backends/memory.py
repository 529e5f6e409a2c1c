"""The in-process backend: the reference model of the delivery contract.

Not durable across restarts; everything else in ARCHITECTURE.md's delivery
contract holds. How it works:

* Every subscription belongs to a *group*: a named one shared by its members
  (competing consumers), or an anonymous one of its own (``group=None``).
  Each group has a bounded buffer, so a slow group never slows another.
* ``publish`` routes by subject (an exact-subject dict plus a short list of
  wildcard groups, cached per subject), so sending to one agent costs the
  same with 100 or 10,000 agents subscribed. There is no lock: the event loop
  is the only writer.
* When a group's buffer is full, the group's ``slow_consumer`` policy
  decides: ``BLOCK`` makes the publisher wait (up to ``publish_timeout``,
  then :class:`~squadbus.core.errors.BackendTimeout` with nothing
  published); ``DROP_OLDEST`` drops the oldest buffered message and the next
  delivery carries ``gap_before``. A named group with no member left never
  blocks publishers: it drops oldest and logs it.
* A bounded *replay window* (``retain_messages``) keeps the latest messages
  for :meth:`MemoryBackend.replay` and for groups created with
  ``StartFrom.EARLIEST``; :meth:`MemoryBackend.stats` reports its bounds and
  how many messages left it. History belongs to the HistoryStore.
* Messages are deduplicated by ``id`` within the last ``dedupe_window`` ids.
* ``ack_wait`` is not enforced: a handler that hangs is visible in-process;
  closing its subscription returns its delivery to the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

from squadbus.core import subjects
from squadbus.core.backend import (
    BatchRawHandler,
    ConsumerOptions,
    Delivery,
    RawHandler,
    SlowConsumerPolicy,
    StartFrom,
    invoke,
    invoke_batch,
)
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendTimeout, Closed, ConfigError

logger = logging.getLogger("squadbus.backends.memory")

_ROUTE_CACHE_LIMIT = 50_000
_FAIRNESS_STREAK = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class MemorySettings:
    """Settings of the memory backend; ``from_url("memory://?retain_messages=1000")``.

    ``retain_messages`` bounds the replay window (``stats()`` reports what
    left it). It is memory *and* time: every retained message keeps a
    GC-tracked UUID alive, so full collections grow with the window (measured:
    ~10% of send throughput at 100,000). History belongs to the store.
    """

    retain_messages: int = 10_000
    dedupe_window: int = 100_000
    publish_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.retain_messages < 0 or self.dedupe_window < 0:
            raise ConfigError("retain_messages and dedupe_window must be >= 0")
        if self.publish_timeout <= 0:
            raise ConfigError("publish_timeout must be positive")

    @classmethod
    def from_url(cls, url: str) -> MemorySettings:
        """Parse ``memory://?retain_messages=N&dedupe_window=N&publish_timeout=S``."""
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigError(f"not a memory:// URL: {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {"retain_messages": int, "dedupe_window": int, "publish_timeout": float}
        unknown = set(query) - set(known)
        if unknown:
            raise ConfigError(f"unknown memory:// option(s): {', '.join(sorted(unknown))}")
        try:
            values: dict[str, Any] = {k: known[k](v) for k, v in query.items()}
        except ValueError as exc:
            raise ConfigError(f"bad memory:// option in {url!r}: {exc}") from exc
        return cls(**values)


# A buffered message and how many times it was delivered already. A tuple of
# a gc=False Message and an int is untracked by the garbage collector, which
# keeps full buffers from making every collection slower.
_Entry = tuple[Message, int]


class _MemoryDelivery(Delivery):
    __slots__ = ("_group",)

    def __init__(self, message: Message, attempt: int, group: _Group, gap_before: int) -> None:
        # Delivery.__init__ inlined: one of these per message on the hot path.
        self.message = message
        self.attempt = attempt
        self.group = group.name
        self.gap_before = gap_before
        self._settled = None
        self._waiter = None
        self._group = group

    async def _ack(self) -> None:
        self._group.inflight -= 1

    async def _nack(self, delay: float) -> None:
        self._group.inflight -= 1
        self._group.redeliver((self.message, self.attempt), delay)


class _Group:
    """A buffer shared by the members of one consumer group."""

    def __init__(self, name: str | None, pattern: str, options: ConsumerOptions) -> None:
        self.name = name
        self.pattern = pattern
        self.options = options
        self.buffer: deque[_Entry] = deque()
        self.getters: deque[asyncio.Future[None]] = deque()
        self.space_waiters: deque[asyncio.Future[None]] = deque()
        self.members: set[_MemorySubscription] = set()
        self.inflight = 0
        self.pending_gap = 0
        self.dropped = 0
        self.timers: set[asyncio.TimerHandle] = set()

    def has_space(self) -> bool:
        return len(self.buffer) < self.options.max_pending

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
        while self.space_waiters and self.has_space():
            waiter = self.space_waiters.popleft()
            if not waiter.done():
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

    async def wait_for_space(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.space_waiters.append(fut)
        await fut

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


class _MemorySubscription:
    """One member of a group, running its handler one delivery at a time."""

    def __init__(self, backend: MemoryBackend, group: _Group, handler: RawHandler) -> None:
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
            self._waiting = True
            try:
                await group.wait_for_entry()
            finally:
                self._waiting = False
        return None

    async def _handle(self, message: Message, attempt: int, gap: int) -> None:
        delivery = _MemoryDelivery(message, attempt, self._group, gap)
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
                item = await self._next()
                if item is None:
                    return
            streak += 1
            if streak >= _FAIRNESS_STREAK:
                # Handlers that never suspend would otherwise starve the loop.
                streak = 0
                await asyncio.sleep(0)
            await invoke(handler, _MemoryDelivery(item[0], item[1], group, item[2]), options)

    async def _run_concurrently(self, limit: int) -> None:
        slots = asyncio.Semaphore(limit)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                item = await self._next()
                if item is None:
                    slots.release()
                    break
                task = asyncio.get_running_loop().create_task(self._handle(*item))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

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


class _MemoryBatchSubscription(_MemorySubscription):
    """A member that hands its handler batches: what is buffered, up to ``batch_size``,
    waiting at most ``max_wait`` after the first message for more."""

    def __init__(self, backend: MemoryBackend, group: _Group, handler: BatchRawHandler, max_wait: float) -> None:
        super().__init__(backend, group, _never_called)
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
                # Closed while waiting for more: give back what was taken, in order.
                for message, attempt, gap in reversed(items):
                    group.inflight -= 1
                    group.pending_gap += gap
                    group.buffer.appendleft((message, attempt - 1))
                raise
            deliveries = [_MemoryDelivery(message, attempt, group, gap) for message, attempt, gap in items]
            await invoke_batch(handler, deliveries, options)

    async def _fill(self, items: list[tuple[Message, int, int]], limit: int) -> None:
        group = self._group
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        while len(items) < limit and not self._closing:
            item = group.take()
            if item is not None:
                items.append(item)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._waiting = True
            try:
                async with asyncio.timeout(remaining):
                    await group.wait_for_entry()
            except TimeoutError:
                return
            finally:
                self._waiting = False


async def _never_called(delivery: Delivery) -> None:
    raise AssertionError("a batch subscription has no per-delivery handler")


class MemoryBackend:
    """In-process backend; see the module docstring for its contract."""

    name = "memory"

    def __init__(self, settings: MemorySettings | None = None) -> None:
        self.settings = settings or MemorySettings()
        self._exact: dict[str, list[_Group]] = {}
        self._wild: list[_Group] = []
        self._groups: dict[tuple[str, str], _Group] = {}
        self._route_cache: dict[str, tuple[_Group, ...]] = {}
        self._log: deque[tuple[int, Message]] = deque(maxlen=self.settings.retain_messages or None)
        self._seq = itertools.count(1)
        self._last_seq = 0
        # A set plus a FIFO of ids as ints: O(1) expiry (a dict's oldest-key pop
        # degrades as it churns), and ints, unlike UUID objects, are not GC-tracked.
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._dedupe_window = self.settings.dedupe_window
        self._retain = self.settings.retain_messages > 0
        self._duplicates = 0
        self._connected = False
        self._closed = False

    async def connect(self) -> None:
        """Nothing to connect to; marks the backend usable."""
        if self._closed:
            raise Closed("memory backend is closed")
        self._connected = True

    async def close(self) -> None:
        """Close every subscription (each finishes its handler in progress). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for group in list(self._groups.values()) + [g for gs in self._exact.values() for g in gs] + self._wild:
            for member in list(group.members):
                await member.close()
            group.cancel_timers()

    # ---- publish -----------------------------------------------------------------------------

    def _route(self, subject: str) -> tuple[_Group, ...]:
        cached = self._route_cache.get(subject)
        if cached is not None:
            return cached
        targets = list(self._exact.get(subject, ()))
        targets.extend(g for g in self._wild if subjects.matches(g.pattern, subject))
        result = tuple(targets)
        if len(self._route_cache) >= _ROUTE_CACHE_LIMIT:
            self._route_cache.clear()
        self._route_cache[subject] = result
        return result

    async def publish(self, message: Message) -> None:
        """Hand ``message`` to every matching group; returns once all buffered it."""
        if self._closed or not self._connected:
            raise Closed("memory backend is not connected")
        targets = self._route_cache.get(message.subject) or self._route(message.subject)
        for group in targets:
            if len(group.buffer) >= group.options.max_pending and group.blocks_publishers():
                await self._wait_for_space(targets)
                targets = self._route(message.subject)
                break
        seen = self._seen
        key = message.id.int
        if key in seen:
            self._duplicates += 1
            return
        if self._dedupe_window:
            seen.add(key)
            order = self._seen_order
            order.append(key)
            if len(order) > self._dedupe_window:
                seen.discard(order.popleft())
        seq = self._last_seq = next(self._seq)
        if self._retain:
            self._log.append((seq, message))
        entry = (message, 0)
        for group in targets:
            group.push(entry)

    async def _wait_for_space(self, targets: tuple[_Group, ...]) -> None:
        # All-or-nothing: wait until every blocking target has room, then the
        # caller pushes to all of them without yielding in between.
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                while True:
                    full = next((g for g in targets if not g.has_space() and g.blocks_publishers()), None)
                    if full is None:
                        return
                    await full.wait_for_space()
        except TimeoutError as exc:
            raise BackendTimeout(
                f"a consumer group stayed full for {self.settings.publish_timeout}s; nothing was published"
            ) from exc

    # ---- subscribe ---------------------------------------------------------------------------

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> _MemorySubscription:
        """Add a member to group ``(group, pattern)``, creating the group if needed."""
        target = self._join(pattern, group, options)
        member = _MemorySubscription(self, target, handler)
        target.members.add(member)
        member.start()
        return member

    def _join(self, pattern: str, group: str | None, options: ConsumerOptions) -> _Group:
        """The group a new member of ``(group, pattern)`` joins, created if needed."""
        if self._closed or not self._connected:
            raise Closed("memory backend is not connected")
        subjects.validate_pattern(pattern)
        target = self._groups.get((group, pattern)) if group is not None else None
        if target is None:
            target = _Group(group, pattern, options)
            if group is not None:
                self._groups[(group, pattern)] = target
                if options.start is StartFrom.EARLIEST:
                    self._backfill(target)
            self._attach(target)
        return target

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> _MemorySubscription:
        """Like :meth:`subscribe`, handing ``handler`` batches (BatchSubscriber)."""
        target = self._join(pattern, group, options)
        member = _MemoryBatchSubscription(self, target, handler, max_wait)
        target.members.add(member)
        member.start()
        return member

    def _backfill(self, group: _Group) -> None:
        first = self._log[0][0] if self._log else self._last_seq + 1
        if first > 1:
            logger.info(
                "group %s starts at the replay window: %d earlier messages are only in the history store",
                group.name, first - 1,
            )
        for _, message in self._log:
            if subjects.matches(group.pattern, message.subject):
                group.buffer.append((message, 0))

    def _attach(self, group: _Group) -> None:
        if subjects.is_literal(group.pattern):
            self._exact.setdefault(group.pattern, []).append(group)
        else:
            self._wild.append(group)
        self._route_cache.clear()

    def _detach(self, group: _Group) -> None:
        if subjects.is_literal(group.pattern):
            groups = self._exact.get(group.pattern, [])
            if group in groups:
                groups.remove(group)
            if not groups:
                self._exact.pop(group.pattern, None)
        elif group in self._wild:
            self._wild.remove(group)
        self._route_cache.clear()
        group.cancel_timers()

    def _remove_member(self, member: _MemorySubscription) -> None:
        group = member._group
        group.members.discard(member)
        group._wake_space()  # a memberless group no longer blocks publishers
        if group.name is None and not group.members:
            self._detach(group)

    async def delete_group(self, group: str, pattern: str) -> bool:
        """Forget a named group and what it buffered. True if it existed."""
        target = self._groups.pop((group, pattern), None)
        if target is None:
            return False
        for member in list(target.members):
            await member.close()
        self._detach(target)
        return True

    # ---- replay and introspection ------------------------------------------------------------

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(seq, message)`` of one execution still in the replay window."""
        for seq, message in list(self._log):
            if seq < from_seq or message.task_execution_id != task_execution_id:
                continue
            if since is not None and message.created_at < since:
                continue
            yield seq, message

    def stats(self) -> dict[str, Any]:
        """Replay window bounds, duplicates dropped, and per-group buffer state."""
        first = self._log[0][0] if self._log else self._last_seq + 1
        return {
            "replay_window": {"first_seq": first, "last_seq": self._last_seq, "retained": len(self._log),
                              "trimmed": first - 1},
            "duplicates_dropped": self._duplicates,
            "groups": [
                {"group": g.name, "pattern": g.pattern, "members": len(g.members), "pending": len(g.buffer),
                 "inflight": g.inflight, "dropped": g.dropped}
                for g in self._groups.values()
            ],
        }


def from_url(url: str) -> MemoryBackend:
    """A MemoryBackend from ``memory://[?retain_messages=N&dedupe_window=N&publish_timeout=S]``."""
    return MemoryBackend(MemorySettings.from_url(url))
