"""The dead-letter keeper: every message on ``agent.dlq.>`` into the store's dead-letter table.

The db-writer acks dead letters without storing them (they are copies of
stored messages, not history). This worker, consumer group
``dead-letter-keeper``, keeps them where the dashboard and
``/v1/dead-letters`` can list, re-drive and discard them
(:class:`~squadbus.store.dead_letters.KeepsDeadLetters`). Batches are acked
after the store kept them; keeping is idempotent by id, so a redelivery is
kept once. A store failure nacks the batch (the backend redelivers it after a
backoff); a store that cannot keep dead letters makes :meth:`start` a no-op,
logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, Subscription
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.store.base import HistoryStore
from squadbus.store.dead_letters import KeepsDeadLetters

logger = logging.getLogger("squadbus.workers.dead_letters")

GROUP = "dead-letter-keeper"
PATTERN = subjects.DLQ_PREFIX + ".>"

OnKept = Callable[[Sequence[Message]], Awaitable[None]]


class DeadLetterKeeper:
    """Keeps every dead letter in ``store`` (see the module docstring).

    ``on_kept(messages)`` is awaited after each kept batch (every message of
    the batch, new or already kept); its failure is logged, the batch still acked.
    """

    name = GROUP

    def __init__(self, bus: Bus, store: HistoryStore, *, batch_size: int = 100, max_wait: float = 0.05,
                 on_kept: OnKept | None = None) -> None:
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_kept = on_kept
        self.kept = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Join group ``dead-letter-keeper`` on ``agent.dlq.>`` (idempotent)."""
        if self._sub is not None:
            return
        if not isinstance(self.store, KeepsDeadLetters):
            logger.warning("%s cannot keep dead letters: the dashboard will list none", type(self.store).__name__)
            return
        options = ConsumerOptions(max_deliver=1_000_000, backoff_base=0.2, backoff_max=5.0)
        self._sub = await self.bus.subscribe_batch(PATTERN, self._handle, group=GROUP, max_batch=self.batch_size,
                                                   max_wait=self.max_wait, options=options)

    async def stop(self) -> None:
        """Unsubscribe after the batch in flight is kept and acked (idempotent)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await self.bus.unsubscribe(sub)

    async def _handle(self, deliveries: Sequence[Delivery]) -> None:
        store = self.store
        assert isinstance(store, KeepsDeadLetters)
        messages = [d.message for d in deliveries]
        # raising fails the whole batch: each delivery is nacked with backoff and kept on redelivery
        self.kept += await store.keep_dead_letters(messages)
        if self.on_kept is not None:
            try:
                await self.on_kept(messages)
            except Exception:
                logger.exception("on_kept callback failed for a kept batch of %d", len(messages))
