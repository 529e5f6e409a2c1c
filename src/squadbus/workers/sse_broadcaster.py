"""The sse-broadcaster worker: wakes this replica's SSE feeds when a message is published anywhere.

Each service replica runs one, as an *ephemeral* subscription (no consumer
group, start at new messages): every replica must see every message, and a
replica that restarts has nothing to catch up on, because SSE viewers are fed
from the history store, not from the bus. The callback only tells the hub
"execution X has new message ids"; the hub reads the store once the
db-writer (here or in another process) has written them. Slow handling never
blocks publishers: the subscription drops its oldest buffered message when it
falls behind, and the hub's periodic poll covers what was dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from uuid import UUID

from squadbus.core.backend import ConsumerOptions, Delivery, SlowConsumerPolicy, StartFrom, Subscription
from squadbus.core.bus import Bus
from squadbus.workers.analytics import LATENCY_BUCKETS, Histogram

logger = logging.getLogger("squadbus.workers.sse_broadcaster")

Wake = Callable[[UUID, Sequence[UUID]], None]
"""Called with ``(task_execution_id, [message ids])`` for each published message of an execution."""

PATTERNS = ("agent.message.>", "agent.reply.>")


class SseBroadcaster:
    """Calls ``wake`` for every message of an execution published on the bus (see module docstring)."""

    name = "sse-broadcaster"

    def __init__(self, bus: Bus, wake: Wake | None = None, *, max_pending: int = 10_000) -> None:
        self.bus = bus
        self.wake = wake
        self.seen = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self._options = ConsumerOptions(
            start=StartFrom.NEW, max_deliver=1, max_pending=max_pending,
            slow_consumer=SlowConsumerPolicy.DROP_OLDEST,
        )
        self._subs: list[Subscription] = []

    async def _handle(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        message = delivery.message
        self.seen += 1
        if message.task_execution_id is None:
            return
        if self.wake is None:
            logger.debug("message %s of execution %s published", message.id, message.task_execution_id)
        else:
            self.wake(message.task_execution_id, (message.id,))
        self.latency.observe(time.perf_counter() - started)

    async def start(self) -> None:
        """Subscribe (idempotent)."""
        if self._subs:
            return
        for pattern in PATTERNS:
            self._subs.append(await self.bus.subscribe(pattern, self._handle, options=self._options))

    async def stop(self) -> None:
        """Unsubscribe; a handler in progress finishes first. Idempotent."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await self.bus.unsubscribe(sub)
