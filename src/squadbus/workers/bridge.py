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

A copy the destination does not store (down, timing out, restarting: a
:class:`~squadbus.core.errors.BackendError`) is retried in place with backoff
(``retry_base`` doubling up to ``retry_max`` seconds) until it is stored. The
bridge copies one message at a time, so nothing behind it is copied
meanwhile and every execution keeps its order in the destination; the
delivery's lease on the source is extended (``Delivery.in_progress``) every
``ack_wait / 3`` so the source does not hand it to anyone else. An outage is
logged once when it starts and once when it ends, with the destination and
the error; ``retries`` counts the attempts after the first. ``stop()`` ends a
wait at once: the delivery goes back to the source unacknowledged, and the
next bridge takes it over first. A retried copy may have been stored by the
attempt that looked failed (a timeout): Redis and NATS destinations drop the
second by id; Kafka (tansu has no idempotent producer) can store it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom, Subscription, leases_kept
from squadbus.core.backoff import Backoff, BackoffPolicy
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, ConfigError
from squadbus.core.tasks import cancel_and_wait

logger = logging.getLogger("squadbus.workers.bridge")

BRIDGED_FROM = "bridged-from"


class Bridge:
    """Copies ``pattern`` from ``source`` to ``destination``; ``start()``/``stop()``.

    ``copied``, ``skipped`` and ``retries`` (copy attempts after a failed one)
    count since construction; ``outages`` counts the runs of failed copies.
    """

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
        retry_base: float = 0.05,
        retry_max: float = 5.0,
    ) -> None:
        if not 0 < retry_base <= retry_max:
            raise ConfigError("need 0 < retry_base <= retry_max")
        self.source = source
        self.destination = destination
        self.pattern = pattern
        self.group = group
        self.start_from = start_from
        self.ack_wait = ack_wait
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.copied = 0
        self.skipped = 0
        self.retries = 0
        self.outages = 0
        self._sub: Subscription | None = None
        self._stopping = asyncio.Event()

    async def _copy(self, delivery: Delivery) -> None:
        message = delivery.message
        if BRIDGED_FROM in message.headers or message.subject.startswith(subjects.DLQ_PREFIX + "."):
            self.skipped += 1
            return
        copy = message.with_headers(**{BRIDGED_FROM: self.source.backend.name})
        try:
            await self.destination.publish(copy)
        except BackendError as exc:
            if not await self._retry(delivery, copy, exc):
                return
        self.copied += 1

    async def _retry(self, delivery: Delivery, copy: Message, error: BackendError) -> bool:
        """Publish ``copy`` again until the destination stores it (True), holding ``delivery``;
        False when the bridge stops first (the delivery is then given back to the source)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.outages += 1
        destination = self.destination.backend.name
        logger.warning(
            "bridge: %s did not store message %s (execution %s): %s: %s; retrying it with backoff up to %ss, "
            "copying nothing after it meanwhile", destination, copy.id, copy.task_execution_id,
            type(error).__name__, error, self.retry_max,
        )
        backoff, retries = Backoff(BackoffPolicy(self.retry_base, self.retry_max)), 0
        async with leases_kept([delivery], self.ack_wait / 3):
            while True:
                if await self._stopped_within(backoff.next()):
                    break
                self.retries += 1
                retries += 1
                attempt = loop.create_task(self.destination.publish(copy))
                stopping = loop.create_task(self._stopping.wait())
                try:
                    await asyncio.wait((attempt, stopping), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    stopped = not attempt.done()  # the bridge stops, or this handler is cancelled
                    if stopped:
                        # Ended before this handler goes on, or before its own cancellation propagates.
                        with contextlib.suppress(BackendError):
                            await cancel_and_wait(attempt)
                if stopped:
                    break
                failure = attempt.exception()
                if failure is None:
                    logger.info("bridge: %s stores copies again after %.1fs and %d retries", destination,
                                loop.time() - began, retries)
                    return True
                if not isinstance(failure, BackendError):
                    raise failure
                logger.debug("bridge: retry of %s failed: %s", copy.id, failure)
        logger.warning("bridge: stopped while %s was down; message %s goes back to the source uncopied",
                       destination, copy.id)
        await delivery.nack()
        return False

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def start(self) -> None:
        """Start copying (idempotent)."""
        if self._sub is None:
            self._stopping.clear()
            options = ConsumerOptions(start=self.start_from, max_deliver=1_000_000, backoff_max=10.0,
                                      ack_wait=self.ack_wait, take_over=True)
            self._sub = await self.source.subscribe(self.pattern, self._copy, group=self.group, options=options)
            logger.info("bridge %s -> %s started on %s", self.source.backend.name,
                        self.destination.backend.name, self.pattern)

    async def stop(self) -> None:
        """Stop after the message in progress is copied and acked (idempotent); a copy waiting for
        the destination to come back is not waited for: it goes back to the source."""
        sub, self._sub = self._sub, None
        if sub is not None:
            self._stopping.set()
            await self.source.unsubscribe(sub)
