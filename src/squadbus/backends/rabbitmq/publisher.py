"""Publishing with publisher confirms, retries within ``publish_timeout``, and an in-process dedupe window.

A publish returns once RabbitMQ confirmed it (``basic.ack``): the log stream
and every group queue the message was routed to have stored it. Concurrent
publishes share one confirm channel and wait for their confirms together, so
throughput comes from concurrency, not batching on the client.

RabbitMQ has no broker-side deduplication in the Debian package (the
``rabbitmq-message-deduplication`` plugin is not packaged), so a publisher
remembers the ids it had confirmed in the last ``dedupe_window`` seconds (at
most ``dedupe_size`` of them) and does not send them again: a retried
``publish_many`` or a client re-sending the same id through the same backend
is stored once. Another process publishing the same id is not caught here;
the db-writer's idempotent write is what dedupes across processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from uuid import UUID

import aio_pika
import aio_pika.abc
from pamqp.commands import Basic

from squadbus.backends.rabbitmq.requests import is_reply_address
from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.backends.rabbitmq.topology import (
    MARKER_HEADER,
    direct_recipient,
    inbox_partition,
    inbox_route,
    routing_key,
)
from squadbus.backends.rabbitmq.translate import is_transient, translate
from squadbus.core.backoff import WRITE_RETRY, Backoff
from squadbus.core.envelope import Message, encode, new_id
from squadbus.core.errors import BackendTimeout, PublishFailed

logger = logging.getLogger("squadbus.backends.rabbitmq")

_CONTENT_TYPE = "application/json"


class DedupeWindow:
    """Ids confirmed in the last ``window`` seconds, at most ``size`` of them (oldest forgotten first)."""

    def __init__(self, window: float, size: int) -> None:
        self.window = window
        self.size = size
        self._seen: OrderedDict[UUID, float] = OrderedDict()

    def __contains__(self, message_id: UUID) -> bool:
        if not self.size or not self.window:
            return False
        seen = self._seen.get(message_id)
        return seen is not None and time.monotonic() - seen < self.window

    def add(self, message_id: UUID) -> None:
        if not self.size or not self.window:
            return
        now = time.monotonic()
        self._seen[message_id] = now
        self._seen.move_to_end(message_id)
        while self._seen and (len(self._seen) > self.size or now - next(iter(self._seen.values())) >= self.window):
            self._seen.popitem(last=False)


class RabbitPublisher:
    """Publishes envelopes to the squad's exchange on one confirm channel."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, settings: RabbitSettings) -> None:
        self._channel = channel
        self._settings = settings
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self.dedupe = DedupeWindow(settings.dedupe_window, settings.dedupe_size)
        self.duplicates_dropped = 0
        # fast: transient (held in memory by classic queues; the log stream writes every message anyway)
        self.delivery_mode = (aio_pika.DeliveryMode.NOT_PERSISTENT if settings.classic_queues
                              else aio_pika.DeliveryMode.PERSISTENT)

    async def setup(self) -> None:
        self._exchange = await self._channel.get_exchange(self._settings.exchange, ensure=False)

    async def publish(self, message: Message) -> None:
        """Publish ``message`` (routing key = subject) and wait for its confirm; see the module docstring."""
        if message.id in self.dedupe:
            self.duplicates_dropped += 1
            logger.debug("message %s was published within the dedupe window; not sent again", message.id)
            return
        if is_reply_address(message.subject):
            await self._reply(message)
            return
        key = routing_key(message.subject)
        # A direct message is also routed (sender-selected distribution, ``CC``) to its agent's inbox
        # partition queue; the broker stores it once per queue, and the confirm covers every queue.
        agent = direct_recipient(key)
        headers: dict[str, aio_pika.abc.FieldValue] | None = None if agent is None else {
            "CC": [inbox_route(inbox_partition(agent, self._settings.inbox_partitions))]}
        amqp_message = aio_pika.Message(
            encode(message), message_id=str(message.id), content_type=_CONTENT_TYPE,
            delivery_mode=self.delivery_mode, headers=headers,
        )
        await self._send(self._settings.exchange, key, amqp_message, f"publish {message.id}")
        self.dedupe.add(message.id)

    async def _reply(self, message: Message) -> None:
        """A reply to a request (subject = the requester's direct reply-to address, see :mod:`.requests`):
        straight to the requesting channel through the default exchange, not stored anywhere. A requester
        that is gone drops it without an error."""
        amqp_message = aio_pika.Message(encode(message), message_id=str(message.id), content_type=_CONTENT_TYPE)
        await self._send("", routing_key(message.subject), amqp_message, f"reply {message.id}")

    async def publish_to_queue(self, queue: str, amqp_message: aio_pika.Message, what: str) -> None:
        """Publish a prepared AMQP message straight to ``queue`` (default exchange) and wait for its confirm."""
        await self._send("", queue, amqp_message, what)

    async def marker(self, queue: str | None = None) -> str:
        """Append a marker to the log (or to the stream ``queue``; default exchange) and return its id."""
        marker_id = f"marker-{new_id()}"
        amqp_message = aio_pika.Message(
            b"", message_id=marker_id, headers={MARKER_HEADER: 1}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.publish_to_queue(queue or self._settings.log_queue, amqp_message, "append a marker to a stream")
        return marker_id

    async def _send(self, exchange_name: str, key: str, amqp_message: aio_pika.Message, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.publish_timeout
        backoff = Backoff(WRITE_RETRY)
        while True:
            remaining = deadline - loop.time()
            try:
                exchange = self._exchange if exchange_name else self._channel.default_exchange
                if exchange is None:
                    exchange = self._exchange = await self._channel.get_exchange(exchange_name, ensure=False)
                async with asyncio.timeout(max(0.01, remaining)):  # no task per publish, unlike wait_for
                    confirm = await exchange.publish(amqp_message, routing_key=key, mandatory=False)
            except TimeoutError as exc:
                raise BackendTimeout(
                    f"{what}: no confirm from RabbitMQ within {self._settings.publish_timeout:g} s"
                ) from exc
            except Exception as exc:
                pause = backoff.next()
                if not is_transient(exc) or loop.time() + pause > deadline:
                    raise translate(exc, what) from exc
                logger.debug("%s failed (%s: %s); retrying in %.2fs", what, type(exc).__name__, exc, pause)
                await asyncio.sleep(pause)
                continue
            if isinstance(confirm, Basic.Nack | Basic.Reject):
                raise PublishFailed(f"{what}: RabbitMQ answered basic.nack (the message was not stored)")
            return
