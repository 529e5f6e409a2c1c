"""Consumers: one channel and one ``basic.consume`` per subscription, run by core's consumer runtime.

A subscription is core's consumer runtime (:class:`RabbitConsumer`, a
:class:`~squadbus.core.consumer.Consumer`: handler calls, ``max_in_flight``,
batches, fairness, close) over a :class:`RabbitSubscription`, the
:class:`~squadbus.core.source.DeliverySource` that consumes, buffers, decodes
and settles. The broker pushes up to ``prefetch`` unacknowledged messages
(``basic.qos``: the larger of ``batch_size`` and ``max_in_flight``) to the
consume callback, which buffers them; the runtime takes them in the order
the queue holds them. ``close()`` (after the runtime's handlers finished)
cancels the consumer and requeues what was buffered and not handed out, in
order.

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
from collections import deque
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, cast

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from squadbus.backends.rabbitmq.leases import HandlerLeases
from squadbus.backends.rabbitmq.topology import ORIGINAL_KEY_HEADER, binding_key, needs_filter, short_name
from squadbus.core import subjects
from squadbus.core.backend import BatchRawHandler, ConsumerOptions, Delivery, RawHandler
from squadbus.core.backoff import RECONNECT, Backoff
from squadbus.core.consumer import Consumer, invoke, settles_itself
from squadbus.core.dispatch import (
    DLQ_ATTEMPTS,
    DLQ_GROUP,
    DLQ_ORIGINAL_ID,
    DLQ_REASON,
    DLQ_SUBJECT,
    dead_letter_of,
)
from squadbus.core.envelope import Message, decode, new_id, utcnow
from squadbus.core.errors import Closed, MalformedMessage, SquadbusError
from squadbus.core.source import poll_or_wait
from squadbus.core.tasks import cancel_and_wait

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend

logger = logging.getLogger("squadbus.backends.rabbitmq")

IncomingMessage = aio_pika.abc.AbstractIncomingMessage

_MALFORMED_CONTENT_LIMIT = 64 * 1024
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

    __slots__ = ("_gen", "_msg", "_sub")

    def __init__(self, message: Message, msg: IncomingMessage, attempt: int, sub: RabbitSubscription) -> None:
        super().__init__(message, attempt=attempt, group=sub.group)
        self._msg = msg
        self._sub = sub
        self._gen = sub.generation

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
    """One member of a consumer group (a quorum queue) or a fan-out consumer (an exclusive queue): a
    :class:`~squadbus.core.source.DeliverySource` over what the broker pushed to its ``basic.consume``,
    run by core's :class:`~squadbus.core.consumer.Consumer` (:attr:`runtime`).

    The consume callback only buffers; ``poll`` takes from the buffer in arrival (queue) order and decodes
    there. Undecodable bytes, messages outside the pattern and messages past ``max_deliver`` + margin go
    to a settling task of the source (dead-lettered or acked), never handed out."""

    def __init__(
        self,
        backend: RabbitBackend,
        *,
        pattern: str,
        group: str | None,
        queue_name: str | None,
        options: ConsumerOptions,
    ) -> None:
        self._backend = backend
        self._pattern = pattern
        self._group = group
        self._queue_name = queue_name
        self._options = options
        self._filter = needs_filter(pattern)
        self._buffer: deque[IncomingMessage] = deque()
        # Deliveries the runtime gave back (closed while gathering a batch): handed out again first, as
        # they are (their attempt was counted once).
        self._returned: deque[RabbitDelivery] = deque()
        # The one consumer's wait in receive(): set when a message is buffered (or the source closes).
        self._waiter: asyncio.Future[None] | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._later: dict[IncomingMessage, asyncio.TimerHandle] = {}
        self._attempts: dict[str, int] = {}
        # Attempts counted here, not by the broker: fan-out queues, and classic queues (profile=fast).
        self._counts_locally = group is None or backend.settings.classic_queues
        self._settling: set[asyncio.Task[None]] = set()
        # _closing: stop() began (nothing more handed out, arrivals requeued); _closed: close() began.
        self._closing = False
        self._closed = False
        self.runtime: Consumer[RabbitSubscription] | None = None
        """The consumer runtime over this source (set by core's Consumer); the backend closes it."""
        # ack_wait (group members only); _parked: after a give-back, this member holds and takes nothing.
        self._watched = group is not None
        self._leases: HandlerLeases[RabbitDelivery] = HandlerLeases(options.ack_wait)
        self._parked = False
        self._watchdog: asyncio.Task[None] | None = None
        self._resuming: asyncio.Task[None] | None = None
        self.generation = 0
        """Give-backs so far: a delivery made before the last one is stale (its message went back with the
        channel) and is never handed to the handler."""
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
        """Open the channel, declare (fan-out) or join (group) the queue, and start consuming (the
        runtime starts after)."""
        await self._consume()
        if self._watched:
            watch = self._leases.watch(self._give_back, lambda: self._parked or self._closing)
            self._watchdog = asyncio.get_running_loop().create_task(
                watch, name=f"squadbus-rabbitmq-{self._group}-ack-wait")

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

    def leased(self, handler: RawHandler) -> RawHandler:
        """``handler`` under ack_wait (group members): each delivery's lease runs while its handler does; a
        delivery made stale by a give-back is marked given back and not handled. Keeps :func:`invoke`'s
        promises (one coroutine per delivery, as ``handler`` alone when it settles itself)."""
        if not self._watched:
            return handler
        leases, options = self._leases, self._options

        @settles_itself
        async def under_lease(delivery: Delivery) -> None:
            leased = cast(RabbitDelivery, delivery)
            if leased._gen != self.generation:
                leased.given_back()
                return
            leases.start(leased)
            try:
                await invoke(handler, leased, options)
            finally:
                leases.end(leased)

        return under_lease

    def leased_batches(self, handler: BatchRawHandler) -> BatchRawHandler:
        """:meth:`leased` for a batch handler (core's runtime nacks what it leaves unsettled)."""
        if not self._watched:
            return handler
        leases = self._leases

        async def under_lease(deliveries: Sequence[Delivery]) -> None:
            batch = cast(Sequence[RabbitDelivery], deliveries)
            generation = self.generation
            if any(d._gen != generation for d in batch):
                for delivery in batch:
                    if delivery._gen != generation:
                        delivery.given_back()
                batch = [d for d in batch if d._gen == generation]
                if not batch:
                    return
            for delivery in batch:
                leases.start(delivery)
            try:
                await handler(batch)
            finally:
                for delivery in batch:
                    leases.end(delivery)

        return under_lease

    async def _give_back(self, late: list[RabbitDelivery]) -> None:
        """Hand everything this member holds back to the group (see the module docstring)."""
        self._parked = True
        self.generation += 1
        self._leases.give_back_all()
        self._buffer.clear()  # unacknowledged on the channel: returned with it
        self._returned.clear()  # the same
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
        if not self._closing:
            self._resuming = asyncio.get_running_loop().create_task(
                self._resume(), name=f"squadbus-rabbitmq-{self._group}-resume")

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
        self._buffer.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- handing out (DeliverySource) --------------------------------------------------------

    def poll(self, max_count: int) -> Sequence[Delivery]:
        """Up to ``max_count`` buffered messages as deliveries, decoded here, in queue order (what the
        runtime gave back first); those with nothing to handle go to a settling task instead."""
        if self._closing or self._parked:
            return ()
        if self._returned:
            return self._take_returned(max_count)
        buffer = self._buffer
        delivery_of = self._delivery_of
        if max_count == 1:  # one delivery at a time, the hot path: no list
            while buffer:
                delivery = delivery_of(buffer.popleft())
                if delivery is not None:
                    return (delivery,)
            return ()
        got: list[Delivery] = []
        while buffer and len(got) < max_count:
            delivery = delivery_of(buffer.popleft())
            if delivery is not None:
                got.append(delivery)
        return got

    def _take_returned(self, max_count: int) -> list[Delivery]:
        returned = self._returned
        got: list[Delivery] = []
        while returned and len(got) < max_count:
            got.append(returned.popleft())
        if len(got) < max_count:
            got.extend(self.poll(max_count - len(got)))
        return got

    async def receive(self, max_count: int, wait: float) -> Sequence[Delivery]:
        if self._closed:
            raise Closed(f"the subscription to {self._pattern!r} is closed")
        return await poll_or_wait(self.poll, self._ready, max_count, wait)

    async def _ready(self) -> None:
        """Wait until a message is buffered (or the source closes); stopped, until it closes. While parked
        after a give-back the buffer stays empty until the member consumes again (``_resume``)."""
        while not self._closed and (self._closing or not (self._buffer or self._returned)):
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Back in front of the buffer, in their order, their attempt not counted again: ``close()``
        requeues them first."""
        returned = self._returned
        for delivery in reversed(deliveries):
            returned.appendleft(cast(RabbitDelivery, delivery))

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

    def _delivery_of(self, msg: IncomingMessage) -> RabbitDelivery | None:
        """The delivery of ``msg``; None when there is nothing to handle (a settling task dead-letters or
        acks it: no await here)."""
        attempt = self._attempt(msg)
        try:
            message = decode(msg.body)
        except MalformedMessage as exc:
            self._spawn(self._malformed(msg, exc, attempt))
            return None
        if self._filter and not subjects.matches(self._pattern, message.subject):
            self._spawn(self.send(msg, ack=True))  # bound wider than the pattern (a literal '#' token)
            return None
        delivery = RabbitDelivery(message, msg, attempt, self)
        if self._group is not None and attempt > self._options.max_deliver + UNSETTLED_MARGIN:
            self._spawn(self._dead_letter_unsettled(delivery, msg))
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

    async def stop(self) -> None:
        """Hand nothing more out (a ``receive`` waits until the runtime cancels it or the source closes)
        and cancel the ``basic.consume``, before the runtime's handlers finish: a message they nack is not
        pushed back to this consumer, and what still arrives is requeued at once. Idempotent."""
        self._closing = True
        # While the connection is down the broker has dropped the consumer and requeued what it held:
        # nothing to cancel or close (waiting for the reconnect would only stall the close).
        queue, tag, self._tag = self._queue, self._tag, None
        if self._backend.connected and queue is not None and tag is not None:
            with contextlib.suppress(*_SETTLE_ERRORS, TimeoutError):
                await queue.cancel(tag, timeout=5)

    async def close(self) -> None:
        """Called by the runtime once its handlers finished: stop (if not yet), requeue what was buffered,
        given back or held for a nack's delay (in queue order), close the channel. Idempotent. Cancelled
        meanwhile, it still requeues and closes the channel, then raises CancelledError."""
        if self._closed:
            return
        try:
            await self.stop()
        finally:
            await self._requeue_and_close()

    async def _requeue_and_close(self) -> None:
        """close()'s clean-up once stopped: end the watchdog and the resuming, requeue, close the channel."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        connected = self._backend.connected
        tasks = [t for t in (self._watchdog, self._resuming) if t is not None]
        try:
            await cancel_and_wait(*tasks)
        finally:
            await self._requeue(connected)

    async def _requeue(self, connected: bool) -> None:
        """Requeue what was buffered, given back or held for a nack's delay (in queue order); close the channel."""
        while self._returned:
            await self.send(self._returned.popleft()._msg, ack=False)
        while self._buffer:
            await self.send(self._buffer.popleft(), ack=False)
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


class RabbitConsumer(Consumer[RabbitSubscription]):
    """A subscription: core's consumer runtime over its :class:`RabbitSubscription` (``handler`` per
    delivery, or ``batches``, each under the member's ack_wait); the source consumes before, and closes
    after, it."""

    def __init__(
        self, source: RabbitSubscription, options: ConsumerOptions, *, handler: RawHandler | None = None,
        batches: BatchRawHandler | None = None, max_wait: float = 0.0,
    ) -> None:
        super().__init__(
            source, options, handler=None if handler is None else source.leased(handler),
            batches=None if batches is None else source.leased_batches(batches), max_wait=max_wait)

    async def close(self) -> None:
        """Stop the source's consumer, let the handlers in progress finish, then close the source."""
        await self.source.stop()
        await super().close()

    @property
    def queue_name(self) -> str | None:
        """The group's queue, or the exclusive queue of a fan-out subscription."""
        return self.source.queue_name
