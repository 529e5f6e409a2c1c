"""The bridge: copy messages from one backend to another during a migration.

A durable consumer group (``bridge`` by default) on the source republishes
each message, unchanged and with the same ``id``, to the destination, and
acks on the source only after the destination stored it. A crash re-sends
at most the unacked messages; the destination (or the idempotent db-writer)
drops the copies by id. A (re)started bridge takes over what its group
holds unacknowledged before copying anything new (``ConsumerOptions.take_over``),
so a crash does not reorder an execution in the destination; run one bridge
per group. Messages the bridge itself would loop back (a
bridge in each direction) carry the ``bridged-from`` header and are skipped.
"""

from __future__ import annotations

import logging

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom, Subscription
from squadbus.core.bus import Bus

logger = logging.getLogger("squadbus.workers.bridge")

BRIDGED_FROM = "bridged-from"


class Bridge:
    """Copies ``pattern`` from ``source`` to ``destination``; ``start()``/``stop()``."""

    name = "bridge"

    def __init__(
        self,
        source: Bus,
        destination: Bus,
        *,
        pattern: str = subjects.ALL,
        group: str = "bridge",
        start_from: StartFrom = StartFrom.EARLIEST,
        ack_wait: float = 30.0,
    ) -> None:
        self.source = source
        self.destination = destination
        self.pattern = pattern
        self.group = group
        self.start_from = start_from
        self.ack_wait = ack_wait
        self.copied = 0
        self.skipped = 0
        self._sub: Subscription | None = None

    async def _copy(self, delivery: Delivery) -> None:
        message = delivery.message
        if BRIDGED_FROM in message.headers or message.subject.startswith(subjects.DLQ_PREFIX + "."):
            self.skipped += 1
            return
        await self.destination.publish(message.with_headers(**{BRIDGED_FROM: self.source.backend.name}))
        self.copied += 1

    async def start(self) -> None:
        """Start copying (idempotent)."""
        if self._sub is None:
            options = ConsumerOptions(start=self.start_from, max_deliver=1_000_000, backoff_max=10.0,
                                      ack_wait=self.ack_wait, take_over=True)
            self._sub = await self.source.subscribe(self.pattern, self._copy, group=self.group, options=options)
            logger.info("bridge %s -> %s started on %s", self.source.backend.name,
                        self.destination.backend.name, self.pattern)

    async def stop(self) -> None:
        """Stop after the message in progress is copied and acked (idempotent)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await self.source.unsubscribe(sub)
