"""Native request/reply with RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``).

The request goes through the exchange like any message (confirmed, in the log, in the responder's
queue); the reply comes straight back to the requesting channel: no queue is declared per request or
per requester, and the reply is not written to any queue or to the log.

How: one channel per backend, opened at the first request, consumes the pseudo-queue
``amq.rabbitmq.reply-to`` (no-ack, as the broker requires). The broker gives that consumer an
address, ``amq.rabbitmq.reply-to.<channel>.<key>``, which it writes into the ``reply-to`` property
of what the channel publishes with ``reply-to: amq.rabbitmq.reply-to``. AMQP does not tell a client
its address otherwise, so the channel learns it once with a probe: an empty message published with
``mandatory`` to a queue name that does not exist comes back (``basic.return``) with the address
filled in. Requests then carry the address in their ``reply_to`` header (it is a valid subject), and
the responder's ``Bus.reply`` publishes to it: :class:`~.publisher.RabbitPublisher` sends subjects
under ``amq.rabbitmq.reply-to.`` to the default exchange. Replies are matched to requests by their
``correlation_id`` header (the request's id), so concurrent requests share the address.

The address lives as long as the channel: when it closes (connection lost), the requests waiting on
it fail with ConnectionLost at once (their replies can no longer arrive) and the next request opens
the consumer again, with a new address. A reply arriving after its request gave up is dropped
(logged at debug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
from pamqp.commands import Basic

from squadbus.backends.rabbitmq.topology import short_name
from squadbus.backends.rabbitmq.translate import translate
from squadbus.core.bus import CORRELATION_ID, REPLY_TO
from squadbus.core.envelope import Message, decode, new_id
from squadbus.core.errors import BackendError, Closed, ConnectionLost, MalformedMessage, RequestTimeout

logger = logging.getLogger("squadbus.backends.rabbitmq")

REPLY_QUEUE = "amq.rabbitmq.reply-to"
"""The pseudo-queue of direct reply-to; a reply address is this, a dot, and the consumer's suffix."""

REPLY_PREFIX = REPLY_QUEUE + "."

Publish = Callable[[Message], Awaitable[None]]


def is_reply_address(subject: str) -> bool:
    """True for a direct reply-to address (published to the default exchange, not the squad's)."""
    return subject.startswith(REPLY_PREFIX)


class DirectReplies:
    """The reply consumer of one backend and the requests waiting on it."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, namespace: str) -> None:
        self._connection = connection
        self._probe_key = short_name(f"{namespace}.reply-probe.{new_id().hex}")  # a queue nobody declares
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._address = ""
        self._waiting: dict[str, tuple[asyncio.Future[Message], str]] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def request(self, message: Message, timeout: float, publish: Publish) -> Message:
        """Publish ``message`` with this channel's reply address and return the first reply within ``timeout``.

        Raises RequestTimeout when none came, ConnectionLost when the reply channel closed meanwhile,
        Closed when the backend closed meanwhile, or what ``publish`` raised.
        """
        key = str(message.id)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                address = await self._ensure()
                self._waiting[key] = (fut, address)
                await publish(message.with_headers(**{REPLY_TO: address}))
                return await fut
        except TimeoutError as exc:
            if isinstance(exc, BackendError):
                raise  # the publish itself timed out: a broker problem, not a silent responder
            raise RequestTimeout(f"no reply to {message.id} from {message.recipient_id} within {timeout}s") from exc
        finally:
            if self._waiting.get(key, (None,))[0] is fut:
                del self._waiting[key]

    async def _ensure(self) -> str:
        raw = self._raw
        if raw is not None and not raw.is_closed:
            return self._address
        async with self._lock:
            if self._closed:
                raise Closed("rabbitmq backend is closed")
            raw = self._raw
            if raw is not None and not raw.is_closed:
                return self._address
            try:
                if self._channel is None or self._channel.is_closed:
                    # Confirms on, so that aiormq hands the probe's basic.return back as PublishError.
                    self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                raw = await self._channel.get_underlay_channel()
                await raw.basic_consume(REPLY_QUEUE, self._on_reply, no_ack=True)
                address = await self._probe(raw)
            except BaseException as exc:
                # The next request starts on a new channel (a second reply consumer on this one would be
                # refused by the broker, closing the channel).
                await self._drop_channel()
                if isinstance(exc, Exception) and not isinstance(exc, BackendError):
                    raise translate(exc, "start the direct reply-to consumer") from exc
                raise
            self._raw, self._address = raw, address
            raw.closing.add_done_callback(lambda _: self._lost(address))
            logger.debug("direct reply-to address of this backend: %s", address)
            return address

    async def _probe(self, raw: aiormq.abc.AbstractChannel) -> str:
        """The address the broker writes for this channel's consumer (see the module docstring)."""
        properties = Basic.Properties(reply_to=REPLY_QUEUE, delivery_mode=1)
        try:
            await raw.basic_publish(b"", exchange="", routing_key=self._probe_key, mandatory=True,
                                    properties=properties)
        except aiormq.exceptions.PublishError as returned:
            back = returned.message
            address = (back.header.properties.reply_to or "") if back is not None else ""
            if is_reply_address(address):
                return address
        raise BackendError(f"RabbitMQ did not reveal the direct reply-to address (probe to {self._probe_key} "
                           "was not returned with one)")

    async def _on_reply(self, msg: aiormq.abc.DeliveredMessage) -> None:
        try:
            reply = decode(msg.body)
        except MalformedMessage as exc:
            logger.warning("dropping a malformed message on the direct reply-to consumer: %s", exc)
            return
        correlation = reply.headers.get(CORRELATION_ID, "")
        waiting = self._waiting.pop(correlation, None)
        if waiting is None or waiting[0].done():
            logger.debug("dropping reply %s to request %s: no request is waiting for it (timed out or closed)",
                         reply.id, correlation or "?")
            return
        waiting[0].set_result(reply)

    def _lost(self, address: str) -> None:
        """The channel of ``address`` closed: its replies can no longer arrive."""
        for key, (fut, waiting_on) in list(self._waiting.items()):
            if waiting_on == address and not fut.done():
                del self._waiting[key]
                fut.set_exception(ConnectionLost(
                    f"the connection to RabbitMQ was lost while request {key} waited for its reply"))

    async def close(self) -> None:
        """Fail the waiting requests with Closed and close the channel. Idempotent."""
        self._closed = True
        for key, (fut, _) in list(self._waiting.items()):
            if not fut.done():
                fut.set_exception(Closed(f"rabbitmq backend closed while request {key} waited for its reply"))
        self._waiting.clear()
        await self._drop_channel()

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._raw = None
        if channel is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await channel.close()
