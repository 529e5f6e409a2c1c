"""Turns a user handler into a backend handler that always settles the delivery.

The outcome of a handler call is sorted into exactly one of:

* returned (and did not settle the delivery itself): **ack**;
* raised :class:`~squadbus.core.errors.Nack` / ``Retry`` or any other
  exception, with attempts left: **nack** with the backoff delay (a ``Nack``
  with its own ``delay`` uses that, ``0`` meaning at once);
* raised :class:`~squadbus.core.errors.Reject`, or failed on its last
  attempt: **dead letter** to ``agent.dlq.<group>`` with the reason in the
  headers, then **term**. If the dead-letter publish fails the delivery is
  nacked instead, so nothing is lost.

:func:`wrap_batch` does the same per delivery of a batch: a batch handler
returns the deliveries that failed with their exception, or raises for all.

Every delivery the wrappers hand out gets :meth:`_Settler.failed` as its
failure policy, so ``async with delivery:`` and ``Delivery.fail`` (the inbox's
way to fail a delivery) settle exactly as a raising handler does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from squadbus.core import subjects
from squadbus.core.backend import (
    BatchRawHandler,
    ConsumerOptions,
    Delivery,
    FailurePolicy,
    RawHandler,
    settles_itself,
)
from squadbus.core.envelope import Message, new_id
from squadbus.core.errors import Nack, Reject, SquadbusError

Handler = Callable[[Delivery], Awaitable[None]]
"""A user handler: gets the delivery, may ack/nack it, raises to fail."""

BatchHandler = Callable[[Sequence[Delivery]], Awaitable[Mapping[Delivery, BaseException] | None]]
"""A user batch handler: gets up to ``max_batch`` deliveries, returns the failed ones (or raises)."""

Publish = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("squadbus.dispatch")

DLQ_REASON = "dlq-reason"
DLQ_GROUP = "dlq-group"
DLQ_ATTEMPTS = "dlq-attempts"
DLQ_SUBJECT = "dlq-original-subject"
DLQ_ORIGINAL_ID = "dlq-original-id"


@dataclass(slots=True)
class DispatchStats:
    """Counters of handler outcomes, shared by every subscription of a Bus."""

    delivered: int = 0
    acked: int = 0
    redelivered: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    handler_errors: int = 0
    gaps: int = 0


def dead_letter_of(delivery: Delivery, reason: str) -> Message:
    """The message that goes to the DLQ for ``delivery`` failing with ``reason``.

    It gets a new id (brokers dedupe by id) and keeps the original in headers.
    """
    group = delivery.group or "ephemeral"
    original = delivery.message
    return original.evolve(
        id=new_id(),
        subject=subjects.dead_letter(group),
        headers={
            **original.headers,
            DLQ_REASON: reason[:1000],
            DLQ_GROUP: group,
            DLQ_ATTEMPTS: str(delivery.attempt),
            DLQ_SUBJECT: original.subject,
            DLQ_ORIGINAL_ID: str(original.id),
        },
    )


class _Settler:
    """Sorts one delivery's failure into nack or dead letter (shared by the single and batch wrappers)."""

    __slots__ = ("options", "publish", "stats")

    def __init__(self, options: ConsumerOptions, publish: Publish, stats: DispatchStats) -> None:
        self.options = options
        self.publish = publish
        self.stats = stats

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        try:
            await self.publish(dead_letter_of(delivery, reason))
        except SquadbusError:
            logger.exception("dead-letter publish failed; nacking %s instead", delivery.message.id)
            await delivery.nack(self.options.backoff(delivery.attempt))
            return
        self.stats.dead_lettered += 1
        logger.warning(
            "dead-lettered message %s of group %s after %d attempts: %s",
            delivery.message.id, delivery.group, delivery.attempt, reason,
        )
        await delivery.term()

    async def fail(self, delivery: Delivery, exc: BaseException, *, log: bool = True) -> None:
        """Settle an unsettled ``delivery`` whose handling raised ``exc``."""
        options = self.options
        if isinstance(exc, Reject):
            await self.dead_letter(delivery, f"rejected: {exc.reason}")
            return
        if isinstance(exc, Nack):
            if delivery.attempt >= options.max_deliver:
                await self.dead_letter(delivery, f"max_deliver ({options.max_deliver}) reached; last: {exc.reason}")
                return
            self.stats.nacked += 1
            await delivery.nack(exc.delay if exc.delay is not None else options.backoff(delivery.attempt))
            return
        self.stats.handler_errors += 1
        reason = f"{type(exc).__name__}: {exc}"
        if delivery.attempt >= options.max_deliver:
            if log:
                logger.error("handler failed on last attempt for message %s", delivery.message.id, exc_info=exc)
            await self.dead_letter(delivery, f"max_deliver ({options.max_deliver}) reached; last: {reason}")
            return
        if log:
            logger.warning(
                "handler failed for message %s (attempt %d of %d), will retry: %s",
                delivery.message.id, delivery.attempt, options.max_deliver, reason,
            )
        self.stats.nacked += 1
        await delivery.nack(options.backoff(delivery.attempt))

    async def failed(self, delivery: Delivery, exc: Exception) -> None:
        """The handling of ``delivery`` raised ``exc``: settle it by :meth:`fail`, or log if it was settled.

        It is every Bus delivery's ``Delivery.fail`` (and so ``async with delivery``), so a handler,
        a batch handler and an inbox loop all fail the same way.
        """
        if delivery.settled is None:
            await self.fail(delivery, exc)
        elif not isinstance(exc, Nack | Reject):
            self.stats.handler_errors += 1
            logger.error("handler failed after settling message %s", delivery.message.id, exc_info=exc)

    def count_unusual(self, delivery: Delivery) -> None:
        """Count a redelivery or a gap (``delivered`` is counted by the caller)."""
        stats = self.stats
        if delivery.attempt > 1:
            stats.redelivered += 1
        if delivery.gap_before:
            stats.gaps += delivery.gap_before


def failure_policy(options: ConsumerOptions, publish: Publish, stats: DispatchStats) -> FailurePolicy:
    """What ``Delivery.fail`` does for deliveries a Bus hands out without :func:`wrap` (inbox broadcast
    copies): retry with backoff, dead-letter after ``max_deliver``, as a wrapped handler's failure."""
    return _Settler(options, publish, stats).failed


def wrap(handler: Handler, options: ConsumerOptions, publish: Publish, stats: DispatchStats) -> RawHandler:
    """A RawHandler running ``handler`` and settling every delivery.

    It keeps :func:`~squadbus.core.backend.invoke`'s promises itself (cancelled:
    nack the unsettled delivery; a failure to settle is logged, never raised),
    so backends call it without a guard around it.
    """
    settler = _Settler(options, publish, stats)
    failed = settler.failed

    async def run(delivery: Delivery) -> None:
        # Per record on every backend: attributes read directly (``_settled``, not the ``settled``
        # property), the handler's coroutine awaited in place.
        stats.delivered += 1
        delivery._on_failure = failed
        if delivery.attempt > 1 or delivery.gap_before:
            settler.count_unusual(delivery)
        try:
            try:
                await handler(delivery)
            except Exception as exc:  # a failing handler means nack, by contract
                await failed(delivery, exc)
                return
            if delivery._settled is None:
                pending = delivery.ack_soon()
                if pending is not None:
                    await pending
                stats.acked += 1
        except asyncio.CancelledError:
            if delivery.settled is None:
                await delivery.nack()
            raise
        except Exception:
            logger.exception("settling message %s failed", delivery.message.id)
            if delivery.settled is None:
                await delivery.nack(options.backoff(delivery.attempt))

    return settles_itself(run)


def wrap_batch(
    handler: BatchHandler, options: ConsumerOptions, publish: Publish, stats: DispatchStats
) -> BatchRawHandler:
    """A BatchRawHandler running ``handler`` on a batch and settling every delivery of it.

    ``handler`` returns None (all succeeded: ack all) or a mapping of the
    deliveries that failed to their exception (each settled as if its own
    handler had raised it: ``Reject`` dead-letters, ``Nack`` or any other
    error retries); the rest are acked. If ``handler`` raises, every
    delivery it did not settle itself gets that exception's outcome. (Not marked
    ``settles_itself``: :func:`~squadbus.core.backend.invoke_batch` guards it; one
    coroutine per batch is nothing.)
    """
    settler = _Settler(options, publish, stats)
    failed = settler.failed

    async def run(deliveries: Sequence[Delivery]) -> None:
        stats.delivered += len(deliveries)
        for delivery in deliveries:
            delivery._on_failure = failed
            if delivery.attempt > 1 or delivery.gap_before:
                settler.count_unusual(delivery)
        failures: Mapping[Delivery, BaseException]
        try:
            failures = await handler(deliveries) or {}
        except Exception as exc:
            if not isinstance(exc, Nack | Reject):
                logger.warning("batch handler failed for %d messages (first attempt %d), will settle each: %s",
                               len(deliveries), deliveries[0].attempt if deliveries else 0, exc)
            failures = dict.fromkeys(deliveries, exc)
        for delivery in deliveries:
            if delivery.settled is not None:
                continue
            failure = failures.get(delivery)
            if failure is None:
                pending = delivery.ack_soon()
                if pending is not None:
                    await pending
                stats.acked += 1
            else:
                await settler.fail(delivery, failure, log=False)

    return run
