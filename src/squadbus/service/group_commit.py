"""Group commit for the HTTP write-through: concurrent requests share one store transaction.

Each request hands its messages to :meth:`GroupWriter.write` and waits. One
flusher task writes everything that queued up while the previous transaction
was running in a single ``store.write`` call, then hands each request its own
rows. An idle service writes at once (no added delay); a busy one commits
many requests per transaction instead of queueing them one commit at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError
from squadbus.store.base import HistoryStore, StoredMessage

logger = logging.getLogger("squadbus.service.group_commit")


class GroupWriter:
    """Coalesces concurrent ``write`` calls into few ``store.write`` transactions (see module docstring)."""

    def __init__(self, store: HistoryStore, *, max_batch: int = 1000) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.store = store
        self.max_batch = max_batch
        self.transactions = 0
        self._queue: deque[tuple[Sequence[Message], asyncio.Future[list[StoredMessage]]]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        """Store ``messages`` (one request's worth) and return their rows, in order."""
        future: asyncio.Future[list[StoredMessage]] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            group: list[tuple[Sequence[Message], asyncio.Future[list[StoredMessage]]]] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0][0]) <= self.max_batch):
                item = self._queue.popleft()
                group.append(item)
                size += len(item[0])
            await self._write_group(group)

    async def _write_group(self, group: list[tuple[Sequence[Message], asyncio.Future[list[StoredMessage]]]]) -> None:
        batch = [m for messages, _ in group for m in messages]
        try:
            rows = await self.store.write(batch)
        except BackendError as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception:
            if len(group) == 1:
                _, future = group[0]
                if not future.done():
                    future.set_exception(BackendError("the store refused this write"))
                logger.exception("store write failed for %d messages", len(batch))
                return
            # one request's message may be the cause: write each request alone
            for item in group:
                await self._write_group([item])
            return
        self.transactions += 1
        offset = 0
        for messages, future in group:
            if not future.done():
                future.set_result(rows[offset: offset + len(messages)])
            offset += len(messages)
