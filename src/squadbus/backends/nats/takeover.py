"""``ConsumerOptions.take_over`` on JetStream: bring back a dead member's messages before new ones.

A durable pull consumer redelivers what a dead member held unacknowledged only after
``ack_wait``; meanwhile a new member is handed newer messages, so an execution would be
processed out of order. JetStream has no "redeliver everything pending" call, but any client
may settle a delivery by publishing to its ack subject
``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``,
and the server checks only that the stream sequence is pending and that the consumer
sequence lies between the ack floor and the last delivery (``consumer.processNak``).

So a member taking over reads the consumer's ack floor and last delivery, and sends ``-NAK``
for every stream sequence in between, in order: the pending ones go to the consumer's
redelivery queue in stream order (the others are ignored), and the server serves that queue
before any new message. The last ``-NAK`` is a request: the server answers it after it
processed every earlier one on the same queue, so the first pull request, sent afterwards,
finds them queued. Delivery counts are kept (``-NAK`` is not a reset).

Limits: a pending message whose ``ack_wait`` had already expired (so it was queued for
redelivery before the take-over) keeps its place at the head of the queue; more than
``MAX_SEQUENCES`` sequences between ack floor and last delivery (one old message stuck
pending in a busy stream) are not taken over, the pending ones come back after ``ack_wait``.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from squadbus.backends.nats.translate import translate

logger = logging.getLogger("squadbus.backends.nats")

MAX_SEQUENCES = 1_000_000
"""At most this many stream sequences are naked by one take-over (~1 s of publishes)."""


async def take_over(nc: Client, js: JetStreamContext, stream: str, consumer: str, *, timeout: float) -> int:
    """Queue every message ``consumer`` holds unacknowledged for redelivery, in stream order,
    before the caller's first pull. Returns how many were pending; raises BackendError."""
    try:
        info = await js.consumer_info(stream, consumer)
    except Exception as exc:
        raise translate(exc, f"look up consumer {consumer}") from exc
    pending = info.num_ack_pending or 0
    ack_floor, delivered = info.ack_floor, info.delivered
    if not pending or ack_floor is None or delivered is None:
        return 0
    first = (ack_floor.stream_seq or 0) + 1
    last = delivered.stream_seq or 0
    # Any consumer sequence in (ack floor, last delivery] passes the server's range check.
    consumer_seq = delivered.consumer_seq or 0
    if last < first:
        return 0
    if last - first + 1 > MAX_SEQUENCES:
        logger.warning(
            "consumer %s: %d unacknowledged messages spread over %d stream sequences; not taking them over "
            "(they come back after ack_wait)", consumer, pending, last - first + 1,
        )
        return pending
    prefix = f"$JS.ACK.{stream}.{consumer}.1."
    try:
        for seq in range(first, last):
            await nc.publish(f"{prefix}{seq}.{consumer_seq}.0.0", b"-NAK")
        await nc.request(f"{prefix}{last}.{consumer_seq}.0.0", b"-NAK", timeout=timeout)
    except (nats.errors.Error, TimeoutError) as exc:
        raise translate(exc, f"take over the pending messages of {consumer}") from exc
    logger.info("consumer %s: took over %d unacknowledged messages (stream seq %d..%d)", consumer, pending,
                first, last)
    return pending
