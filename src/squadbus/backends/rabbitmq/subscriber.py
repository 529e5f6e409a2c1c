"""Consumers: one channel and one ``basic.consume`` per subscription, a dispatch task feeding the handler.

The broker pushes up to ``prefetch`` unacknowledged messages (``basic.qos``:
the larger of ``batch_size`` and ``max_in_flight``); the dispatch task hands
them to the handler one at a time (or up to ``max_in_flight`` at once) in the
order the queue holds them.

Attempts: a quorum queue counts how often it handed a message out and got it
back (``basic.nack`` with requeue, or the consumer's channel closing) in the
``x-delivery-count`` header; ``attempt`` is that count + 1, shared by every
member of the group and kept across restarts. A fan-out subscription's
exclusive queue has no such header; only this consumer ever gets its
messages back, so it counts them itself. Under ``profile=fast`` group and
inbox queues are classic queues, which have no delivery count either: each
consumer counts the deliveries it got of a message id, and a message it has
not seen with the broker's ``redelivered`` flag set is attempt 2 (another
consumer had it; how often is not known: see docs/backends/rabbitmq.md).

``nack(delay)``: a delay of 0 requeues at once. A longer delay keeps the
message unacknowledged here and requeues it when the delay has passed (a
3.10 quorum queue then delivers it after the messages already queued). It
holds a prefetch slot meanwhile and stays with this consumer: if the
consumer dies, the broker requeues it at once, which costs only an early retry.

``ack_wait`` (group members): a watchdog (:mod:`.leases`) looks every
``ack_wait / 4`` seconds for deliveries handed to the handler and still
unsettled ``ack_wait`` after that (or after the last
``Delivery.in_progress``). It then gives back
everything this member holds by closing its channel: the broker returns the
unacknowledged messages to the head of the queue, in order, delivery count + 1,
and hands them to the other members. A ``basic.nack`` would put them behind
what is queued, and with prefetch room left the queue may hand them straight
back to this consumer, behind the hung handler. The given-back deliveries are
marked settled, so the hung handler's late ack or failure sends nothing. The
member consumes again (a new channel) once the handlers of the given-back
deliveries have returned; until then it takes nothing. Fan-out subscriptions
have no other member to give to, and their queue goes with their consumer,
so ack_wait does not apply to them (nor to inboxes, which share one channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from squadbus.backends.rabbitmq.leases import HandlerLeases
from squadbus.backends.rabbitmq.topology import ORIGINAL_KEY_HEADER, binding_key, needs_filter, short_name
from squadbus.core import subjects
from squadbus.core.backend import (
    BatchRawHandler,
    ConsumerOptions,
    Delivery,
    InFlight,
    RawHandler,
    invoke,
    invoke_batch,
)
from squadbus.core.backoff import RECONNECT, Backoff
from squadbus.core.batching import fill_batch
from squadbus.core.dispatch import (
    DLQ_ATTEMPTS,
    DLQ_GROUP,
    DLQ_ORIGINAL_ID,
    DLQ_REASON,
    DLQ_SUBJECT,
    dead_letter_of,
)
from squadbus.core.envelope import Message, decode, new_id, utcnow
from squadbus.core.errors import MalformedMessage, SquadbusError

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend

logger = logging.getLogger("squadbus.backends.rabbitmq")

IncomingMessage = aio_pika.abc.AbstractIncomingMessage

_MALFORMED_CONTENT_LIMIT = 64 * 1024
_FAIRNESS_STREAK = 64
UNSETTLED_MARGIN = 2
"""Deliveries beyond ``max_deliver`` a message may get without being settled before it is dead-lettered."""
_LOCAL_COUNTS_LIMIT = 100_000
"""Message ids a consumer that counts attempts itself remembers (oldest forgotten first): an id nacked
here and then acked by another member is never settled here."""
_SETTLE_ERRORS = (aio_pika.exceptions.MessageProcessError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


async def settle(msg: IncomingMessage, *, ack: bool, what: str) -> None:
    """Ack (``ack``) or requeue ``msg`` now; a failure only means the broker redelivers it.

    Straight to the delivery's channel without waiting for the frame to be written
    (``IncomingMessage.ack`` waits for the socket drain: a loop round trip per message, which
    halved a one-at-a-time consumer's throughput). A settle lost with the connection only means a
    redelivery; callers settle a delivery once.
    """
    try:
        if ack:
            await msg.channel.basic_ack(delivery_tag=msg.delivery_tag or 0, wait=False)
        else:
            await msg.channel.basic_nack(delivery_tag=msg.delivery_tag or 0, requeue=True, wait=False)
    except _SETTLE_ERRORS as exc:
        # The channel closed (the broker requeued the message) or it was settled already.
        logger.info("could not %s %s %s (it will be redelivered): %s",
                    "ack" if ack else "requeue", what, msg.message_id, exc)


def malformed_dead_letter(msg: IncomingMessage, group: str, attempt: int, exc: MalformedMessage, key: str,
                          queue: str | None) -> Message:
    """The dead letter (on ``agent.dlq.<group>``) of bytes that are not an envelope, read from ``queue``."""
    text = bytes(msg.body[:_MALFORMED_CONTENT_LIMIT]).decode("utf-8", "replace")
    return Message(
        id=new_id(),
        subject=subjects.dead_letter(group),
        sender_id="squadbus-rabbitmq",
        content=text,
        message_type="malformed",
        metadata={"size": len(msg.body), "truncated": len(msg.body) > len(text), "queue": queue},
        created_at=utcnow(),
        headers={
            DLQ_REASON: f"malformed payload: {exc}"[:1000],
            DLQ_GROUP: group,
            DLQ_ATTEMPTS: str(attempt),
            DLQ_SUBJECT: key,
            DLQ_ORIGINAL_ID: msg.message_id or f"delivery-{msg.delivery_tag}",
        },
    )


class RabbitDelivery(Delivery):
    """A delivery backed by one AMQP delivery; settling sends ``basic.ack`` / ``basic.nack``."""

    __slots__ = ("_msg", "_sub")

    def __init__(self, message: Message, msg: IncomingMessage, attempt: int, sub: RabbitSubscription) -> None:
        super().__init__(message, attempt=attempt, group=sub.group)
        self._msg = msg
        self._sub = sub

    async def in_progress(self) -> None:
        """The handler is still working: its ``ack_wait`` starts again."""
        self._sub.extend(self)

    def given_back(self) -> None:
        """The subscription gave the message back to the broker (ack_wait passed): settled as a nack, so
        the handler's late ack, nack or failure sends nothing (the broker has the message again)."""
        if self._settled is None:
            self._settled = "nack"
            self._wake()

    def _ack(self) -> Awaitable[None]:
        return self._sub.send(self._msg, ack=True)

    def _nack(self, delay: float) -> Awaitable[None] | None:
        return self._sub.requeue(self._msg, delay)


class RabbitSubscription:
    """One member of a consumer group (a quorum queue) or a fan-out consumer (an exclusive queue)."""

    def __init__(
        self,
        backend: RabbitBackend,
        *,
        pattern: str,
        group: str | None,
        queue_name: str | None,
        handler: RawHandler,
        options: ConsumerOptions,
    ) -> None:
        self._backend = backend
        self._pattern = pattern
        self._group = group
        self._queue_name = queue_name
        self._handler = handler
        self._options = options
        self._filter = needs_filter(pattern)
        # None in the buffer wakes a dispatch waiting for a delivery after a give-back (see _next).
        self._buffer: asyncio.Queue[IncomingMessage | None] = asyncio.Queue()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._dispatch: asyncio.Task[None] | None = None
        self._later: dict[IncomingMessage, asyncio.TimerHandle] = {}
        self._attempts: dict[str, int] = {}
        # Attempts counted here, not by the broker: fan-out queues, and classic queues (profile=fast).
        self._counts_locally = group is None or backend.settings.classic_queues
        self._settling: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = False
        self._waiting_for_msg = False
        self._batch_handler: BatchRawHandler | None = None
        self._max_wait = 0.0
        # ack_wait (group members only); _parked: after a give-back, this member holds and takes nothing.
        self._watched = group is not None
        self._leases: HandlerLeases[RabbitDelivery] = HandlerLeases(options.ack_wait)
        self._parked = False
        self._watchdog: asyncio.Task[None] | None = None
        self.given_back = 0
        """Times this member gave back what it held because a handler passed ack_wait."""

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def group(self) -> str | None:
        return self._group

    @property
    def queue_name(self) -> str | None:
        """The group's queue, or the server-named exclusive queue of a fan-out subscription."""
        return self._queue.name if self._queue is not None else self._queue_name

    async def start(self) -> None:
        """Open the channel, declare (fan-out) or join (group) the queue, and start consuming."""
        await self._consume()
        name = f"squadbus-rabbitmq-{self._group or 'fanout'}"
        loop = asyncio.get_running_loop()
        self._dispatch = loop.create_task(self._dispatch_loop(), name=name)
        if self._watched:
            watch = self._leases.watch(self._give_back, lambda: self._parked or self._closing)
            self._watchdog = loop.create_task(watch, name=f"{name}-ack-wait")

    async def _consume(self) -> None:
        backend = self._backend
        channel = self._channel = await backend.connection.channel()
        await channel.set_qos(prefetch_count=max(self._options.batch_size, self._options.max_in_flight))
        if self._queue_name is not None:
            queue = await backend.declare_group_queue(channel, self._queue_name)
        else:
            # Named here, not by the server: after a reconnect aio-pika declares the queue again under
            # the name it had, and the broker refuses names starting with "amq." from clients.
            name = short_name(f"{backend.settings.namespace}.fanout.{new_id().hex}")
            queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
            await queue.bind(backend.settings.exchange, binding_key(self._pattern))
        self._queue = queue
        self._parked = False
        self._tag = await queue.consume(self._on_message)

    # ---- ack_wait ----------------------------------------------------------------------------

    def extend(self, delivery: RabbitDelivery) -> None:
        """Start ``delivery``'s ack_wait again (``Delivery.in_progress``)."""
        self._leases.extend(delivery)

    async def _give_back(self, late: list[RabbitDelivery]) -> None:
        """Hand everything this member holds back to the group (see the module docstring)."""
        self._parked = True
        self._leases.give_back_all()
        while not self._buffer.empty():
            self._buffer.get_nowait()  # unacknowledged on the channel: returned with it
        for timer in self._later.values():
            timer.cancel()  # the same (held for a nack delay)
        self._later.clear()
        self.given_back += 1
        ids = ", ".join(str(d.message.id) for d in late[:5])
        logger.warning(
            "group %s: the handler has not settled %s within ack_wait=%gs; this member gives back what it "
            "holds (its channel is closed: the broker hands it to another member) and takes nothing until "
            "that handler returns", self._group, ids, self._options.ack_wait)
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(*_SETTLE_ERRORS, TimeoutError):
                async with asyncio.timeout(5):
                    await channel.close()
        self._buffer.put_nowait(None)  # wakes a dispatch waiting for a delivery

    async def _resume(self) -> None:
        """After a give-back: wait for the hung handlers to return, then consume on a new channel."""
        await self._leases.hung_returned()
        backoff = Backoff(RECONNECT)
        while not self._closing:
            try:
                await self._consume()
            except Exception as exc:
                delay = backoff.next()
                logger.warning("group %s: could not consume again after giving back (%s: %s); retrying in %.2fs",
                               self._group, type(exc).__name__, exc, delay)
                channel = self._channel
                if channel is not None:
                    with contextlib.suppress(*_SETTLE_ERRORS, TimeoutError):
                        async with asyncio.timeout(1):
                            await channel.close()
                await asyncio.sleep(delay)
                continue
            logger.info("group %s: this member consumes again after giving back", self._group)
            return

    # ---- receiving ---------------------------------------------------------------------------

    async def _on_message(self, msg: IncomingMessage) -> None:
        if self._closing:
            await self.send(msg, ack=False)
            return
        if self._parked:
            return  # from the channel being closed by a give-back: the broker gets it back with it
        self._buffer.put_nowait(msg)

    async def _next(self) -> IncomingMessage | None:
        while not self._closing:
            if self._parked:
                self._waiting_for_msg = True
                try:
                    await self._resume()
                finally:
                    self._waiting_for_msg = False
                continue
            try:
                msg = self._buffer.get_nowait()
            except asyncio.QueueEmpty:
                self._waiting_for_msg = True
                try:
                    msg = await self._buffer.get()
                finally:
                    self._waiting_for_msg = False
            if msg is not None:
                return msg
        return None

    def use_batches(self, handler: BatchRawHandler, max_wait: float) -> None:
        """Before start: hand the handler batches of up to ``batch_size`` messages (one batch at a
        time) instead of one delivery per call, waiting at most ``max_wait`` after the first for more."""
        self._batch_handler = handler
        self._max_wait = max_wait

    async def _dispatch_loop(self) -> None:
        if self._batch_handler is not None:
            await self._dispatch_batches(self._batch_handler)
            return
        if self._options.max_in_flight > 1:
            await self._dispatch_concurrently(self._options.max_in_flight)
            return
        streak = 0
        while (msg := await self._next()) is not None:
            streak += 1
            if streak >= _FAIRNESS_STREAK:
                streak = 0
                await asyncio.sleep(0)
            await self._handle(msg)

    async def _dispatch_concurrently(self, limit: int) -> None:
        inflight = InFlight(limit)
        try:
            while True:
                await inflight.slot()
                try:
                    msg = await self._next()
                except asyncio.CancelledError:
                    inflight.give_back()
                    raise
                if msg is None:
                    inflight.give_back()
                    break
                inflight.start(self._handle(msg))
        finally:
            await inflight.finish()

    async def _dispatch_batches(self, handler: BatchRawHandler) -> None:
        limit = self._options.batch_size
        while (first := await self._next()) is not None:
            msgs: list[IncomingMessage | None] = [first]
            self._waiting_for_msg = True  # fill_batch only suspends in queue.get(): safe to cancel
            try:
                await fill_batch(self._buffer, msgs, limit, self._max_wait)
            except asyncio.CancelledError:
                for msg in msgs:  # closing: back to the queue at once
                    if msg is not None:
                        await self.send(msg, ack=False)
                raise
            finally:
                self._waiting_for_msg = False
            deliveries: list[RabbitDelivery] = []
            for msg in msgs:
                # None: a give-back's wake-up (the batch's messages were given back with the channel)
                delivery = await self._delivery_of(msg) if msg is not None and not self._parked else None
                if delivery is not None:
                    deliveries.append(delivery)
            if not deliveries:
                continue
            if not self._watched:
                await invoke_batch(handler, deliveries, self._options)
                continue
            for delivery in deliveries:
                self._leases.start(delivery)
            try:
                await invoke_batch(handler, deliveries, self._options)
            finally:
                for delivery in deliveries:
                    self._leases.end(delivery)

    def _attempt(self, msg: IncomingMessage) -> int:
        if not self._counts_locally:
            count = (msg.headers or {}).get("x-delivery-count", 0)
            return (count if isinstance(count, int) else 0) + 1
        key = msg.message_id or str(msg.delivery_tag)
        seen = self._attempts.pop(key, 0)
        # Not seen here but redelivered: another consumer (or a closed channel of this one) had it.
        attempt = self._attempts[key] = max(seen + 1, 2 if msg.redelivered else 1)
        if len(self._attempts) > _LOCAL_COUNTS_LIMIT:
            del self._attempts[next(iter(self._attempts))]
        return attempt

    async def _delivery_of(self, msg: IncomingMessage) -> RabbitDelivery | None:
        """The delivery of ``msg``; None (after dead-lettering or dropping it) when there is nothing to handle."""
        attempt = self._attempt(msg)
        try:
            message = decode(msg.body)
        except MalformedMessage as exc:
            await self._malformed(msg, exc, attempt)
            return None
        if self._filter and not subjects.matches(self._pattern, message.subject):
            await self.send(msg, ack=True)  # bound wider than the pattern (a literal '#' token)
            return None
        delivery = RabbitDelivery(message, msg, attempt, self)
        if self._group is not None and attempt > self._options.max_deliver + UNSETTLED_MARGIN:
            await self._dead_letter_unsettled(delivery, msg)
            return None
        return delivery

    async def _dead_letter_unsettled(self, delivery: RabbitDelivery, msg: IncomingMessage) -> None:
        """Dead-letter a message handed out more than ``max_deliver`` + margin times without being
        settled (its consumers crashed, closed or hung each time): a message that kills its consumer
        must not be redelivered forever. The Bus dead-letters a handler that *raised* on the last attempt."""
        options = self._options
        reason = (f"delivered {delivery.attempt - 1} times without being settled (consumers crashed, closed or "
                  f"hung); max_deliver {options.max_deliver} + {UNSETTLED_MARGIN}")
        try:
            await self._backend.publish(dead_letter_of(delivery, reason))
        except SquadbusError:
            logger.exception("could not dead-letter message %s of group %s; will retry",
                             delivery.message.id, self._group)
            self.nack_later(msg, options.backoff(delivery.attempt))
            return
        logger.warning("dead-lettered message %s of group %s: %s", delivery.message.id, self._group, reason)
        await self.send(msg, ack=True)

    async def _handle(self, msg: IncomingMessage) -> None:
        delivery = await self._delivery_of(msg)
        if delivery is None:
            return
        if not self._watched:
            await invoke(self._handler, delivery, self._options)
            return
        self._leases.start(delivery)
        try:
            await invoke(self._handler, delivery, self._options)
        finally:
            self._leases.end(delivery)

    async def _malformed(self, msg: IncomingMessage, exc: MalformedMessage, attempt: int) -> None:
        """Dead-letter bytes that are not an envelope, so they never block the queue."""
        headers = msg.headers or {}
        key = str(headers.get(ORIGINAL_KEY_HEADER) or msg.routing_key or "")
        if self._group is None:
            logger.error("dropping malformed message on %s (fan-out consumer): %s", key, exc)
            await self.send(msg, ack=True)
            return
        dead = malformed_dead_letter(msg, self._group, attempt, exc, key, self.queue_name)
        try:
            await self._backend.publish(dead)
        except SquadbusError:
            logger.exception("could not dead-letter a malformed message of group %s; will retry", self._group)
            self.nack_later(msg, self._options.backoff(attempt))
            return
        logger.warning("dead-lettered a malformed message of group %s from %s: %s", self._group, key, exc)
        await self.send(msg, ack=True)

    # ---- settling ----------------------------------------------------------------------------

    async def send(self, msg: IncomingMessage, *, ack: bool) -> None:
        """Ack (or requeue) ``msg`` now; a failure only means the broker redelivers it."""
        if ack and self._counts_locally and msg.message_id:
            self._attempts.pop(msg.message_id, None)
        await settle(msg, ack=ack, what="message")

    def requeue(self, msg: IncomingMessage, delay: float) -> Awaitable[None] | None:
        """Give ``msg`` back for redelivery after ``delay`` seconds (a nacked delivery)."""
        if delay > 0:
            self.nack_later(msg, delay)
            return None
        return self.send(msg, ack=False)

    def nack_later(self, msg: IncomingMessage, delay: float) -> None:
        """Requeue ``msg`` after ``delay`` seconds (at once when the subscription closes)."""
        if self._closing:
            self._spawn(self.send(msg, ack=False))
            return
        loop = asyncio.get_running_loop()
        self._later[msg] = loop.call_later(delay, self._requeue_now, msg)

    def _requeue_now(self, msg: IncomingMessage) -> None:
        if self._later.pop(msg, None) is not None:
            self._spawn(self.send(msg, ack=False))

    def _spawn(self, settling: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(settling)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    # ---- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop consuming, requeue what was buffered or held, let the handler in progress finish. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        # While the connection is down the broker has dropped the consumer and requeued what it held:
        # nothing to cancel or close (waiting for the reconnect would only stall the close).
        connected = self._backend.connected
        queue, tag = self._queue, self._tag
        if connected and queue is not None and tag is not None:
            with contextlib.suppress(*_SETTLE_ERRORS, TimeoutError):
                await queue.cancel(tag, timeout=5)
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        dispatch = self._dispatch
        if dispatch is not None:
            if self._waiting_for_msg:
                dispatch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch
        while not self._buffer.empty():
            msg = self._buffer.get_nowait()
            if msg is not None:
                await self.send(msg, ack=False)
        for msg, timer in list(self._later.items()):
            timer.cancel()
            await self.send(msg, ack=False)
        self._later.clear()
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self._channel is not None:
            # A robust channel marks itself closed (not to be restored by a reconnect) before it
            # talks to the broker, so a close that times out on a dead connection still counts.
            with contextlib.suppress(*_SETTLE_ERRORS, TimeoutError):
                async with asyncio.timeout(5 if connected else 0.5):
                    await self._channel.close()
        self._backend.forget(self)
