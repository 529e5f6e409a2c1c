"""Batched XACK: every ack of the same moment goes in one pipelined round trip.

The handler does not wait for its ack to reach Redis: a lost ack means one
redelivery (at-least-once), never a loss, and a sequential handler is not
slowed to one round trip per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from squadbus.backends.redis._driver import FAILURES, PackedCommand, aioredis, execute_packed
from squadbus.backends.redis.consumer import RedisCounters
from squadbus.core.backoff import RECONNECT, Backoff

logger = logging.getLogger("squadbus.backends.redis.acks")


class AckQueue:
    """Acks for one Redis consumer group, flushed by a background task."""

    def __init__(self, client: aioredis.Redis, redis_group: str, counters: RedisCounters) -> None:
        self._client = client
        self._group = redis_group
        self._counters = counters
        self._acks: dict[str, list[bytes]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def add(self, stream: str, entry_id: bytes) -> None:
        """Queue an XACK; sent on the next loop iteration with every other queued ack."""
        self._acks[stream].append(entry_id)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="squadbus-redis-acks")

    async def _run(self) -> None:
        backoff = Backoff(RECONNECT)
        try:
            while self._acks and not self._closing:
                batch, self._acks = self._acks, defaultdict(list)
                try:
                    await self._send(batch)
                    backoff.reset()
                except FAILURES as exc:
                    for stream, ids in batch.items():
                        self._acks[stream][:0] = ids
                    logger.warning("group %s: XACK failed, retrying: %s", self._group, exc)
                    await backoff.sleep()
        finally:
            # Cleared synchronously with the loop's last check: a later add() starts a new task.
            self._task = None

    async def _send(self, batch: dict[str, list[bytes]]) -> None:
        await execute_packed(self._client, *(PackedCommand("XACK", stream, self._group, *ids)
                                             for stream, ids in batch.items()))

    async def flush(self) -> None:
        """Stop the background task and send what is queued once; raises if Redis fails
        (the acks are then counted in ``lost_acks``: those entries will be redelivered)."""
        self._closing = True
        task = self._task
        if task is not None:
            await task  # ends after the send in progress (it stops looping once closing)
        if self._acks:
            batch, self._acks = self._acks, defaultdict(list)
            try:
                await self._send(batch)
            except FAILURES:
                self._counters.lost_acks += sum(map(len, batch.values()))
                raise
