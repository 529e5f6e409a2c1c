"""Turns a user handler into a backend handler that always settles the delivery.

The outcome of a handler call is sorted into exactly one of:

* returned (and did not settle the delivery itself): **ack**;
* raised :class:`~squadbus.core.errors.Nack` / ``Retry`` or any other
  exception, with attempts left: **nack** with the backoff delay;
* raised :class:`~squadbus.core.errors.Reject`, or failed on its last
  attempt: **dead letter** to ``agent.dlq.<group>`` with the reason in the
  headers, then **term**. If the dead-letter publish fails the delivery is
  nacked instead, so nothing is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, RawHandler
from squadbus.core.envelope import Message, new_id
from squadbus.core.errors import Nack, Reject, SquadbusError

Handler = Callable[[Delivery], Awaitable[None]]
"""A user handler: gets the delivery, may ack/nack it, raises to fail."""

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


def wrap(handler: Handler, options: ConsumerOptions, publish: Publish, stats: DispatchStats) -> RawHandler:
    """A RawHandler running ``handler`` and settling every delivery."""

    async def dead_letter(delivery: Delivery, reason: str) -> None:
        try:
            await publish(dead_letter_of(delivery, reason))
        except SquadbusError:
            logger.exception("dead-letter publish failed; nacking %s instead", delivery.message.id)
            await delivery.nack(options.backoff(delivery.attempt))
            return
        stats.dead_lettered += 1
        logger.warning(
            "dead-lettered message %s of group %s after %d attempts: %s",
            delivery.message.id, delivery.group, delivery.attempt, reason,
        )
        await delivery.term()

    async def run(delivery: Delivery) -> None:
        stats.delivered += 1
        if delivery.attempt > 1:
            stats.redelivered += 1
        if delivery.gap_before:
            stats.gaps += delivery.gap_before
        try:
            await handler(delivery)
        except Reject as exc:
            await dead_letter(delivery, f"rejected: {exc.reason}")
            return
        except Nack as exc:
            if delivery.settled is not None:
                return
            if delivery.attempt >= options.max_deliver:
                await dead_letter(delivery, f"max_deliver ({options.max_deliver}) reached; last: {exc.reason}")
                return
            stats.nacked += 1
            delay = exc.delay if exc.delay is not None else options.backoff(delivery.attempt)
            await delivery.nack(delay)
            return
        except Exception as exc:  # a failing handler means nack, by contract
            stats.handler_errors += 1
            if delivery.settled is not None:
                logger.exception("handler failed after settling message %s", delivery.message.id)
                return
            reason = f"{type(exc).__name__}: {exc}"
            if delivery.attempt >= options.max_deliver:
                logger.exception("handler failed on last attempt for message %s", delivery.message.id)
                await dead_letter(delivery, f"max_deliver ({options.max_deliver}) reached; last: {reason}")
                return
            logger.warning(
                "handler failed for message %s (attempt %d of %d), will retry: %s",
                delivery.message.id, delivery.attempt, options.max_deliver, reason,
            )
            stats.nacked += 1
            await delivery.nack(options.backoff(delivery.attempt))
            return
        if delivery.settled is None:
            await delivery.ack()
            stats.acked += 1

    return run
