"""A subscription without a group: XREAD from the streams' ends, nothing acknowledged in Redis.

Read by the backend's one blocking ``XREAD`` (:mod:`.watcher`), with every
other subscription without a group and every request waiting for its reply.
The start positions are fixed (``XREVRANGE + - COUNT 1`` per stream) before
``subscribe`` returns, so the subscription gets every matching message
published after it started. A nack redelivers from the local copy after the
delay (no other consumer could take it).
"""

from __future__ import annotations

import asyncio
import logging

from squadbus.backends.redis._driver import RawEntry, entry_parts, queue
from squadbus.backends.redis.consumer import ConsumerContext, Entry, EntrySource, RawFields
from squadbus.backends.redis.watcher import StreamWatcher, Watch
from squadbus.core.backend import ConsumerOptions
from squadbus.core.errors import MalformedMessage

logger = logging.getLogger("squadbus.backends.redis.ephemeral")


class EphemeralSource(EntrySource):
    """Fan-out subscription's source reading new entries only, through the backend's one
    :class:`~.watcher.StreamWatcher` (no connection of its own); run by :class:`~.consumer.RedisSubscription`."""

    group = None

    def __init__(
        self, ctx: ConsumerContext, pattern: str, options: ConsumerOptions, watcher: StreamWatcher
    ) -> None:
        super().__init__(ctx, pattern, options)
        self._watcher = watcher
        self._watches: list[Watch] = []
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        """Fix the start position of every stream, then start reading."""
        async with self.ctx.client.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                queue(pipe, "XREVRANGE", stream, "+", "-", "COUNT", 1)
            lasts = await pipe.execute()
        for stream, last in zip(self.streams, lasts, strict=True):
            self._watches.append(self._watcher.watch(
                stream, last[0][0] if last else "0-0", self._accept_all,
                room=self.free_slots, wait_room=self.wait_for_room))

    async def close(self) -> None:
        """Stop reading and drop what is queued (the handlers have finished). Idempotent."""
        if self.closing:
            return
        for w in self._watches:
            self._watcher.unwatch(w)
        self._watches.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await self.stop_tasks()
        self.drain_queue()

    def _accept_all(self, stream: str, entries: list[RawEntry]) -> None:
        if self.closing:
            return
        for entry_id, raw in entries:
            self._accept(stream, entry_id, raw)

    def _accept(self, stream: str, entry_id: bytes, raw: RawFields | None) -> None:
        fields = raw if raw is not None else []  # no fields: not filtered, reported malformed
        subject, payload = entry_parts(fields)
        if not self.wanted(subject):
            self.ctx.counters.filtered += 1
            return
        try:
            message = self.parse(payload, fields)
        except MalformedMessage as exc:
            self.ctx.counters.malformed += 1
            logger.warning("ephemeral subscription %s: skipped malformed entry %s/%s: %s",
                           self.pattern, stream, entry_id.decode(), exc)
            return
        self.enqueue(Entry(stream, entry_id, message, 1))

    def settle_ack(self, entry: Entry) -> None:
        return

    def settle_nack(self, entry: Entry, delay: float) -> None:
        if self.closing:
            return
        entry.attempt += 1
        entry.handed = False
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            if not self.closing:
                self.enqueue(entry)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)
