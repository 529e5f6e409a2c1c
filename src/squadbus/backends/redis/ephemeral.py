"""A subscription without a group: XREAD from the streams' ends, nothing acknowledged in Redis.

The start positions are fixed (``XREVRANGE + - COUNT 1`` per stream) before
``subscribe`` returns, so the subscription gets every matching message
published after it started. A nack redelivers from the local copy after the
delay (no other consumer could take it).
"""

from __future__ import annotations

import asyncio
import logging

from squadbus.backends.redis._driver import FAILURES, entry_parts, queue, read_streams
from squadbus.backends.redis.consumer import BaseConsumer, ConsumerContext, Entry, RawFields
from squadbus.core.backend import ConsumerOptions, RawHandler
from squadbus.core.errors import MalformedMessage

logger = logging.getLogger("squadbus.backends.redis.ephemeral")


class EphemeralSubscription(BaseConsumer):
    """Fan-out subscription reading new entries only."""

    group = None

    def __init__(self, ctx: ConsumerContext, pattern: str, handler: RawHandler, options: ConsumerOptions) -> None:
        super().__init__(ctx, pattern, handler, options)
        self._positions: dict[str, bytes | str] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._failing = False

    async def start(self) -> None:
        """Fix the start position of every stream, then start reading."""
        async with self.ctx.client.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                queue(pipe, "XREVRANGE", stream, "+", "-", "COUNT", 1)
            lasts = await pipe.execute()
        for stream, last in zip(self.streams, lasts, strict=True):
            self._positions[stream] = last[0][0] if last else "0-0"
        self.start_workers("squadbus-redis-ephemeral")
        self.spawn(self._read_loop, "squadbus-redis-ephemeral-reader")

    async def close(self) -> None:
        """Stop reading and let the handler in progress finish. Idempotent."""
        if self.closing:
            return
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await self.stop_tasks()
        self.drain_queue()

    async def _read_loop(self) -> None:
        backoff = 0.05
        block_ms = int(self.ctx.settings.block * 1000)
        while True:
            count = await self.wait_for_room()
            streams = list(self._positions)
            try:
                async with asyncio.timeout(self.ctx.settings.block + self.ctx.settings.connect_timeout + 5):
                    reply = await read_streams(self.ctx.client,
                        "XREAD", "COUNT", count, "BLOCK", block_ms,
                        "STREAMS", *streams, *(self._positions[s] for s in streams),
                    )
            except FAILURES as exc:
                self.ctx.counters.read_errors += 1
                if not self._failing:
                    self._failing = True
                    logger.warning("ephemeral subscription %s: reading failed, retrying: %r", self.pattern, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._failing = False
            backoff = 0.05
            for key, entries in reply:
                for entry_id, raw in entries:
                    self._positions[key] = entry_id
                    self._accept(key, entry_id, raw)

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
